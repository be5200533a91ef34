"""Storage under ``--out``: safe names and atomic writes (temp file + fsync + rename).

``holds`` checks that a delivered file is still what the manifest recorded: by size and
modification time when those match (fast: 200k files in seconds), else by SHA-256.

A reader never sees a half-written image: bytes go to a hidden temp file in the same folder,
are flushed to disk, then renamed over the final name in one step. Temp files left by a
killed run are removed by ``remove_stale_temp_files`` at the start of the next one.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from . import crashpoints
from .errors import OutputError

TEMP_PREFIX = ".zb-tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_length: int = 64) -> str:
    """A file-system-safe name for ``text``; a short hash keeps altered names distinct."""
    cleaned = _UNSAFE.sub("_", text).strip("._-")[:max_length]
    if cleaned == text and cleaned:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else digest


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Written:
    """A file that was written: path relative to the store root, hash and size."""

    path: str
    sha256: str
    bytes: int
    mtime_ns: int | None = None  # the file's modification time right after the rename


class LocalStore:
    """Files under one root folder, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._root = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"--out {self.root} exists and is not a folder. Pass a folder path (it is created if missing).")

    def write(self, relpath: str, data: bytes) -> Written:
        """Write ``data`` to ``relpath`` atomically; return its hash and size."""
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; delivered files follow the umask like any other
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            crashpoints.reached("store.before_rename")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        crashpoints.reached("store.after_rename")
        return Written(relpath, hashlib.sha256(data).hexdigest(), len(data), target.stat().st_mtime_ns)

    def holds(self, relpath: str, sha256: str, size: int | None = None, mtime_ns: int | None = None,
              verify: bool = False) -> bool:
        """True when ``relpath`` exists with exactly this SHA-256.

        Fast path: a file whose size and modification time (ns) are what was recorded when it was
        written is trusted without reading it (one ``stat``); anything else, or ``verify``, hashes it.
        """
        path = os.path.join(self._root, relpath)  # not pathlib: this runs once per job of a 200k-job rerun
        try:
            stat = os.stat(path)
        except OSError:
            return False
        if not verify and mtime_ns is not None and stat.st_mtime_ns == mtime_ns and stat.st_size == size:
            return True
        return S_ISREG(stat.st_mode) and sha256_file(Path(path)) == sha256

    def remove_stale_temp_files(self) -> int:
        """Delete temp files a killed run left behind; return how many."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def write_atomic(path: Path, data: bytes) -> None:
    """Write one file atomically (for manifests and reports)."""
    LocalStore(path.parent).write(path.name, data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Storage under ``--out``: safe names and atomic writes (temp file + fsync + rename).

``holds`` checks that a delivered file is still what the manifest recorded: by size and
modification time when those match (fast: 200k files in seconds), else by SHA-256.

A reader never sees a half-written image: bytes go to a hidden temp file in the same folder,
are flushed to disk, then renamed over the final name in one step. Temp files left by a
killed run are removed by ``remove_stale_temp_files`` at the start of the next one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from . import crashpoints
from .errors import OutputError

TEMP_PREFIX = ".zb-tmp-"
STOP_FILE_PREFIX = f"{TEMP_PREFIX}stop-"  # a run's stop file (shard.stop_asked): a first Ctrl-C creates it
STOP_FILE_KEPT = 3600.0  # seconds a stop file outlives its run, for shards on other machines to see it
LOCK = ".zimage-batch.lock"  # held by the run that writes to the folder
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
        fsync_dir(target.parent)
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
        """Delete temp files a killed run left behind; return how many. A stop file stays for an hour
        (``STOP_FILE_KEPT``): shards of an interrupted run on other machines may not have seen it yet."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            try:
                if path.name.startswith(STOP_FILE_PREFIX) and time.time() - path.stat().st_mtime < STOP_FILE_KEPT:
                    continue
            except FileNotFoundError:
                continue
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


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file in it) durable; best effort where the system cannot."""
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


def check_folder(folder: str | Path, option: str = "--out") -> Path:
    """``folder``, checked without creating anything: OutputError when it is a file, lies under a
    file, or the nearest folder of its path that exists cannot be written."""
    folder = Path(folder)
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder.absolute() else f"cannot be created: {existing} is a file"
        raise OutputError(f"{option} {folder} {where}. Pass a path under a folder (missing folders are created).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {folder} cannot be written: {existing} is not writable by this user. Pass a "
                          f"folder you can write to, or change the permissions of {existing}.")
    return folder


UNWRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def stops_when_unwritable(root: str | Path) -> Iterator[None]:
    """Turn an OSError saying the folder takes no more files (full, over quota, read-only, no
    permission) into an OutputError that stops the run: every later image would fail the same way."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        raise OutputError(f"--out {root} takes no more files ({exc.strerror or exc}{where}). Free space, or fix the "
                          f"folder's permissions or mount, then run the same command again: the images finished so far "
                          f"are kept and recorded.") from None


@contextmanager
def locked(root: str | Path) -> Iterator[None]:
    """Hold the folder's lock (``ROOT/.zimage-batch.lock``, there while a run writes to the folder).

    A second run into the same folder stops at once with an OutputError, instead of folding away the
    first one's manifest parts and temp files. It is an ``flock``: the system releases it when the
    holding process ends, killed or not, so a crash never leaves the folder locked (the file a killed
    run leaves is taken over by the next). It guards runs started on this machine (a folder shared
    over the network may not honour it). Taking it again in the process that holds it is a no-op
    (the CLI takes it before loading the model, the flow's runner again). A folder this call created
    and that stayed empty is removed again, so a run that failed its checks leaves nothing.
    """
    root = check_folder(root).absolute()
    if root in _HELD:
        yield
        return
    created = [folder for folder in (root, *root.parents) if not folder.exists()]  # innermost first
    path = root / LOCK
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = _take(path)
    except OSError as exc:  # e.g. a read-only file system, or no permission (where os.access could not tell)
        raise OutputError(f"--out {root} cannot be written ({exc.strerror}: {exc.filename or root}). Pass a folder "
                          f"you can write to.") from None
    if fd is None:  # a file system without flock (some network and FUSE mounts): run as before there was a lock
        print(f"warning: {root} does not support file locks, so nothing stops a second run into it; run one at a time.",
              file=sys.stderr)
    else:
        try:  # who holds it, for the message a second run prints (a lock file of another user's may be read-only)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass
    _HELD.add(root)
    try:
        yield
    finally:
        _HELD.discard(root)
        path.unlink(missing_ok=True)  # while still held, so the next run takes a new file
        if created and not any(root.iterdir()):
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: it stays
                    break
        if fd is not None:
            os.close(fd)  # releases the lock


_HELD: set[Path] = set()  # folders whose lock this process holds


def lock_holder(root: str | Path) -> str | None:
    """Who holds the folder's lock (a run writing to it right now), or None: nobody, or no flock here."""
    try:
        fd = os.open(Path(root) / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: no run holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once below; a run holds it exclusively
    except BlockingIOError:
        return _holder(fd)
    except OSError:  # a file system without flock: cannot tell
        return None
    finally:
        os.close(fd)
    return None


def _holder(fd: int) -> str:
    """What the holder of a lock wrote into the lock file (``locked``): its pid and host."""
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"


def _take(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock; OutputError naming the holder when
    another process has it; None where the file system has no flock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # left by another user's run: flock works on a read-only descriptor too
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(
                f"--out {path.parent} is in use by another zimage-batch run ({holder}; it holds {path.name}). Two "
                f"runs into one folder would mix their manifests: wait for that run to finish, or give this run "
                f"another --out."
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                return None
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as it finished, after we opened it: take a new one

"""``zimage-batch postprocess``: image files in (generated or a studio's), marketplace files out.

    OUT/<preset>/<input stem>.<ext>              delivered files
    OUT/rejected/<preset>/<input stem>.<ext>     what failed a quality gate (never delivered), with
    OUT/rejected/<preset>/<input stem>.reasons.txt   one line per reason
    OUT/postprocess.jsonl                        one record per input and preset

Everything is checked before the first file is written: the presets file, the preset names,
every input (exists, is an image within Pillow's hard pixel limit, no two share a stem) and the
matting backend. While it writes, the command holds OUT's lock (as `run` does) and first removes
temp files a killed earlier command left. Files are written atomically; the previous report is
removed before the first file is written (it would describe files this command rewrites) and the
new one takes its place when the command finishes, so a command that stops early leaves no report.
A file that changes from delivered to rejected (or back) leaves no stale copy in the other folder.
A picture that fails to process for an unexpected reason is rejected as ``processing_failed`` with
the error; the batch goes on.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from .errors import ImageInputError, OutputError, PresetError, ZImageBatchError
from .matting import load_matting
from .postprocess import Matting, Processed, Source, process
from .presets import Preset, load_presets, select_presets, unsupported
from .store import TEMP_PREFIX, LocalStore, Written, locked

REPORT = "postprocess.jsonl"  # REPORT and REJECTED are presets.RESERVED_NAMES: no preset folder may take them
REJECTED = "rejected"
WORK_MAX_SIDE = 4096  # larger inputs are reduced to this long side first (JPEGs while decoding)
MAX_LISTED = 50


class FileRecord(BaseModel):
    """One input processed for one preset, as written to postprocess.jsonl."""

    input: str
    preset: str
    status: Literal["ok", "rejected"]
    reasons: list[str]
    explanations: list[str]
    path: str  # relative to OUT
    width: int
    height: int
    format: str
    bytes: int
    sha256: str
    quality: int | None
    fill_ratio: float | None
    border_white_fraction: float | None


@dataclass
class PostprocessSummary:
    """What a postprocess run did: counts, the report's path and the rejected records."""

    out: Path
    inputs: int
    presets: list[str]
    ok: int = 0
    rejected: list[FileRecord] = field(default_factory=list)
    rejected_count: int = 0
    seconds: float = 0.0

    @property
    def report(self) -> Path:
        return self.out / REPORT


def check_images(paths: Sequence[str]) -> list[Path]:
    """Every input as a Path; one ImageInputError listing each missing, non-image or clashing input."""
    problems: list[str] = []
    stems: dict[str, str] = {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            problems.append(f"{given} is a folder; pass the image files in it (e.g. {Path(given) / '*.png'}).")
            continue
        try:
            with _open(path) as image:
                image.verify()
        except FileNotFoundError:
            problems.append(f"{given} does not exist.")
            continue
        except Image.DecompressionBombError as exc:
            problems.append(_too_big(given, exc))
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            detail = "Pillow does not recognise its format" if isinstance(exc, UnidentifiedImageError) else str(exc)
            problems.append(f"{given} is not a readable image ({detail}).")
            continue
        if path.stem in stems:
            problems.append(f"{stems[path.stem]} and {given} have the same name {path.stem!r}; their outputs would "
                            "overwrite each other in OUT/<preset>/. Rename one or process them separately.")
        stems.setdefault(path.stem, given)
    if not paths:
        problems.append("No input image given. Pass image files, e.g. photos/*.png.")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more."] if len(problems) > MAX_LISTED else [])
        raise ImageInputError("\n".join(["Some inputs cannot be post-processed; nothing was written:", *(f"  - {p}" for p in shown)]))
    return [Path(p) for p in paths]


def _open(path: Path) -> Image.Image:
    """``Image.open`` without Pillow's DecompressionBombWarning (over 89 megapixels: medium-format studio
    photos are real); its DecompressionBombError, over twice that, still stops the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _too_big(given: str, exc: Image.DecompressionBombError) -> str:
    """Why an image over Pillow's pixel limit is refused, and what to do."""
    return (f"{given} is too large to decode safely: {exc} If it is a real picture, save a smaller copy (at most "
            f"{2 * Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels, e.g. 12000 x 12000) and pass that; a small file that "
            "claims such a size is damaged or made to exhaust memory.")


def open_image(path: Path, max_side: int = WORK_MAX_SIDE) -> Image.Image:
    """Decode an image file; a big JPEG is decoded at a reduced scale (DCT scaling) near `max_side`."""
    try:
        image = _open(path)
    except Image.DecompressionBombError as exc:
        raise ImageInputError(_too_big(str(path), exc)) from None
    if image.format == "JPEG" and max(image.size) > 2 * max_side:
        scale = max_side / max(image.size)
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    return image


def postprocess_files(
    inputs: Sequence[str],
    preset_names: Sequence[str],
    out: str | Path,
    *,
    presets_file: str | Path | None = None,
    matting: str = "classical",
    on_record: Callable[[FileRecord], None] | None = None,
) -> PostprocessSummary:
    """Process every input for every named preset into `out`; see the module docstring for the layout."""
    start = time.perf_counter()
    presets = select_presets(list(preset_names), load_presets(presets_file))
    problems = unsupported(presets)
    if problems:
        raise PresetError("; ".join(problems) + ".")
    paths = check_images(inputs)
    backend = load_matting(matting)
    store = LocalStore(out)
    summary = PostprocessSummary(Path(out), len(paths), [p.name for p in presets])
    with locked(out):  # a second command (or a run) into OUT stops here with a clear message
        _write_all(inputs, paths, presets, backend, store, summary, on_record, _work_side(presets))
    summary.seconds = time.perf_counter() - start
    return summary


def _work_side(presets: list[Preset]) -> int:
    """The long side inputs are reduced to: WORK_MAX_SIDE, or more where a preset's frame needs it
    (so a long_side of 6000 is not made by enlarging a 4096 copy)."""
    sides = [side for p in presets for side in (p.width, p.height, p.long_side) if side is not None]
    return max([WORK_MAX_SIDE, *sides])


def _write_all(inputs: Sequence[str], paths: list[Path], presets: list[Preset], backend: Matting, store: LocalStore,
               summary: PostprocessSummary, on_record: Callable[[FileRecord], None] | None, max_side: int) -> None:
    """Process every input into `store` and publish the report; the caller holds the folder's lock."""
    store.remove_stale_temp_files()  # what a killed command left: complete-looking hidden files
    (store.root / REPORT).unlink(missing_ok=True)  # it would describe files this command rewrites
    fd, spool = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{REPORT}.", dir=store.root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as report:
            for given, path in zip(inputs, paths):
                for record in _process_file(given, path, presets, backend, store, max_side):
                    report.write(record.model_dump_json() + "\n")
                    if record.status == "ok":
                        summary.ok += 1
                    else:
                        summary.rejected_count += 1
                        if len(summary.rejected) < MAX_LISTED:
                            summary.rejected.append(record)
                    if on_record is not None:
                        on_record(record)
            report.flush()
            os.fsync(report.fileno())
        os.replace(spool, store.root / REPORT)
    except BaseException:
        Path(spool).unlink(missing_ok=True)
        raise


def _process_file(given: str, path: Path, presets: list[Preset], backend: Matting, store: LocalStore,
                  max_side: int = WORK_MAX_SIDE) -> list[FileRecord]:
    """All presets of one input; an input whose pixels cannot be decoded is rejected for each preset,
    and so is one that fails to process (``processing_failed``, with the error), so the batch goes on."""
    try:
        source = Source(open_image(path, max_side), backend, max_side=max_side)
    except ZImageBatchError:
        raise
    except (OSError, SyntaxError, ValueError):  # truncated or corrupt after a good header
        return [_deliver(given, path, Processed(preset, ("unreadable_image",), None), store) for preset in presets]
    except Exception as exc:  # our bug, on this picture only: say so in its record, go on with the others
        return [_deliver(given, path, _failed(preset, exc), store) for preset in presets]
    return [_deliver(given, path, _process_safely(source, preset), store) for preset in presets]


def _process_safely(source: Source, preset: Preset) -> Processed:
    """`process`; an unexpected error becomes a ``processing_failed`` rejection of this file only."""
    try:
        return process(source, preset)
    except ZImageBatchError:
        raise
    except Exception as exc:
        return _failed(preset, exc)


def _failed(preset: Preset, exc: Exception) -> Processed:
    return Processed(preset, ("processing_failed",), None, error=f"{type(exc).__name__}: {exc}")


def _deliver(given: str, path: Path, processed: Processed, store: LocalStore) -> FileRecord:
    """Write one processed file to its preset folder, or to rejected/ with its reasons; drop stale copies."""
    preset, rendered = processed.preset, processed.rendered
    rejected = f"{REJECTED}/{preset.name}/{path.stem}"
    places = {"delivered": f"{preset.name}/{path.stem}.{preset.extension}", "rendered": f"{rejected}.{preset.extension}",
              "input": f"{rejected}{path.suffix}", "reasons": f"{rejected}.reasons.txt"}
    if rendered is not None:
        target = places["delivered" if processed.status == "ok" else "rendered"]
        written, size = _write(store, target, rendered.data), (rendered.width, rendered.height, rendered.format)
    else:  # nothing could be framed: keep the input itself for review
        target = places["input"]
        written, size = _write(store, target, path.read_bytes()), _original_size(path)
    keep = {target}
    if processed.status == "rejected":
        _write(store, places["reasons"], ("\n".join(processed.explain()) + "\n").encode("utf-8"))
        keep.add(places["reasons"])
    _remove(store, *(set(places.values()) - keep))
    return FileRecord(
        input=given, preset=preset.name, status=processed.status, reasons=list(processed.reasons),
        explanations=processed.explain(), path=written.path, width=size[0], height=size[1], format=size[2],
        bytes=written.bytes, sha256=written.sha256, quality=rendered.quality if rendered else None,
        fill_ratio=_rounded(processed.fill_ratio), border_white_fraction=_rounded(processed.border_white_fraction),
    )


def _write(store: LocalStore, relpath: str, data: bytes) -> Written:
    """``store.write``; a folder that cannot take the file (full disk, permissions) is an OutputError."""
    try:
        return store.write(relpath, data)
    except OSError as exc:
        raise OutputError(f"--out {store.root}: {relpath} cannot be written ({exc.strerror or exc}). Free space or fix "
                          f"the folder's permissions, then run the same command again.") from None


def _original_size(path: Path) -> tuple[int, int, str]:
    with _open(path) as image:
        return image.width, image.height, image.format or ""


def _remove(store: LocalStore, *relpaths: str) -> None:
    for relpath in relpaths:
        (store.root / relpath).unlink(missing_ok=True)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)

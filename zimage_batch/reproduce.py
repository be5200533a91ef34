"""Regenerate one job from its manifest record alone, and say how close the result is.

The record holds everything that determines the image: prompt, negative prompt, image seed,
size, steps, guidance, sequence length and model identity (mapped back to a ``--model``
reference; a local folder has to be named again). The image is generated in a batch of the
recorded size (copies of the job, so the arithmetic matches the run's batched call), then goes
through the same post-processing and sealing as in the run, with the record's software version
in the embedded metadata. Each output is compared with the manifest's SHA-256 and with the original
file in the run's folder: whether that is still there and still has the manifest's SHA-256, and, when
the reproduction's bytes differ, pixel by pixel (PSNR, perceptual hash distance). Version and device
differences between the record and this machine are named. Files already in ``--out`` are never
overwritten with other bytes, and ``--out`` cannot be a run's folder.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import ManifestError, ModelError, OutputError
from .manifest import MANIFEST, PARTS, Attempt, ManifestRecord, library_versions
from .models import SIMULATED, TINY_RANDOM, resolve_model
from .plan import Job
from .provenance import Sealer
from .store import LOCK, LocalStore, Written, check_folder
from .verify import Location, outside

REPORT = "reproduce.json"


def find_record(records: dict[str, ManifestRecord], job: str, source: str) -> ManifestRecord:
    """The record of ``job`` (a full job id or a unique prefix of at least 8 characters)."""
    if job in records:
        record = records[job]
    else:
        matches = [r for r in records.values() if len(job) >= 8 and r.job_id.startswith(job)]
        if len(matches) != 1:
            what = f"matches {len(matches)} jobs" if matches else "is not"
            sample = ", ".join(list(records)[:3])
            raise ManifestError(
                f"Job id {job!r} {what} in {source} ({len(records)} records). Pass a full job id or a unique prefix "
                f"of at least 8 characters, as in the manifest's job_id field or the file names (e.g. {sample})."
            )
        record = matches[0]
    if record.status == "failed" or record.image_seed is None:
        raise ManifestError(f"Job {record.job_id} failed in its run ({'; '.join(record.reasons) or 'no reason recorded'}); "
                            "it has no image to reproduce. Rerun the run to retry it.")
    return record


def model_reference(identity: str, override: str | None) -> str:
    """The ``--model`` reference that loads the recorded model identity."""
    if override:
        return override
    if identity.startswith(f"{TINY_RANDOM}/"):
        return TINY_RANDOM
    if identity.startswith(f"{SIMULATED}/"):
        return f"{SIMULATED}:0"  # draws the same pixels whatever its seconds per image
    if identity.startswith("local:"):
        raise ModelError(
            f"The job was made with a local model folder ({identity}); its path is not in the manifest. "
            "Pass the folder with --model /path/to/folder (its config hash is checked against the record)."
        )
    return identity


@dataclass(frozen=True)
class OutputComparison:
    """One output of the job: the original (per the manifest and in the run's folder) against its reproduction."""

    preset: str
    path: str
    byte_identical: bool  # the reproduction has the manifest's SHA-256
    pixel_identical: bool | None = None  # None when the original file is not at hand
    psnr_db: float | None = None  # inf when the pixels are identical
    hash_distance: int | None = None  # of 64 perceptual hash bits
    note: str = ""
    original: Literal["intact", "missing", "altered"] = "intact"  # the file in the run's folder, against the manifest

    def describe(self) -> str:
        if self.byte_identical and self.original == "missing":
            return "byte-identical to the manifest's SHA-256 (the original is not in the run's folder to compare)"
        if self.byte_identical and self.original == "altered":
            against = f" (PSNR {self.psnr_db:.1f} dB against it)" if self.psnr_db is not None else ""
            return ("matches the manifest's SHA-256, but the file in the run's folder no longer does: it was altered "
                    f"or replaced after the run{against}")
        if self.byte_identical:
            return "byte-identical"
        if self.pixel_identical:
            return f"pixel-identical, bytes differ ({self.note or 'metadata'})"
        if self.psnr_db is not None:
            return f"differs: PSNR {self.psnr_db:.1f} dB, perceptual hash distance {self.hash_distance}/64" + (f" ({self.note})" if self.note else "")
        return f"differs ({self.note})"


@dataclass
class ReproduceReport:
    """What reproducing one job found."""

    job_id: str
    model: str
    model_reference: str
    device: str
    recorded_device: str
    batch_size: int
    background: str | None
    outputs: list[OutputComparison] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)  # versions, device, model identity
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def byte_identical(self) -> bool:
        return bool(self.outputs) and all(o.byte_identical for o in self.outputs)

    @property
    def exit_code(self) -> int:
        """0 when every output is byte- or pixel-identical and no original in the run's folder was altered, 1 otherwise."""
        same = all((o.byte_identical or o.pixel_identical) and o.original != "altered" for o in self.outputs)
        return 0 if self.outputs and same else 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["byte_identical"] = self.byte_identical
        for output in data["outputs"]:
            if output["psnr_db"] == math.inf:
                output["psnr_db"] = "inf"
        return data


def job_for(record: ManifestRecord, background: str) -> Job:
    """The job the record describes (presets from its outputs)."""
    fields = {name: getattr(record, name) for name in Job.__dataclass_fields__ if name not in ("presets", "background")}
    # A rejected job keeps the files of the presets it could frame (under rejected/) and, when none
    # could be framed, only the raw image: its presets are then unknown, and png stands in.
    presets = tuple(o.preset for o in record.outputs if o.preset != "rejected") or ("png",)
    return Job(**fields, presets=presets, background=background)


class _Collect:
    """A store that keeps files in memory (to compare before anything is written)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def write(self, relpath: str, data: bytes) -> Written:
        self.files[relpath] = data
        return Written(relpath, hashlib.sha256(data).hexdigest(), len(data))


def reproduce(record: ManifestRecord, engine, originals: Location, repro_out: str | Path) -> ReproduceReport:
    """Regenerate the job on ``engine``, compare with the record (and originals), write the files."""
    from .shard import Generated, finish

    start = time.perf_counter()
    report = ReproduceReport(record.job_id, record.model, "", engine.device, record.device, record.batch_size,
                             record.background)
    report.model_reference = engine.model.source if engine.model.kind != "tiny" else TINY_RANDOM
    if engine.model.identity != record.model:
        report.differences.append(f"model {record.model} (recorded) vs {engine.model.identity} (used)")
    if engine.device.split(":")[0] != record.device.split(":")[0]:
        report.differences.append(f"device {record.device} (recorded) vs {engine.device} (here)")
    precision = engine.options.precision_label(engine.device)
    if record.precision is not None and record.precision != precision:
        report.differences.append(f"precision {record.precision} (recorded) vs {precision} (here)")
    current = library_versions()
    for name in sorted(set(record.versions) | set(current)):
        if record.versions.get(name) != current.get(name):
            report.differences.append(f"{name} {record.versions.get(name, 'absent')} (recorded) vs {current.get(name, 'absent')} (here)")

    _refuse_overwrite(repro_out, {o.path: o.sha256 for o in record.outputs if not outside(o.path)})  # before the work
    base = job_for(record, record.background or "scene")
    image = engine.generate([base] * record.batch_size, [record.image_seed] * record.batch_size)[0]
    sealer = Sealer(record.stamp().software)
    backgrounds = [record.background] if record.background else (["white"] if record.status == "rejected" else ["scene", "white"])
    best: tuple[float, list[OutputComparison], _Collect, str] | None = None
    for background in backgrounds:  # a v1 record does not say; try each and keep the closest
        store = _Collect()
        item = Generated(job_for(record, background), image, [Attempt(seed=record.image_seed, outcome="ok")], None,
                         record.batch_size, 0.0)
        produced, _ = finish(item, store, engine.device, sealer=sealer, precision=precision)
        comparisons = [_compare(o.preset, o.path, o.sha256, store.files.get(o.path), originals, produced, record)
                       for o in record.outputs]
        score = sum(math.inf if c.byte_identical or c.pixel_identical else (c.psnr_db or 0.0) for c in comparisons)
        if best is None or score > best[0]:
            best = (score, comparisons, store, background)
    _, report.outputs, store, report.background = best
    _refuse_overwrite(repro_out, {path: hashlib.sha256(data).hexdigest() for path, data in store.files.items()})
    target = LocalStore(repro_out)
    for path, data in store.files.items():
        if not (Path(repro_out) / path).is_file():  # one already there has these very bytes: it stays as it is
            target.write(path, data)
        report.written.append(path)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _refuse_overwrite(repro_out: str | Path, files: dict[str, str]) -> None:
    """OutputError when ``--out`` already holds any of ``files`` (path: SHA-256) with other bytes."""
    clashes = []
    for path, sha256 in files.items():
        existing = Path(repro_out) / path
        try:
            if existing.is_file() and hashlib.sha256(existing.read_bytes()).hexdigest() != sha256:
                clashes.append(path)
        except OSError:  # e.g. a recorded name too long for the file system: nothing there to overwrite
            continue
    if clashes:
        raise OutputError(f"--out {repro_out} already holds {clashes[0]} ({len(clashes)} file(s) in all) with other bytes "
                          "than the reproduction's; reproduce does not overwrite files. Choose an empty folder for --out, "
                          "or move those files away first.")


def _compare(preset: str, path: str, sha256: str, new: bytes | None, originals: Location, produced: ManifestRecord,
             record: ManifestRecord) -> OutputComparison:
    if new is None:
        instead = next((o.path for o in produced.outputs if o.preset == preset), None)
        if instead is not None:
            note = (f"the reproduction wrote {instead}, not the recorded path: the record's path does not follow from "
                    "its sku, template and variant")
        else:
            note = f"the reproduction has no {preset} file: it came out {produced.status}, the record says {record.status}"
        return OutputComparison(preset, path, False, note=note)
    byte_identical = hashlib.sha256(new).hexdigest() == sha256
    try:
        original = originals.read(path)
    except OSError:
        original = None
    if original is None:
        note = "" if byte_identical else "the original is not in the run's folder; compared by SHA-256 only"
        return OutputComparison(preset, path, byte_identical, note=note, original="missing")
    intact = hashlib.sha256(original).hexdigest() == sha256
    if byte_identical and intact:
        return OutputComparison(preset, path, True, True, math.inf, 0)
    note = "" if intact else "the original file no longer matches its manifest hash"
    state = "intact" if intact else "altered"
    a, b = _pixels(original), _pixels(new)
    if a.shape != b.shape:
        size = f"size {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}"
        return OutputComparison(preset, path, byte_identical, False, note=f"{note}; {size}" if note else size,
                                original=state)
    same = bool(np.array_equal(a, b))
    return OutputComparison(preset, path, byte_identical, same, psnr(a, b), hash_distance(a, b),
                            note or ("C2PA signature or metadata" if same else ""), state)


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def perceptual_hash(pixels: np.ndarray) -> int:
    """A 64-bit DCT perceptual hash: the 8x8 lowest frequencies of a 32x32 grey image, above or below their median."""
    from PIL import Image
    from scipy.fft import dctn

    grey = np.asarray(Image.fromarray(pixels).convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Hamming distance of the perceptual hashes of two images (0..64; under ~6 looks the same)."""
    return bin(perceptual_hash(a) ^ perceptual_hash(b)).count("1")


def check_repro_out(out: str | Path, repro_out: str | Path) -> None:
    """Refuse a --out that is, or is inside, the run's folder (it would add files verify calls stray), or
    that is another run's folder (its delivered files would be replaced)."""
    out_path, repro_path = Path(out).resolve(), Path(repro_out).resolve()
    if repro_path == out_path or out_path in repro_path.parents:
        raise ManifestError(f"--out {repro_out} is inside the run's folder {out}; reproductions there would look like "
                            "stray files to verify. Choose a folder outside it, e.g. --out repro/.")
    marks = [name for name in (MANIFEST, LOCK, PARTS) if (Path(repro_out) / name).exists()]
    if marks:
        raise OutputError(f"--out {repro_out} is the folder of a run (it holds {marks[0]}); reproductions would replace "
                          "its delivered files. Choose an empty folder outside any run, e.g. --out repro/.")
    check_folder(repro_out)  # OutputError when it is (or lies under) a file, or cannot be written


def format_report(report: ReproduceReport) -> str:
    """The report as a person reads it."""
    lines = [
        f"Reproduced job {report.job_id} with model {report.model_reference} on {report.device} "
        f"(recorded: {report.model} on {report.recorded_device}), batch of {report.batch_size} as recorded, "
        f"background {report.background or 'unknown'}, in {report.seconds:.1f} s."
    ]
    for output in report.outputs:
        lines.append(f"  {output.preset:<12} {output.path}: {output.describe()}")
    if report.differences:
        lines.append("Differences from the recorded run: " + "; ".join(report.differences) + ".")
    else:
        lines.append("Same versions and device as the recorded run.")
    count = f"{len(report.outputs)} output(s)"
    altered = sum(o.original == "altered" for o in report.outputs)
    missing = sum(o.original == "missing" for o in report.outputs)
    if report.exit_code == 0:
        verdict = "BYTE-IDENTICAL" if report.byte_identical else "PIXEL-IDENTICAL"
        if missing:
            count += (f", to the manifest's SHA-256 only: {missing} original(s) not in the run's folder to compare"
                      if report.byte_identical else f"; {missing} original(s) not in the run's folder")
    elif report.byte_identical and altered:
        verdict = "ORIGINAL ALTERED"
        count += (f" match the manifest's SHA-256, but {altered} file(s) in the run's folder no longer do "
                  "(altered or replaced after the run)")
    else:
        verdict = "DIFFERENT"
        if altered:
            count += f"; {altered} original(s) in the run's folder no longer match the manifest either"
    lines.append(f"{verdict}: {count}; reproductions written under the --out folder.")
    return "\n".join(lines)


def check_model(record: ManifestRecord, override: str | None) -> str:
    """Resolve the model reference without loading it (ModelError for a bad local path)."""
    reference = model_reference(record.model, override)
    resolve_model(reference)
    return reference

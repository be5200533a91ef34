"""The provenance manifest: one record per job, appended as work finishes.

While a run goes, each shard appends one JSON line per finished job to its own part file,
``OUT/.parts/<shard>.jsonl``, flushed and fsynced as it is written, so a crash (or a killed
worker) loses at most the line being written: a torn line is ignored on load and the job is
redone. When the run ends the parts are folded into ``OUT/manifest.jsonl`` with exactly one
record per job (the newest), and ``OUT/manifest.parquet`` is written with a fixed column schema.

Every record follows ``zimage_batch/manifest.schema.json`` (JSON Schema; ``schema_version`` in each
record). Records are checked against it as they are appended, and ``load_records`` (for verify
and reproduce) refuses a manifest with any line that does not follow it. Version 2 added
``background``; version 3 the delivery fields (``delivery``, ``delivery_error`` and the outputs'
``uri``, ``etag``, ``checksum_crc32``); version 4 ``precision``. Older records still load.
"""

from __future__ import annotations

import io
import json
import os
import platform
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from . import crashpoints
from .errors import ManifestError
from .plan import Job
from .provenance import Stamp, software_name
from .store import LocalStore, fsync_dir, write_atomic

MANIFEST = "manifest.jsonl"
MANIFEST_PARQUET = "manifest.parquet"
# manifest.parquet's extra column: whether a record's job is one the last run planned, i.e. the catalog's
# image now (not one of a product since changed or removed, whose files are kept)
CURRENT = "current"
PARTS = ".parts"
RUN_JSON = "run.json"  # the run's summary, beside the manifest
REPORT_HTML = "report.html"  # the run's contact sheet
SCHEMA_VERSION = 5
SCHEMA_PATH = Path(__file__).resolve().parent / "manifest.schema.json"  # shipped with the package


class OutputFile(BaseModel):
    """One delivered file of a job; ``uri``, ``etag`` and ``checksum_crc32`` are set once S3 acknowledged it."""

    preset: str
    path: str
    sha256: str
    bytes: int
    width: int
    height: int
    format: str
    uri: str | None = None
    etag: str | None = None
    checksum_crc32: str | None = None  # as S3 returned it (base64), after checking it against ours
    mtime_ns: int | None = None  # set when written; lets a rerun trust the file without hashing it


class Attempt(BaseModel):
    """One generation attempt: the seed used and what came of it ("ok", "black", "blank", ...)."""

    seed: int
    outcome: str


class ManifestRecord(BaseModel):
    """Everything needed to reproduce and audit one job's images."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    status: Literal["ok", "rejected", "failed"]
    reasons: list[str] = []
    sku: str
    catalog: str
    row: int
    template: str
    template_path: str
    template_sha256: str
    variant: int
    prompt: str
    negative_prompt: str
    seed: int
    image_seed: int | None
    steps: int
    guidance_scale: float
    width: int
    height: int
    max_sequence_length: int
    model: str
    background: str | None = None  # schema v2; None in v1 records
    attempts: list[Attempt]
    outputs: list[OutputFile]
    batch_size: int
    device: str
    precision: str | None = None  # schema v4: e.g. "bf16", "bf16+int8-weights"; None in older records
    worker: str = ""
    seconds: float
    versions: dict[str, str]
    created_at: str
    delivery: Literal["delivered", "conflict", "failed"] | None = None  # None: no --dest, or not tried yet
    delivery_error: str | None = None
    c2pa_signer: str | None = None  # schema v5: "sha256:<hex>" of the certificate that signed its files; None: unsigned

    @classmethod
    def for_job(cls, job: Job, **fields) -> ManifestRecord:
        """A record carrying the job's fields plus the run's results."""
        base = job.to_dict()
        del base["presets"]
        return cls(**base, versions=library_versions(), created_at=utc_now(), **fields)

    def stamp(self) -> Stamp:
        """The provenance its files carry (for a record with an image: status "ok" or "rejected")."""
        if self.image_seed is None:
            raise ValueError(f"job {self.job_id} has no image (status {self.status})")
        return Stamp.of(self.model_dump(), self.image_seed, software_name(self.versions.get("zimage-batch", "unknown")))


def utc_now() -> str:
    """Current UTC time, ISO 8601 with a Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the images."""
    versions = {"python": platform.python_version()}
    for name in ("zimage-batch", "torch", "diffusers", "transformers", "Pillow", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_records(path: Path, strict: bool = False) -> tuple[list[ManifestRecord], int]:
    """The records of a JSONL file and how many lines were unreadable (torn by a crash). ``strict``
    (for ``manifest.jsonl``, which is only ever replaced whole): a ManifestError naming the unreadable
    lines instead, so no record is dropped without a word; only a last line without its line break
    (torn while versions before 0.1 appended to this file) is still taken for a crash's."""
    records, bad, ignored = [], [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                records.append(ManifestRecord.model_validate_json(raw.decode("utf-8")))
            except (UnicodeDecodeError, ValidationError):
                torn = not raw.endswith(b"\n") and not f.peek(1)  # the last line, cut short
                if strict and not torn:
                    bad.append(number)
                else:
                    ignored += 1  # a torn line from a crash: the job is simply redone
    if bad:
        lines = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ManifestError(
            f"{path} has {len(bad)} line(s) that are not manifest records (line {lines}). A run replaces this "
            f"file whole, so this is damage, not a crash, and the run stops rather than lose those records: "
            f"restore the file from a backup (or the copy a --dest run published), or delete those lines to "
            f"have their jobs redone. `zimage-batch verify` shows what each line breaks."
        )
    return records, ignored


def signed_otherwise(record: ManifestRecord, signed_by: str | None) -> bool:
    """True when the record's files are C2PA-signed otherwise than ``signed_by`` (None: unsigned).
    Records before schema 5 do not say how they were signed: never (an upgrade makes nothing again)."""
    return record.schema_version >= 5 and record.c2pa_signer != signed_by


def record_done(record: ManifestRecord | None, job: Job, store: LocalStore, verify: bool = False,
                signed_by: str | None = None) -> bool:
    """True when the record finished the job ("ok" or "rejected"), its files are there, unaltered
    (size and mtime as recorded, else the SHA-256; ``verify``: always the SHA-256), and they are
    signed as this run signs (``signed_by``: the certificate's fingerprint, None: unsigned)."""
    if record is None or record.status == "failed" or signed_otherwise(record, signed_by):
        return False
    if record.status == "ok" and not set(job.presets) <= {o.preset for o in record.outputs}:
        return False
    return all(store.holds(o.path, o.sha256, o.bytes, o.mtime_ns, verify) for o in record.outputs)


class ManifestPart:
    """One shard's records, appended durably to ``OUT/.parts/<name>.jsonl`` by whichever process
    runs the shard. A shard that is retried (its worker died) finds what it already finished here."""

    def __init__(self, out: str | Path, name: str):
        self.path = Path(out) / PARTS / f"{name}.jsonl"
        self._file: io.TextIOWrapper | None = None
        self._lock = threading.Lock()

    def records(self) -> dict[str, ManifestRecord]:
        """Records already written to this part (by an earlier attempt of the shard)."""
        if not self.path.is_file():
            return {}
        return {r.job_id: r for r in read_records(self.path)[0]}

    def append(self, record: ManifestRecord) -> None:
        """Check a record against the schema, add it and make it durable before returning."""
        line = record.model_dump_json()
        problems = schema_problems(json.loads(line))
        if problems:
            raise ValueError(f"manifest record {record.job_id} does not follow {SCHEMA_PATH.name}: {'; '.join(problems)}")
        line += "\n"
        with self._lock:
            if self._file is None:
                self._file = self._open()
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def _open(self) -> io.TextIOWrapper:
        """The part, opened to append. An earlier attempt killed mid-line left a torn last line: it is
        ended first, so the torn line stays one unreadable line and the next record is whole."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        file = open(self.path, "a", encoding="utf-8")
        if file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                file.write("\n")
        if created:  # the new name itself must survive a power cut, like the records in it
            fsync_dir(self.path.parent)
        return file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class Manifest:
    """The records of one output folder: ``manifest.jsonl`` plus the part files of a run in progress.

    Records in parts win over ``manifest.jsonl`` (they are newer), later lines over earlier ones.
    ``part_records`` holds what the shard parts held when loaded: the current run's work, since a
    run starts by folding older parts into ``manifest.jsonl`` (``compact``).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.records: dict[str, ManifestRecord] = {}
        self.part_records: dict[str, ManifestRecord] = {}
        self.ignored_lines = 0
        self._local: ManifestPart | None = None
        if self.path.is_file():
            self._add(self.path, into_parts=False, strict=True)
        for part in self.part_files():
            self._add(part, into_parts=part.name.startswith("shard-"))  # not uploads of earlier runs' work

    def _add(self, path: Path, into_parts: bool, strict: bool = False) -> None:
        records, ignored = read_records(path, strict)
        self.ignored_lines += ignored
        for record in records:
            self.records[record.job_id] = record
            if into_parts:
                self.part_records[record.job_id] = record

    def part_files(self) -> list[Path]:
        return sorted((self.out / PARTS).glob("*.jsonl"))

    def is_done(self, job: Job, store: LocalStore, verify: bool = False, signed_by: str | None = None) -> bool:
        """True when the job finished ("ok" or "rejected"), its files are there, unaltered, signed as asked."""
        return record_done(self.records.get(job.job_id), job, store, verify, signed_by)

    def append(self, record: ManifestRecord) -> None:
        """Add a record (to this process's own part) and make it durable before returning."""
        if self._local is None:
            self._local = ManifestPart(self.out, f"local-{os.getpid()}")
        self._local.append(record)
        self.records[record.job_id] = record
        self.part_records[record.job_id] = record

    def close(self) -> None:
        if self._local is not None:
            self._local.close()

    def compact(self) -> None:
        """Fold the part files into ``manifest.jsonl`` (one record per job), then delete them."""
        self.close()
        parts = self.part_files()
        if not parts:
            return
        lines = "".join(r.model_dump_json() + "\n" for r in self.records.values())
        write_atomic(self.path, lines.encode("utf-8"))
        crashpoints.reached("manifest.compacted")
        for part in parts:  # after the rename: a crash in between only means merging again
            part.unlink(missing_ok=True)
        try:
            (self.out / PARTS).rmdir()
        except OSError:  # another process is writing a part right now
            pass
        self.part_records = {}

    def finalize(self, current: set[str] | None = None, templates: set[str] = frozenset()) -> dict[str, bool | None]:
        """Compact, then write the Parquet copy, whose ``current`` column is ``current_flags`` of the
        records, carrying over what the last copy said. Returns that column (job id -> flag)."""
        self.compact()
        if not self.records:
            return {}
        flags = current_flags(self.records.values(), current, templates, current_column(self.out / MANIFEST_PARQUET) or {})
        write_atomic(self.out / MANIFEST_PARQUET, to_parquet_bytes(list(self.records.values()), flags))
        return flags


def current_column(source) -> dict[str, bool | None] | None:
    """The current column of a manifest.parquet (a path or a file object): job id -> flag. None when
    there is none, or it is from before the column, or it cannot be read: nothing to carry over."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source, columns=["job_id", CURRENT], use_threads=False)  # threads: see verify.deleted_records
    except Exception:  # missing, an older schema, or damaged
        return None
    return dict(zip(table.column("job_id").to_pylist(), table.column(CURRENT).to_pylist()))


def current_flags(records: Iterable[ManifestRecord], current: set[str] | None, templates: set[str],
                  before: Mapping[str, bool | None]) -> dict[str, bool | None]:
    """manifest.parquet's ``current`` column: for records of ``templates``, whether ``current`` (the job
    ids a run planned from the whole catalog) holds them; for other templates' records, and when
    ``current`` is None (a partial plan), what ``before`` says (null where it says nothing)."""
    return {r.job_id: (r.job_id in current if current is not None and r.template in templates else before.get(r.job_id))
            for r in records}


def parquet_schema():
    """The fixed Arrow schema of manifest.parquet."""
    import pyarrow as pa

    output = pa.struct([("preset", pa.string()), ("path", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                        ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("uri", pa.string()),
                        ("etag", pa.string()), ("checksum_crc32", pa.string()), ("mtime_ns", pa.int64())])
    attempt = pa.struct([("seed", pa.int64()), ("outcome", pa.string())])
    fields = []
    for name, info in ManifestRecord.model_fields.items():
        kind = {
            "reasons": pa.list_(pa.string()), "attempts": pa.list_(attempt), "outputs": pa.list_(output),
            "versions": pa.map_(pa.string(), pa.string()),
        }.get(name)
        if kind is None:
            ann = info.annotation
            kind = pa.int64() if ann in (int, int | None) else pa.float64() if ann is float else pa.string()
        fields.append((name, kind))
    fields.append((CURRENT, pa.bool_()))  # not a record field: the run's view of which records are the catalog's now
    return pa.schema(fields)


def to_parquet_bytes(records: list[ManifestRecord], current: Mapping[str, bool | None] | None = None) -> bytes:
    """Records as a Parquet file (bytes), with the fixed schema; the ``current`` column from ``current``
    (job id -> flag; null for a job it does not name, and throughout when it is None)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in records:
        row = record.model_dump()
        row["versions"] = list(row["versions"].items())
        row[CURRENT] = None if current is None else current.get(record.job_id)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=parquet_schema())
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@cache
def _validator():
    import jsonschema

    try:
        schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"The manifest schema {SCHEMA_PATH} cannot be read ({exc.strerror}). "
                            "Reinstall zimage-batch from its source folder (pip install -e .).") from None
    return jsonschema.Draft202012Validator(schema)


def schema_problems(data: object) -> list[str]:
    """Where ``data`` breaks the manifest schema (empty when it follows it)."""
    problems = []
    for error in sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path)
        problems.append(f"{where}: {error.message}" if where else error.message)
    return problems


def load_records(text: str, source: str) -> dict[str, ManifestRecord]:
    """Every record of a manifest's text, newest per job; ManifestError if any line breaks the schema."""
    records: dict[str, ManifestRecord] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        found = schema_problems(data)
        if found:
            problems.append(f"line {number}: " + "; ".join(found[:5]))
            continue
        record = ManifestRecord.model_validate(data)
        records[record.job_id] = record
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more." if len(problems) > 20 else ""
        raise ManifestError(
            f"{source} does not follow the manifest schema ({SCHEMA_PATH.name}, versions 1..{SCHEMA_VERSION}) "
            f"in {len(problems)} line(s); nothing was checked or written. Restore the manifest that the run "
            f"wrote, or rerun the job to rewrite it:\n{shown}{more}"
        )
    if not records:
        raise ManifestError(f"{source} has no records. Point at an output folder of a finished `zimage-batch run`.")
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a manifest.jsonl as plain dicts (for tools and tests)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

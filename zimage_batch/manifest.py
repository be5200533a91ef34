"""The provenance manifest: one record per job, appended as work finishes.

``OUT/manifest.jsonl`` gets one JSON line per finished job, flushed and fsynced as it is
written, so a crash loses at most the line being written (a torn last line is ignored on
load and the job is redone). When a run ends the file is rewritten with exactly one record per
job (the newest), and ``OUT/manifest.parquet`` is written with a fixed column schema.
"""

from __future__ import annotations

import io
import json
import os
import platform
import threading
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from .plan import Job
from .store import LocalStore, write_atomic

MANIFEST = "manifest.jsonl"
MANIFEST_PARQUET = "manifest.parquet"
SCHEMA_VERSION = 1


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
    attempts: list[Attempt]
    outputs: list[OutputFile]
    batch_size: int
    device: str
    seconds: float
    versions: dict[str, str]
    created_at: str
    delivery: Literal["delivered", "conflict", "failed"] | None = None  # None: no --dest, or not tried yet
    delivery_error: str | None = None

    @classmethod
    def for_job(cls, job: Job, **fields) -> ManifestRecord:
        """A record carrying the job's fields plus the run's results."""
        base = job.to_dict()
        del base["presets"], base["background"]
        return cls(**base, versions=library_versions(), created_at=utc_now(), **fields)


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


class Manifest:
    """The records of one output folder, loaded from disk and appended to as jobs finish."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / MANIFEST
        self.records: dict[str, ManifestRecord] = {}
        self.ignored_lines = 0
        self._file: io.TextIOWrapper | None = None
        self._lock = threading.Lock()
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = ManifestRecord.model_validate_json(line)
                except ValidationError:
                    self.ignored_lines += 1  # a torn line from a crash: the job is simply redone
                    continue
                self.records[record.job_id] = record

    def is_done(self, job: Job, store: LocalStore) -> bool:
        """True when the job finished ("ok" or "rejected") and its files are there, unaltered."""
        record = self.records.get(job.job_id)
        if record is None or record.status == "failed":
            return False
        if record.status == "ok" and not set(job.presets) <= {o.preset for o in record.outputs}:
            return False
        return all(store.holds(o.path, o.sha256) for o in record.outputs)

    def append(self, record: ManifestRecord) -> None:
        """Add a record and make it durable before returning."""
        line = record.model_dump_json() + "\n"
        with self._lock:
            if self._file is None:
                self.out.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.records[record.job_id] = record

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def finalize(self) -> None:
        """Rewrite the JSONL with one record per job and write the Parquet copy."""
        self.close()
        if not self.records:
            return
        lines = "".join(r.model_dump_json() + "\n" for r in self.records.values())
        write_atomic(self.path, lines.encode("utf-8"))
        write_atomic(self.out / MANIFEST_PARQUET, to_parquet_bytes(list(self.records.values())))


def parquet_schema():
    """The fixed Arrow schema of manifest.parquet."""
    import pyarrow as pa

    output = pa.struct([("preset", pa.string()), ("path", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
                        ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("uri", pa.string()),
                        ("etag", pa.string()), ("checksum_crc32", pa.string())])
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
    return pa.schema(fields)


def to_parquet_bytes(records: list[ManifestRecord]) -> bytes:
    """Records as a Parquet file (bytes), with the fixed schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in records:
        row = record.model_dump()
        row["versions"] = list(row["versions"].items())
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=parquet_schema())
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a manifest.jsonl as plain dicts (for tools and tests)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

"""Check delivered files against their manifest: present, unaltered, and carrying their provenance.

For every output of every record: the path stays inside the run's folder, the file is there, its
SHA-256 is the manifest's, its embedded XMP (IPTC DigitalSourceType) and A1111 parameters agree with
every field of the record's stamp (prompt, seeds, settings, model, ...), and a C2PA manifest, when the
file has one, validates and its generation assertion agrees the same way. Files that no record lists
are reported too, and so are records deleted from a folder's manifest.jsonl that its manifest.parquet
(written at the end of each run) still holds: zimage-batch never removes a record. A run still writing
to the location, or stopped before it finished, is refused first. Reads only; writes nothing.

Where the files are is a ``Location`` (read one file, list all files): ``LocalFolder`` for a
run's ``--out`` folder, ``S3Prefix`` for what a run delivered to ``s3://bucket/prefix``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from .errors import DeliveryError, ManifestError, SigningError
from .manifest import MANIFEST, MANIFEST_PARQUET, REPORT_HTML, RUN_JSON, ManifestRecord, load_records
from .provenance import disagreements, read_embedded
from .signing import check_trust_anchors
from .store import LOCK, STOP_FILE_PREFIX, lock_holder

PARTS = ".parts/"  # per-shard manifest parts of a run in progress (the Dask scale-out writes them)
SIDECAR = ".json"  # at a destination, each delivered file's record beside it: <file>.json
BOOKKEEPING = frozenset({MANIFEST, MANIFEST_PARQUET, RUN_JSON, REPORT_HTML, LOCK})

Kind = Literal["missing", "altered", "stripped", "metadata", "signature", "unreadable", "stray"]


class Location(Protocol):
    """Where a run's files are."""

    def describe(self) -> str:
        """How to name it in messages."""

    def read(self, relpath: str) -> bytes | None:
        """A file's bytes by path relative to the run's output root; None when it is not there (or
        ``relpath`` leads outside the root). OSError when it is there but cannot be read."""

    def list(self) -> Iterator[str]:
        """Every file's path relative to the root, "/"-separated."""


def outside(relpath: str) -> bool:
    """Whether a manifest path leads outside the run's folder (absolute, or with a '..' part)."""
    path = PurePosixPath(relpath)
    return path.is_absolute() or ".." in path.parts


class LocalFolder:
    """An output folder on this machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def read(self, relpath: str) -> bytes | None:
        if outside(relpath):
            return None
        path = self.root / relpath
        return path.read_bytes() if path.is_file() else None

    def list(self) -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            if path.is_file() or path.is_symlink() and not path.exists():  # a dangling link is a stray too
                yield path.relative_to(self.root).as_posix()


class S3Prefix:
    """A run delivered to ``s3://bucket/prefix`` (``--dest``), read with the standard AWS settings.

    ``list`` names every object under the prefix, the delivery's bookkeeping too (sidecars
    ``<file>.json``, ``manifest.parts/``): ``verify`` tells them apart. A request that fails raises DeliveryError.
    """

    def __init__(self, dest, client):
        self.dest, self.client = dest, client

    def describe(self) -> str:
        return str(self.dest)

    def read(self, relpath: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.dest.bucket, Key=self.dest.key(relpath))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self.error(exc) from None
        except BotoCoreError as exc:
            raise self.error(exc) from None

    def list(self) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        start = len(self.dest.key(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.dest.bucket, Prefix=self.dest.key(""))
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][start:]
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc) from None

    def error(self, exc: Exception) -> DeliveryError:
        """One paragraph: why the prefix cannot be read, at which endpoint, and what to check. Never a secret."""
        from .deliver import endpoint_of, s3_problem

        return DeliveryError(f"Cannot read {self.dest} (endpoint {endpoint_of(self.client)}) to verify it: "
                             + s3_problem(exc, self.dest.bucket, "s3:ListBucket and s3:GetObject"))


def open_location(target: str) -> Location:
    """The location ``target`` names: a local folder, or an ``s3://bucket/prefix`` a run delivered to."""
    if target.startswith("s3://"):
        return open_s3(target)
    path = Path(target)
    if not path.is_dir():
        raise ManifestError(f"{target} is not a folder. Pass the --out folder of a `zimage-batch run`, or s3://BUCKET/PREFIX.")
    return LocalFolder(path)


def open_s3(uri: str) -> S3Prefix:
    """The S3 prefix ``uri`` names, with a client from the standard AWS settings; DeliveryError naming a bad one."""
    from .deliver import S3Destination, connect

    try:
        dest = S3Destination.parse(uri)
    except DeliveryError as exc:  # a malformed URI is a bad path (exit 2), not an S3 prefix that cannot be read
        raise ManifestError(f"Cannot verify {uri}: {str(exc).removeprefix(f'--dest {uri!r}: ')}") from None
    try:
        return S3Prefix(dest, connect())
    except DeliveryError as exc:  # its messages speak of --dest; say what they mean here
        raise DeliveryError(f"Cannot verify {uri}: {str(exc).removeprefix(f'--dest {uri!r}: ')}") from None


def read_manifest(location: Location) -> dict[str, ManifestRecord]:
    """The location's manifest records (newest per job), checked against the schema."""
    source = f"{location.describe().rstrip('/')}/{MANIFEST}"
    try:
        data = location.read(MANIFEST)
    except OSError as exc:
        raise ManifestError(f"{source} cannot be read ({exc.strerror or exc}). Check its permissions, or pass the "
                            "--out folder of a `zimage-batch run`.") from None
    if data is None:
        what = ("the s3:// prefix a run delivered to (its --dest), and check the spelling" if isinstance(location, S3Prefix)
                else "the --out folder of a `zimage-batch run`")
        raise ManifestError(f"{source} does not exist. Pass {what}.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{source} is not UTF-8 text; it is not a manifest that zimage-batch wrote.") from None
    return load_records(text, source)


@dataclass(frozen=True)
class Finding:
    """One file that does not hold, and why."""

    path: str
    kind: Kind
    detail: str


@dataclass
class Report:
    """The outcome of a verification."""

    location: str
    records: int
    files: int = 0
    signed: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def verify(location: Location, trust_anchors: bytes | None = None) -> Report:
    """Check every output of every record in the location's manifest, then look for unlisted files."""
    if trust_anchors is not None:
        check_trust_anchors(trust_anchors)  # an empty trust file would otherwise require no signature at all
    paths = list(location.list())  # once: on S3 a listing is a request per 1,000 objects
    check_finished(location, paths)
    records = read_manifest(location)
    report = Report(location.describe(), len(records))
    listed = set()
    s3 = isinstance(location, S3Prefix)
    for record in records.values():
        if s3 and record.status != "ok":  # rejected images stay in the run's folder: never uploaded
            continue
        for output in record.outputs:
            listed.add(output.path)
            report.files += 1
            finding = check_output(location, record, output.path, output.sha256, trust_anchors, report)
            if finding is not None:
                report.findings.append(finding)
    for finding in deleted_records(location, records, listed):
        report.findings.append(finding)
    for path in paths:
        sidecar = s3 and path.endswith(SIDECAR) and path.removesuffix(SIDECAR) in listed
        stop_file = path.startswith(STOP_FILE_PREFIX)  # an interrupted run's, kept for its workers a while
        if path not in listed and path not in BOOKKEEPING and not sidecar and not stop_file:
            report.findings.append(Finding(path, "stray", "not in the manifest"))
    return report


def deleted_records(location: Location, records: dict[str, ManifestRecord], listed: set[str]) -> Iterator[Finding]:
    """A finding per file of each record that manifest.parquet holds and manifest.jsonl no longer does
    (their paths are added to ``listed``). Parquet is rewritten from manifest.jsonl when a run
    finishes (at a destination, from the same records right after manifest.jsonl) and no run removes
    a record, so such a record was deleted by hand since. One that cannot be read is a finding of its own."""
    try:
        data = location.read(MANIFEST_PARQUET)
    except OSError as exc:
        yield Finding(MANIFEST_PARQUET, "unreadable", f"cannot be read ({exc.strerror or exc})")
        return
    if data is None:
        return
    import pyarrow.parquet as pq

    try:
        # without threads: pyarrow 26's reader threads made the process abort at exit ("terminate called
        # without an active exception", exit 134) in most runs, after verify had printed its verdict
        rows = pq.read_table(io.BytesIO(data), columns=["job_id", "sku", "outputs"], use_threads=False).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged or foreign file
        yield Finding(MANIFEST_PARQUET, "unreadable", f"is not a manifest.parquet zimage-batch wrote ({type(exc).__name__})")
        return
    for row in rows:
        if row["job_id"] in records:
            continue
        for output in row["outputs"] or []:
            path = output["path"]
            listed.add(path)
            try:
                there = not outside(path) and location.read(path) is not None
            except OSError:
                there = True
            what = "still here" if there else "gone too"
            yield Finding(path, "missing", f"its record (job {row['job_id']}, sku {row['sku']}) was deleted from {MANIFEST}; "
                                           f"{MANIFEST_PARQUET} still holds it and the file is {what}. Restore "
                                           f"{MANIFEST} from a backup")


def check_finished(location: Location, paths: list[str]) -> None:
    """ManifestError when a run is still writing to the location, or stopped before it finished
    (``paths``: what ``location.list()`` names)."""
    holder = lock_holder(location.root) if isinstance(location, LocalFolder) else None
    if holder is not None:
        raise ManifestError(f"{location.describe()} is being written by a zimage-batch run right now ({holder}; it holds "
                            f"{LOCK}). Verify once that run has finished.")
    if isinstance(location, LocalFolder):
        parts = PARTS
    else:  # a destination's delivered records and in-flight markers not yet published
        from .deliver import PARTS as parts
    unfinished = [path for path in paths if path.startswith(parts)]
    if unfinished:
        raise ManifestError(f"{location.describe()} holds manifest parts of a run that has not finished ({unfinished[0]}, "
                            f"{len(unfinished)} in all): it is still running, or it stopped before it published its "
                            f"manifest. Rerun the same `zimage-batch run` command to finish it, then verify.")


def check_output(location: Location, record: ManifestRecord, path: str, sha256: str, trust_anchors: bytes | None,
                 report: Report) -> Finding | None:
    """Why one output a record lists does not hold, or None: its path and bytes, then ``check_file``."""
    if outside(path):
        return Finding(path, "missing", f"outside the run folder: the manifest record of job {record.job_id} names an "
                                        "absolute path or one with '..'; the record is damaged (restore manifest.jsonl)")
    try:
        data = location.read(path)
    except OSError as exc:  # e.g. a name too long for the file system, or no permission
        return Finding(path, "unreadable", f"cannot be read ({exc.strerror or exc})")
    return check_file(record, path, sha256, data, trust_anchors, report)


def check_file(record: ManifestRecord, path: str, sha256: str, data: bytes | None, trust_anchors: bytes | None,
               report: Report) -> Finding | None:
    """Why one output file does not hold, or None."""
    if data is None:
        return Finding(path, "missing", "missing")
    if record.image_seed is None:  # the schema allows it; only a failed job, which has no files, should have it
        return Finding(path, "metadata", f"the manifest record of job {record.job_id} lists this file but has no "
                                         f"image_seed (status {record.status}); the record is damaged "
                                         "(restore manifest.jsonl)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        embedded = read_embedded(data)
    except Exception as exc:  # Pillow raises many types for a damaged file
        embedded = None
        unreadable = f"{type(exc).__name__}: {exc}"
    if digest != sha256:
        what = f"SHA-256 {digest[:12]}... differs from the manifest's {sha256[:12]}..."
        if embedded is None:
            return Finding(path, "altered", f"altered: {what}; the file no longer reads as an image ({unreadable[:120]})")
        if embedded.empty:
            return Finding(path, "stripped", f"metadata stripped: no XMP and no A1111 parameters; {what}")
        problems = disagreements(embedded, record.stamp())
        extra = f"; embedded metadata: {'; '.join(problems)}" if problems else ""
        return Finding(path, "altered", f"altered: {what}{extra}")
    if embedded is None:
        return Finding(path, "unreadable", f"matches the manifest's SHA-256 but does not read as an image ({unreadable[:120]})")
    if record.schema_version < 2 and embedded.empty:
        return Finding(path, "metadata", "no embedded provenance: written by a run before provenance was embedded (manifest schema v1)")
    problems = disagreements(embedded, record.stamp())
    if problems:
        return Finding(path, "metadata", "embedded metadata does not match the manifest: " + "; ".join(problems))
    return _check_signature(record, path, data, trust_anchors, report)


def _check_signature(record: ManifestRecord, path: str, data: bytes, trust_anchors: bytes | None,
                     report: Report) -> Finding | None:
    from .signing import c2pa_problems, has_c2pa, read_c2pa

    signed = has_c2pa(data)
    if record.schema_version >= 5 and bool(record.c2pa_signer) != signed:  # records before v5 do not say
        said = f"signed it (certificate {record.c2pa_signer})" if record.c2pa_signer else "did not sign it"
        return Finding(path, "signature", f"{'no' if not signed else 'carries a'} C2PA signature, but the manifest "
                                          f"says the run {said}")
    if not signed and trust_anchors is None:
        return None
    try:
        check = read_c2pa(data, trust_anchors)
    except SigningError:
        return Finding(path, "signature", "carries a C2PA signature, but c2pa-python is not installed here to check it "
                                          "(pip install 'zimage-batch[c2pa]')")
    if check is None:
        required = trust_anchors is not None
        return Finding(path, "signature", "no C2PA signature, but --c2pa-trust asks for signed files") if required else None
    report.signed += 1
    problems = c2pa_problems(check, record.stamp(), trusted_only=trust_anchors is not None)
    return Finding(path, "signature", "; ".join(problems)) if problems else None


_LABELS = {"missing": "MISSING", "altered": "ALTERED", "stripped": "STRIPPED", "metadata": "METADATA",
           "signature": "SIGNATURE", "unreadable": "UNREADABLE", "stray": "STRAY"}


def format_report(report: Report) -> str:
    """The report as a person reads it: one line per bad file, then a summary line."""
    findings = sorted(report.findings, key=lambda f: (f.kind == "stray", f.path))
    lines = [f"{_LABELS[f.kind]:<10} {f.path}: {f.detail}" for f in findings]
    signed = f", {report.signed} C2PA-signed" if report.signed else ""
    checked = f"{report.files} file(s) of {report.records} manifest record(s) in {report.location}{signed}"
    if report.ok:
        lines.append(f"OK: {checked}: all present, unaltered, with their provenance.")
    else:
        bad = len({f.path for f in report.findings if f.kind != "stray"})
        stray = sum(f.kind == "stray" for f in report.findings)
        lines.append(f"FAILED: {checked}: {bad} bad file(s), {stray} file(s) not in the manifest.")
    return "\n".join(lines)

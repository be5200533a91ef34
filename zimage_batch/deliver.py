"""Delivery to S3 (or an S3-compatible store): images, a sidecar record per image, the run's manifest.

Layout under ``s3://BUCKET/PREFIX/``: ``images/<sku>/<template>/<file>`` (the same relative path as
under ``--out``) with ``<file>.json`` beside it holding the image's manifest record, then
``manifest.jsonl``, ``manifest.parquet`` (the same records with the ``current`` column) and
``run.json`` when the run ends. While the run goes, delivered records are
also written in small parts under ``manifest.parts/`` (the S3 counterpart of the local append-only
manifest); ``manifest.jsonl`` absorbs them at the end, and a run that died is resumed from them.
A shard first writes an in-flight marker there naming its jobs, and removes it once their records
are journaled: a shard killed in between leaves it, and the next run adopts those jobs' sidecars
(``recover``) instead of generating them again, even from a fresh ``--out``.

- Create-only: images and sidecars are PUT with ``If-None-Match: *``. A 412 means the key exists;
  it counts as delivered only when it holds our bytes (same size, CRC32 and ``sha256`` metadata),
  otherwise the job is a conflict and nothing is overwritten.
- Integrity: a file is re-hashed against its manifest record before upload and sent with its CRC32
  (a full-object CRC32 for multipart uploads, which boto3's transfer manager makes for big files);
  the server checks it. The manifest records the ETag and the checksum S3 returned.
- Retries: botocore's ``standard`` mode, then a bounded retry per object. A retry whose first try
  did land meets the 412 and the comparison above, so no object is ever written twice, and a job
  is reported delivered only after S3 acknowledged every one of its objects.
- Bounded: ``workers`` uploads run and at most ``queue`` records wait; ``submit`` blocks beyond
  that. Records hold paths, not bytes, so memory stays flat.
- Credentials come from boto3's standard chain (env vars, ``AWS_PROFILE``, instance roles) and
  the endpoint from ``AWS_ENDPOINT_URL``; no message or record ever holds a secret.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from . import crashpoints
from .errors import DeliveryError
from .manifest import (MANIFEST, MANIFEST_PARQUET, REPORT_HTML, RUN_JSON, SCHEMA_VERSION, ManifestRecord, OutputFile,
                       current_column, utc_now)
from .plan import Job

PARTS = "manifest.parts/"
MARKER = ".open"  # manifest.parts/<uploader>.open: the jobs a shard may deliver before it journals them
MARKER_TTL = 24 * 3600  # a marker older than this is a dead shard's, whatever it names
IMMUTABLE = "public, max-age=31536000, immutable"
NO_CACHE = "no-cache"
METADATA_LIMIT = 2048  # bytes of user metadata (keys + values) AWS allows per object
MIB = 1024 * 1024
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "AVIF": "image/avif",
                 "TIFF": "image/tiff", "GIF": "image/gif"}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_FATAL = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
          "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidBucketName", "403"}
_RETRYABLE = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "BadDigest", "IncompleteBody",
              "XAmzContentSHA256Mismatch", "RequestTimeTooSkewed", "OperationAborted"}
_BREAKER = 3  # this many jobs in a row failing on the connection or server means the destination is down
PUBLISH_TRIES = 5  # manifest.jsonl changed by another run between our read and our write: read, merge, write again


@dataclass(frozen=True)
class S3Destination:
    """``s3://bucket/prefix``: where a run's files go."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Destination:
        """Parse ``s3://bucket[/prefix]``; raise DeliveryError saying what is wrong and what would work."""
        example = "Use the form s3://BUCKET/PREFIX, e.g. s3://assets-bucket/catalog/2026-11-26."
        if not uri.startswith("s3://"):
            raise DeliveryError(f"--dest {uri!r} is not an S3 URI. {example}")
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise DeliveryError(f"--dest {uri!r}: {bucket!r} is not a valid bucket name (3-63 characters: lower-case "
                                f"letters, digits, dots and hyphens). {example}")
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise DeliveryError(f"--dest {uri!r}: the prefix has an empty, '.' or '..' part. {example}")
        return cls(bucket, prefix)

    def key(self, relpath: str) -> str:
        """The object key of a path relative to the destination."""
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def uri(self, relpath: str) -> str:
        return f"s3://{self.bucket}/{self.key(relpath)}"

    def __str__(self) -> str:
        return self.uri("").rstrip("/")


def connect(*, attempts: int = 3, pool: int = 16):
    """An S3 client from boto3's standard settings (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, env keys...).

    ``attempts`` is botocore's ``standard`` retry mode's total tries per request.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": attempts}, connect_timeout=10, read_timeout=60,
                    max_pool_connections=pool, signature_version="s3v4", request_checksum_calculation="when_supported",
                    response_checksum_validation="when_supported")
    with aws_settings():
        session = boto3.session.Session()
        return session.client("s3", region_name=session.region_name or "us-east-1", config=config)


@contextmanager
def aws_settings() -> Iterator[None]:
    """Turn botocore's errors about the environment's AWS settings into one DeliveryError naming the
    setting and the fix (never the value of AWS_ENDPOINT_URL: a URL can hold a password)."""
    from botocore.exceptions import BotoCoreError, ConfigParseError, InvalidRegionError, ProfileNotFound

    try:
        yield
    except ProfileNotFound as exc:
        why = (f"AWS_PROFILE names the profile {exc.kwargs.get('profile')!r}, which is defined in neither the AWS "
               "config file (AWS_CONFIG_FILE, default ~/.aws/config) nor the credentials file. Name a profile "
               "defined there, or unset AWS_PROFILE.")
    except ConfigParseError as exc:
        why = (f"{exc.kwargs.get('path')} is not a valid INI file. Fix it, or point AWS_CONFIG_FILE (default "
               "~/.aws/config) or AWS_SHARED_CREDENTIALS_FILE (default ~/.aws/credentials), whichever names it, "
               "at a valid one.")
    except InvalidRegionError as exc:
        why = f"{exc} Set AWS_REGION (or AWS_DEFAULT_REGION) to a region name such as eu-central-1."
    except ValueError:  # botocore's "Invalid endpoint: <value>"
        why = ("AWS_ENDPOINT_URL is not a URL botocore accepts. Set it to a whole URL, e.g. "
               "https://s3.eu-central-1.amazonaws.com or http://127.0.0.1:8333, or unset it for AWS itself.")
    except BotoCoreError as exc:
        why = f"{exc}. Check AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION and the AWS config and credentials files."
    else:
        return
    raise DeliveryError(f"The AWS settings in this environment cannot be used: {why}")


def check(uri: str) -> S3Destination:
    """Parse ``--dest`` and make one LIST request, so a wrong bucket, credential or endpoint fails before generation."""
    dest = S3Destination.parse(uri)
    uploader = Uploader(dest, connect(attempts=2), ".", workers=1)
    try:
        uploader.check()
    finally:
        uploader.close()
    return dest


def crc32_b64(data: bytes, value: int = 0) -> str:
    """CRC32 as S3 writes it: 4 big-endian bytes, base64."""
    return base64.b64encode(zlib.crc32(data, value).to_bytes(4, "big")).decode()


def object_metadata(record: ManifestRecord, output: OutputFile) -> dict[str, str]:
    """User metadata of an image: job id, seed and SHA-256 (the full record is in the sidecar)."""
    metadata = {"job-id": record.job_id, "seed": str(record.image_seed), "sha256": output.sha256, "preset": output.preset,
                "generator": "zimage-batch"}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    assert size <= METADATA_LIMIT, f"user metadata of {size} bytes exceeds AWS's {METADATA_LIMIT}"
    return metadata


def is_delivered(record: ManifestRecord | None, job: Job, dest: S3Destination) -> bool:
    """True when ``record`` says the job is done at ``dest``: rejected (never delivered), or every preset is there."""
    if record is None or record.status == "failed":
        return False
    if record.status == "rejected":
        return True
    return (record.delivery == "delivered" and set(job.presets) <= {o.preset for o in record.outputs}
            and all(o.uri == dest.uri(o.path) for o in record.outputs))


def newest(a: ManifestRecord | None, b: ManifestRecord) -> ManifestRecord:
    """Of two records of a job, the one to keep: a delivered one first, then the newer."""
    if a is None:
        return b
    return max(a, b, key=lambda r: (r.delivery == "delivered", r.created_at))


@dataclass
class DeliveryReport:
    """What delivery did in this process: jobs delivered, in conflict or failed, files and bytes sent."""

    delivered: int = 0
    conflicts: int = 0
    failed: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def add(self, other: DeliveryReport) -> None:
        for name in ("delivered", "conflicts", "failed", "files", "bytes", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems += other.problems[: max(0, 100 - len(self.problems))]


class _NotDelivered(Exception):
    """A job's upload did not happen. ``kind``: "failed", "conflict", or "skipped" (failed, already reported)."""

    def __init__(self, message: str, kind: str = "failed", cause: BaseException | None = None):
        super().__init__(message)
        self.kind, self.cause = kind, cause


class Uploader:
    """Uploads finished records to one destination from a bounded pool of threads."""

    def __init__(self, dest: S3Destination, client, root: str | Path, *, workers: int = 4, queue: int = 64,
                 attempts: int = 3, journal_every: int = 64, multipart_threshold: int = 8 * MIB,
                 on_result: Callable[[ManifestRecord], None] | None = None):
        from boto3.s3.transfer import TransferConfig

        self.dest, self.client, self.root = dest, client, Path(root)
        self.attempts, self.journal_every, self.on_result = attempts, journal_every, on_result
        self.report = DeliveryReport()
        self.remote: dict[str, ManifestRecord] = {}  # records read from the destination by read_records()
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=max(5 * MIB, multipart_threshold),
                                        max_concurrency=4)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="zb-upload")
        self._cond = threading.Condition()
        self._running = 0
        self._limit = workers + queue
        self._journal: list[ManifestRecord] = []
        self._parts_read: list[str] = []
        self._parts_written: list[str] = []
        self._markers_read: dict[str, float] = {}  # in-flight markers of other uploaders -> age in s (``recover``)
        self._foreign: dict[str, str] = {}  # job id -> a destination line this version cannot read, kept as it is
        self._manifest_etag: str | None = None  # manifest.jsonl's ETag when read_records read it; None: none there
        self._conditions: dict[str, dict[str, str]] = {}  # If-Match / If-None-Match for a mutable key's next write
        self.unconditional = False  # publish wrote manifest.jsonl without If-Match: the server lacks it
        self.problems: list[str] = []  # what publish could not do and the run should say (not a delivery failure)
        self._markers: list[str] = []  # this uploader's (see ``begin``)
        self._journal_failed = False
        self._run_id = f"{utc_now().replace(':', '').replace('-', '')}-{uuid.uuid4().hex[:8]}"
        self._fatal: str | None = None
        self._failures_in_a_row = 0
        self._mutable = {dest.key(k) for k in (MANIFEST, MANIFEST_PARQUET, RUN_JSON, REPORT_HTML)}  # the only keys ever overwritten
        # boto3's transfer manager passes no If-None-Match: add it where a multipart object comes into being.
        client.meta.events.register("before-parameter-build.s3.CompleteMultipartUpload", self._create_only)

    @property
    def endpoint(self) -> str:
        """The endpoint URL, without any user:password part."""
        return endpoint_of(self.client)

    def explain(self, exc: BaseException) -> str:
        """One paragraph: what failed, at which bucket and endpoint, and what to check. Never a secret."""
        return f"Cannot deliver to {self.dest} (endpoint {self.endpoint}): " + s3_problem(
            exc, self.dest.bucket, "s3:ListBucket, s3:GetObject and s3:PutObject")

    def check(self) -> None:
        """Fail fast, before any generation, when the bucket, credentials or endpoint are wrong (one LIST)."""
        try:
            self.client.list_objects_v2(Bucket=self.dest.bucket, Prefix=self.dest.key(""), MaxKeys=1)
        except Exception as exc:
            raise DeliveryError(self.explain(exc) + " Nothing was generated.") from None

    def read_records(self) -> dict[str, ManifestRecord]:
        """The destination's records (``manifest.jsonl`` plus parts of runs that did not finish), kept in ``remote``."""
        self._parts_read, self._markers_read, self._foreign = [], {}, {}
        try:
            manifest, self._manifest_etag = self._get(self.dest.key(MANIFEST))
            texts = [manifest]
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.dest.bucket, Prefix=self.dest.key(PARTS)):
                for item in page.get("Contents", []):
                    if item["Key"].endswith(MARKER):
                        if item["Key"] not in self._markers:
                            self._markers_read[item["Key"]] = time.time() - item["LastModified"].timestamp()
                        continue
                    self._parts_read.append(item["Key"])
                    texts.append(self._get(item["Key"])[0])
        except Exception as exc:
            raise DeliveryError(self.explain(exc)) from None
        for text in texts:
            for line in (text or "").splitlines():
                try:
                    record = ManifestRecord.model_validate_json(line)
                except ValidationError:
                    self._keep_foreign(line)  # a line we cannot read is work to redo, not a reason to stop
                    continue
                self.remote[record.job_id] = newest(self.remote.get(record.job_id), record)
                if record.schema_version > SCHEMA_VERSION and self.remote[record.job_id] is record:
                    self._foreign[record.job_id] = line  # a newer version's: its fields this one drops are kept
        return self.remote

    def _keep_foreign(self, line: str) -> None:
        """Keep a record this version cannot read (a newer version's) to write back as it is in ``publish``."""
        try:
            job_id = json.loads(line).get("job_id")
        except (ValueError, AttributeError):
            return  # a torn line: damage, not a record
        if isinstance(job_id, str):
            self._foreign[job_id] = line

    def begin(self, prefixes: dict[str, str]) -> None:
        """Before uploading these jobs, write an in-flight marker naming them (job id -> the key prefix of
        its images under the destination). ``drain`` removes this uploader's markers once their records
        are journaled; a marker left behind tells the next run where to look (``recover``)."""
        key = self.dest.key(f"{PARTS}{self._run_id}-{len(self._markers):06d}{MARKER}")
        body = "".join(json.dumps({"job_id": job_id, "prefix": prefix}) + "\n" for job_id, prefix in prefixes.items())
        try:
            self._put(key, body.encode("utf-8"), "application/x-ndjson", {}, cache_control=NO_CACHE)
        except _NotDelivered:
            return  # the uploads will meet the same trouble and report it; without a marker only recovery is lost
        self._markers.append(key)

    def recover(self) -> int:
        """Adopt what shards that died delivered but never journaled; returns how many jobs.

        For every job an in-flight marker of another uploader names and no record shows delivered, a
        sidecar under the marker's prefix is the job's record: sidecars are written only once all of a
        job's images are acknowledged. Found records are journaled (and kept in ``remote``). A marker is
        removed once every job it names is delivered, or when it is older than ``MARKER_TTL``: until
        then it may belong to a shard still running (another run's), which removes it itself.
        Call after ``read_records``."""
        try:
            entries = {marker: self._marker_entries(marker) for marker in self._markers_read}
            wanted = {job_id: prefix for jobs in entries.values() for job_id, prefix in jobs.items()
                      if not _delivered(self.remote, job_id)}
            with ThreadPoolExecutor(16, thread_name_prefix="zb-recover") as pool:
                found = [r for r in pool.map(lambda item: self._sidecar(*item), wanted.items()) if r is not None]
        except Exception as exc:
            raise DeliveryError(self.explain(exc)) from None
        for record in found:
            self.remote[record.job_id] = record
            self._journal.append(record)
        self._flush_journal(force=True)
        if not self._journal_failed:
            self._delete(self._finished_markers(entries, self.remote))
        return len(found)

    def _finished_markers(self, entries: dict[str, dict[str, str]], records: dict[str, ManifestRecord]) -> list[str]:
        """The markers whose every job ``records`` show delivered, and those older than ``MARKER_TTL``."""
        return [marker for marker, jobs in entries.items() if self._markers_read[marker] > MARKER_TTL
                or all(_delivered(records, job_id) for job_id in jobs)]

    def _marker_entries(self, marker: str) -> dict[str, str]:
        """job id -> image key prefix, from an in-flight marker (a torn line is skipped: that job is made again)."""
        entries = {}
        for line in (self._get(marker)[0] or "").splitlines():
            try:
                entry = json.loads(line)
                entries[entry["job_id"]] = entry["prefix"]
            except (ValueError, KeyError, TypeError):
                continue
        return entries

    def _sidecar(self, job_id: str, prefix: str) -> ManifestRecord | None:
        """The delivered record of ``job_id`` from a sidecar under ``prefix``, if one is there."""
        listing = self.client.list_objects_v2(Bucket=self.dest.bucket, Prefix=self.dest.key(prefix))
        for item in listing.get("Contents", []):
            if not item["Key"].endswith(".json"):
                continue
            try:
                record = ManifestRecord.model_validate_json(self._get(item["Key"])[0] or "")
            except ValidationError:
                continue
            if (record.job_id == job_id and record.delivery == "delivered"
                    and all(o.uri == self.dest.uri(o.path) for o in record.outputs)):
                return record
        return None

    def _delete(self, keys: list[str]) -> None:
        """Best effort: a part or marker left behind is read again next time, nothing worse."""
        for start in range(0, len(keys), 1000):
            try:
                self.client.delete_objects(Bucket=self.dest.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True})
            except Exception:
                return

    def _get(self, key: str) -> tuple[str | None, str | None]:
        """(text, ETag) of an object; (None, None) when there is none."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.dest.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None, None
            raise
        return response["Body"].read().decode("utf-8"), response.get("ETag")

    def _put_replacing(self, name: str, body: bytes, content_type: str, etag: str | None) -> None:
        """Replace ``name`` only if it still has ``etag`` (None: only if there is none); a _NotDelivered
        of kind "stale" when another run wrote it since. On a server without conditional writes,
        unconditionally, as before they existed (``unconditional``)."""
        key = self.dest.key(name)
        if not self.unconditional:
            self._conditions[key] = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self._put(key, body, content_type, {}, cache_control=NO_CACHE)
        except _NotDelivered as exc:
            if exc.kind != "unsupported":
                raise
            self._conditions.pop(key)
            self.unconditional = True
            self._put(key, body, content_type, {}, cache_control=NO_CACHE)

    def _current_before(self) -> tuple[dict[str, bool | None], str | None]:
        """The current column of the destination's manifest.parquet and its ETag ({} and None when there
        is none). One that cannot be read gives {} too (the run's own flags then stand) and a problem."""
        from botocore.exceptions import ClientError

        key = self.dest.key(MANIFEST_PARQUET)
        try:
            response = self.client.get_object(Bucket=self.dest.bucket, Key=key)
            body = response["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return {}, None
            raise _NotDelivered(f"s3://{self.dest.bucket}/{key}: {self.explain(exc)}") from None
        flags = current_column(io.BytesIO(body))
        problem = (f"s3://{self.dest.bucket}/{key} could not be read as a manifest.parquet, so the current flags it "
                   f"held were not carried over: it was rewritten from manifest.jsonl, and records only the destination "
                   f"holds whose templates this run did not plan in full have current = null until a full run of them.")
        if flags is None and problem not in self.problems:
            self.problems.append(problem)
        return flags or {}, response.get("ETag")

    def submit(self, record: ManifestRecord) -> None:
        """Queue a finished "ok" record's images for upload; blocks while ``queue`` records already wait."""
        with self._cond:
            while self._running >= self._limit:
                self._cond.wait()
            self._running += 1
        self._pool.submit(self._deliver_one, record)

    def drain(self) -> DeliveryReport:
        """Wait for every queued record, then write the last journal part and remove the in-flight marker."""
        with self._cond:
            while self._running:
                self._cond.wait()
        self._flush_journal(force=True)
        if self._markers and not self._journal_failed:
            self._delete(self._markers)
            self._markers = []
        return self.report

    def close(self) -> None:
        """Stop: uploads under way finish, queued ones are dropped (their jobs stay undelivered for the rerun)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _deliver_one(self, record: ManifestRecord) -> None:
        start = time.perf_counter()
        listed = True
        try:
            result = self._deliver(record)
        except _NotDelivered as exc:
            result = record.model_copy(update={"delivery": "conflict" if exc.kind == "conflict" else "failed",
                                               "delivery_error": str(exc)})
            listed = exc.kind != "skipped"
        except Exception as exc:  # our bug must not hang the run: the job is reported, the rerun retries it
            result = record.model_copy(update={"delivery": "failed", "delivery_error": f"{type(exc).__name__}: {exc}"})
        with self._cond:
            report = self.report
            report.seconds += time.perf_counter() - start
            if result.delivery == "delivered":
                report.delivered += 1
                self._journal.append(result)
            else:
                report.conflicts += result.delivery == "conflict"
                report.failed += result.delivery == "failed"
                if listed and len(report.problems) < 100:
                    report.problems.append(f"{record.sku} ({record.template}, job {record.job_id[:12]}): {result.delivery_error}")
        try:
            if self.on_result is not None:
                self.on_result(result)
            self._flush_journal()
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _deliver(self, record: ManifestRecord) -> ManifestRecord:
        """Upload a record's images, then its sidecars; return the record with uri, etag and checksum set."""
        if self._fatal:
            raise _NotDelivered(f"not tried: {self._fatal}", kind="skipped")
        try:
            outputs = [self._put_image(record, output) for output in record.outputs]
            delivered = record.model_copy(update={"outputs": outputs, "delivery": "delivered", "delivery_error": None})
            sidecar = delivered.model_dump_json(indent=2).encode("utf-8")
            for output in outputs:
                self._put(self.dest.key(output.path + ".json"), sidecar, "application/json", {"job-id": record.job_id},
                          accept_existing=True)
            crashpoints.reached("deliver.sidecars")
        except _NotDelivered as exc:
            if exc.kind == "failed" and exc.cause is not None:  # the connection or the server, not this job
                with self._cond:
                    self._failures_in_a_row += 1
                    tripped = self._failures_in_a_row >= _BREAKER
                if tripped:
                    self._trip(self.explain(exc.cause) + f" {_BREAKER} jobs in a row failed; the rest were not tried.")
            raise
        with self._cond:
            self._failures_in_a_row = 0
        return delivered

    def _trip(self, paragraph: str) -> None:
        """The destination as a whole refuses (credentials, bucket, endpoint down): report once, try no more."""
        with self._cond:
            if self._fatal is None:
                self._fatal = paragraph
                self.report.problems.append(paragraph)

    def _put_image(self, record: ManifestRecord, output: OutputFile) -> OutputFile:
        path = self.root / output.path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _NotDelivered(f"{path} cannot be read ({exc.strerror}); rerun to regenerate it") from None
        if hashlib.sha256(data).hexdigest() != output.sha256:
            raise _NotDelivered(f"{path} changed since it was generated (its SHA-256 differs from the manifest); "
                                f"rerun to regenerate it")
        content_type = CONTENT_TYPES.get(output.format.upper(), "application/octet-stream")
        etag, checksum = self._put(self.dest.key(output.path), data, content_type, object_metadata(record, output),
                                   cache_control=IMMUTABLE, sha256=output.sha256)
        with self._cond:
            self.report.files += 1
            self.report.bytes += len(data)
        return output.model_copy(update={"uri": self.dest.uri(output.path), "etag": etag, "checksum_crc32": checksum})

    def _put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str], *, cache_control: str = IMMUTABLE,
             sha256: str | None = None, accept_existing: bool = False) -> tuple[str, str | None]:
        """PUT with a CRC32 the server checks, create-only unless ``key`` is the manifest or run.json; retried.

        Returns the (etag, checksum) S3 acknowledged; raises _NotDelivered.
        """
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        crc = crc32_b64(data)
        args = dict(Bucket=self.dest.bucket, Key=key, ContentType=content_type, CacheControl=cache_control,
                    Metadata=metadata, ChecksumCRC32=crc)
        if key not in self._mutable:
            args["IfNoneMatch"] = "*"
        else:
            args.update(self._conditions.get(key, {}))
        tries, exists, last, cause = 0, False, "", None
        while True:
            try:
                if exists:
                    return self._existing(key, len(data), crc, sha256, accept_existing)
                if len(data) >= self._transfer.multipart_threshold:
                    return self._put_multipart(args, data)
                return _acknowledged(key, crc, self.client.put_object(Body=data, **args))
            except ClientError as exc:
                code, cause = _code(exc), exc
                last = f"{code}: {exc.response.get('Error', {}).get('Message', '')}"
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                conditional = key in self._mutable and key in self._conditions
                if conditional and code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise _NotDelivered(f"s3://{self.dest.bucket}/{key} was changed by another run", kind="stale") from None
                if conditional and (code in ("NotImplemented", "501") or status == 501):
                    raise _NotDelivered(f"{self.endpoint} does not support conditional writes (If-Match)",
                                        kind="unsupported") from None
                if code in ("PreconditionFailed", "412") and not exists:
                    exists = True  # compare with what is there, at once
                    continue
                if exists and code in ("404", "NoSuchKey"):
                    exists = False  # it vanished between the 412 and the HEAD: PUT again
                elif code in _FATAL:
                    self._trip(self.explain(exc))
                    raise _NotDelivered(self.explain(exc), kind="skipped") from None
                elif not (code in _RETRYABLE or status >= 500):
                    raise _NotDelivered(f"s3://{self.dest.bucket}/{key}: {last}") from None
            except (NoCredentialsError, PartialCredentialsError) as exc:
                self._trip(self.explain(exc))
                raise _NotDelivered(self.explain(exc), kind="skipped") from None
            except BotoCoreError as exc:  # connection reset, timeout, endpoint down: worth another try
                last, cause = type(exc).__name__, exc
            tries += 1
            if tries >= self.attempts:
                raise _NotDelivered(f"s3://{self.dest.bucket}/{key}: not acknowledged after {tries} tries ({last}) "
                                    f"at {self.endpoint}", cause=cause)
            time.sleep(min(8.0, 0.5 * 2**tries) * random.uniform(0.5, 1.0))

    def _put_multipart(self, args: dict, data: bytes) -> tuple[str, str | None]:
        """A big file through boto3's transfer manager (parts with CRC32, a full-object CRC32 on completion)."""
        import io

        extra = {k: v for k, v in args.items() if k not in ("Bucket", "Key", "IfNoneMatch", "IfMatch")}  # see _create_only
        self.client.upload_fileobj(io.BytesIO(data), args["Bucket"], args["Key"], ExtraArgs=extra, Config=self._transfer)
        head = self.client.head_object(Bucket=args["Bucket"], Key=args["Key"], ChecksumMode="ENABLED")
        if head.get("ContentLength") != len(data):
            raise _NotDelivered(f"s3://{args['Bucket']}/{args['Key']} holds {head.get('ContentLength')} bytes after upload, not {len(data)}")
        return _acknowledged(args["Key"], args["ChecksumCRC32"], head)

    def _existing(self, key: str, size: int, crc: str, sha256: str | None, accept_existing: bool) -> tuple[str, str | None]:
        """The key exists: accept it only if it holds our bytes (a retry whose first try landed), else a conflict."""
        head = self.client.head_object(Bucket=self.dest.bucket, Key=key, ChecksumMode="ENABLED")
        theirs = head.get("ChecksumCRC32")
        if accept_existing:
            return head["ETag"], theirs
        same = (head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == sha256
                and theirs in (None, crc))
        if not same:
            raise _NotDelivered(
                f"s3://{self.dest.bucket}/{key} already exists with other content ({head.get('ContentLength')} bytes, "
                f"sha256 {head.get('Metadata', {}).get('sha256', 'unknown')}); it was not overwritten. Delete it if "
                f"it is stale, or deliver to another prefix.", kind="conflict")
        return head["ETag"], theirs

    def _create_only(self, params: dict, **_) -> None:
        key = params.get("Key")
        if key in self._mutable:
            params.update(self._conditions.get(key, {}))
        else:
            params.setdefault("IfNoneMatch", "*")

    def _flush_journal(self, force: bool = False) -> None:
        """Write delivered records as a part under ``manifest.parts/`` every ``journal_every`` records."""
        with self._cond:
            if not self._journal or (len(self._journal) < self.journal_every and not force):
                return
            records, self._journal = self._journal, []
            key = self.dest.key(f"{PARTS}{self._run_id}-{len(self._parts_written):06d}.jsonl")
            self._parts_written.append(key)
        body = "".join(r.model_dump_json() + "\n" for r in records).encode("utf-8")
        try:
            self._put(key, body, "application/x-ndjson", {}, cache_control=NO_CACHE)
        except _NotDelivered as exc:  # the records are in the local manifest; publish() still sends them
            with self._cond:
                self._journal_failed = True
                self.report.problems.append(f"journal part not written: {exc}")

    def publish(self, local: Iterable[ManifestRecord], run_json: bytes, report: bytes | None = None,
                parquet: Callable[[list[ManifestRecord], dict[str, bool | None]], bytes] | None = None) -> str:
        """Write ``manifest.jsonl`` (the destination's records merged with ``local``), ``parquet`` of the
        merged records and the destination's last ``current`` column as ``manifest.parquet`` (records
        this version cannot read are only in the JSONL), ``run.json`` and the run's ``report.html``;
        drop parts.

        ``manifest.jsonl`` and ``manifest.parquet`` are each written only if they are still the ones
        read (If-Match, or If-None-Match when there was none): if another run published in between, its
        records are read and merged too, and both are written again, so two runs finishing at once lose
        no line. Returns the manifest's URI; raises DeliveryError when the destination refuses.
        """
        local = list(local)
        try:
            # read before manifest.jsonl is written: a run that publishes after this read changes the ETag
            before, parquet_etag = self._current_before() if parquet is not None else ({}, None)
            for _ in range(PUBLISH_TRIES):
                merged = dict(self.remote)
                for record in local:
                    merged[record.job_id] = newest(merged.get(record.job_id), record)
                lines = [self._foreign[r.job_id] if r is self.remote.get(r.job_id) and r.job_id in self._foreign
                         else r.model_dump_json() for r in merged.values()]
                lines += [line for job_id, line in self._foreign.items() if job_id not in merged]  # never dropped
                body = "".join(line + "\n" for line in lines).encode("utf-8")
                try:
                    self._put_replacing(MANIFEST, body, "application/x-ndjson", self._manifest_etag)
                    if parquet is not None:
                        self._put_replacing(MANIFEST_PARQUET, parquet(list(merged.values()), before),
                                            "application/vnd.apache.parquet", parquet_etag)
                    break
                except _NotDelivered as exc:
                    if exc.kind != "stale":
                        raise
                    self.read_records()  # the other run's manifest (and whatever parts are left), merged next
                    if parquet is not None:
                        before, parquet_etag = self._current_before()
            else:
                raise DeliveryError(f"{self.dest.uri(MANIFEST)} was changed by other runs {PUBLISH_TRIES} times while this "
                                    f"one published it. Rerun the same command to publish; every record is also in "
                                    f"its image's sidecar.")
            self._put(self.dest.key(RUN_JSON), run_json, "application/json", {}, cache_control=NO_CACHE)
            if report is not None:
                self._put(self.dest.key(REPORT_HTML), report, "text/html; charset=utf-8", {}, cache_control=NO_CACHE)
        except _NotDelivered as exc:
            raise DeliveryError(str(exc)) from None
        self._delete(self._parts_read + self._parts_written)
        try:  # markers of dead shards whose jobs this manifest now holds delivered (this run made them)
            self._delete(self._finished_markers({m: self._marker_entries(m) for m in self._markers_read}, merged))
        except Exception:
            pass  # best effort: the next run's recover removes them
        return self.dest.uri(MANIFEST)


def presign(uri: str, expires: int = 7 * 24 * 3600) -> str:
    """A time-limited HTTPS link to an ``s3://bucket/key`` object (SigV4; the link names the access key id,
    never the secret)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return connect().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)


def endpoint_of(client) -> str:
    """An S3 client's endpoint URL, without any user:password part."""
    parts = urlsplit(client.meta.endpoint_url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()


def s3_problem(exc: BaseException, bucket: str, needs: str) -> str:
    """Why an S3 request failed and what to check, in words; ``needs`` names the permissions the
    work takes. Never a secret."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ("no AWS credentials were found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                "AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE.")
    if isinstance(exc, ClientError):
        code = _code(exc)
        if code in ("NoSuchBucket", "404"):
            return (f"bucket {bucket!r} does not exist there. Create it, or fix the bucket name; check "
                    f"AWS_ENDPOINT_URL if the bucket lives on another server.")
        if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
            return f"access denied ({code}). The credentials need {needs} on bucket {bucket!r}."
        if code in _FATAL:
            return (f"the server rejected the credentials ({code}). Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                    f"AWS_SESSION_TOKEN or AWS_PROFILE, that they belong to this endpoint, and that they have not expired.")
        return f"the server answered {code}: {exc.response.get('Error', {}).get('Message', '')}"
    return (f"could not reach the endpoint ({type(exc).__name__}). Check AWS_ENDPOINT_URL (unset means AWS itself), "
            f"that the server is running, and the network.")


def _delivered(records: dict[str, ManifestRecord], job_id: str) -> bool:
    known = records.get(job_id)
    return known is not None and known.delivery == "delivered"


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _acknowledged(key: str, crc: str, response: dict) -> tuple[str, str | None]:
    """(etag, checksum) from S3's answer, after checking S3 stored the CRC32 we sent."""
    theirs = response.get("ChecksumCRC32")
    if theirs is not None and theirs != crc:
        raise _NotDelivered(f"{key}: S3 acknowledged CRC32 {theirs}, but we sent {crc}")
    if not response.get("ETag"):
        raise _NotDelivered(f"{key}: S3 answered without an ETag")
    return response["ETag"], theirs

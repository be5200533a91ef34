"""A whole run, in stages the Prefect flow calls as tasks: plan, run shards, finish.

``plan_run`` checks the inputs, expands the plan, drops jobs already done (judged by the
manifest and the files' size and mtime or SHA-256, not by file existence) and spools the pending
jobs to a temporary file in OUT, so a million-row catalog is never held in memory (every planned
job id goes to another one, for the Parquet copy's ``current`` column). ``run_shard`` generates
one shard on the process's engine. ``finish_run`` writes the compacted manifest, its Parquet
copy, ``report.html`` and ``run.json``.

With ``dest`` (``--dest s3://bucket/prefix``) each stage delivers its own work and waits for it
before it returns, so no upload outlives the task that started it: ``plan_run`` skips jobs the
destination's records say were delivered there and uploads jobs done here but never delivered
(without regenerating them); ``run_shard`` uploads each "ok" record as it finishes, beside the
next batch's generation; ``finish_run`` publishes ``manifest.jsonl`` and ``run.json`` there.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import crashpoints, progress
from .deliver import DeliveryReport, is_delivered
from .errors import DeliveryError, OutputError, SigningError
from .generate import VRAM_RANGE, EngineOptions, check_options, load_engine, pick_device
from .manifest import (MANIFEST, REPORT_HTML, RUN_JSON, Manifest, ManifestPart, ManifestRecord, current_flags,
                       library_versions, record_done, signed_otherwise, to_parquet_bytes, utc_now)
from .models import DEFAULT_MODEL
from .plan import Job, PlanInputs, RowProblems, check_inputs, plan_jobs, strict_check
from .presets import load_presets
from .provenance import Sealer
from .report import MAX_ITEMS, write_report
from .shard import Interrupted, ShardResult, default_sealer, image_prefix, process_shard, stop_asked
from .store import STOP_FILE_PREFIX, TEMP_PREFIX, LocalStore, check_folder, write_atomic

if TYPE_CHECKING:
    from .deliver import Uploader

MAX_LISTED_PROBLEMS = 1000
CLOCK_SKEW = 5.0  # seconds another host's clock may lag this machine's and its loads still count as this run's
UPLOAD_BATCH = 64  # finished records planning uploads under one in-flight marker


class RunConfig(BaseModel):
    """Everything a run needs; the flow's typed parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    catalogs: list[str] = Field(min_length=1)
    templates: list[str] = Field(min_length=1)
    out: str
    model: str = DEFAULT_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(4, ge=1, le=64)
    shard_size: int = Field(64, ge=1, le=100_000)
    max_attempts: int = Field(3, ge=1, le=10)
    strict: bool = False
    limit: int | None = Field(None, ge=1)
    size: str | None = None
    steps: int | None = None
    compile: bool | None = None  # None: compile on CUDA, not on the CPU
    vram_gb: int | None = Field(None, ge=VRAM_RANGE[0], le=VRAM_RANGE[1])
    precision: Literal["bf16", "fp8"] = "bf16"
    workers: int | None = Field(None, ge=1, le=256)  # a local Dask cluster of this many worker processes
    cluster: str | None = None  # the address of an existing Dask scheduler
    presets_file: str | None = None  # extra presets (TOML/YAML) the templates may name
    c2pa_cert: str | None = None  # PEM chain, leaf first: sign every file with C2PA (with c2pa_key)
    c2pa_key: str | None = None
    dest: str | None = None  # s3://bucket/prefix: also deliver there
    verify_files: bool = False  # hash every finished file instead of trusting a matching size and mtime


@dataclass
class RunPlan:
    """The outcome of planning: counts, row problems and the spooled pending jobs."""

    planned: int
    pending: int
    skipped: int
    rows: int
    problems: list[str]
    problem_count: int
    pending_file: str
    model: str
    seconds: float
    to_deliver: int = 0  # jobs done here earlier, never delivered: uploaded during planning, not regenerated
    delivery: DeliveryReport = field(default_factory=DeliveryReport)
    removed: list[str] = field(default_factory=list)
    recovered: int = 0  # jobs an interrupted run delivered but never journaled: adopted from their sidecars
    re_signed: int = 0  # jobs done earlier but signed otherwise (or not): made again to be signed as this run signs
    kept_signature: int = 0  # jobs delivered earlier, signed otherwise: delivered files are never overwritten
    still_rejected: int = 0  # planned jobs an earlier run rejected (done: not made again); their files are in rejected/
    still_rejected_ids: list[str] = field(default_factory=list)  # the first MAX_ITEMS of them, for the report
    current_file: str | None = None  # a temp file of every planned job id (manifest.parquet's current column); None with --limit
    templates: list[str] = field(default_factory=list)  # the names of the run's templates (current says nothing of others)
    stop_file: str | None = None  # created by a first Ctrl-C: this run's shards stop after their batch (shard.stop_asked)


_SEALERS: dict[tuple[str | None, str | None], Sealer] = {}


def sealer_for(config: RunConfig) -> Sealer:
    """This process's sealer: provenance in every file, plus C2PA when a certificate and key are given."""
    key = (config.c2pa_cert, config.c2pa_key)
    if key not in _SEALERS:
        sealer = default_sealer()
        if config.c2pa_cert or config.c2pa_key:
            if not (config.c2pa_cert and config.c2pa_key):
                raise SigningError("C2PA signing needs both --c2pa-cert (PEM chain, signing certificate first) and "
                                   "--c2pa-key (its PEM private key); only one was given.")
            from .signing import C2paSigner, load_credentials

            signer = C2paSigner(load_credentials(config.c2pa_cert, config.c2pa_key), library_versions()["zimage-batch"])
            sealer = Sealer(sealer.software, signer)
        _SEALERS[key] = sealer
    return _SEALERS[key]


def check_run(config: RunConfig) -> PlanInputs:
    """Validate catalogs, templates, presets, the model reference and any C2PA credentials; with ``strict``, every row too."""
    presets = load_presets(config.presets_file)
    inputs = check_inputs(config.catalogs, config.templates, config.model, presets, size=config.size, steps=config.steps)
    check_folder(config.out)  # fails early when --out is (or lies under) a file, or cannot be written
    sealer_for(config)  # a bad certificate or key stops the run here
    if config.strict:
        strict_check(inputs)
    if not config.cluster:  # a cluster's workers check their own GPUs when they load
        device = pick_device(config.device)
        check_options(engine_options(config, device), device)
    if config.dest:
        from .deliver import check

        check(config.dest)
    return inputs


def open_uploader(config: RunConfig, manifest: Manifest | ManifestPart | None = None) -> Uploader | None:
    """An uploader to ``config.dest`` (None without one) that records each result in ``manifest``."""
    if not config.dest:
        return None
    from .deliver import S3Destination, Uploader, connect

    def on_result(record) -> None:
        if manifest is not None:
            manifest.append(record)
        progress.emit("delivered", record)

    return Uploader(S3Destination.parse(config.dest), connect(), config.out, on_result=on_result)


def plan_run(config: RunConfig) -> RunPlan:
    """Expand the plan, skip finished jobs and spool the rest to a temp file."""
    start = time.perf_counter()
    inputs = check_run(config)
    store, manifest = LocalStore(config.out), Manifest(config.out)
    manifest.compact()  # fold in the parts a killed run left behind
    store.remove_stale_temp_files()
    uploader = open_uploader(config, manifest)
    remote = uploader.read_records() if uploader is not None else {}
    recovered = uploader.recover() if uploader is not None else 0  # before planning: those jobs count as done
    planned = skipped = pending = rows = to_deliver = re_signed = kept_signature = still_rejected = 0
    still_rejected_ids: list[str] = []
    waiting: list[tuple[Job, ManifestRecord]] = []
    signed_by = sealer_for(config).signed_by
    problems = RowProblems(MAX_LISTED_PROBLEMS)
    last_row = None
    skus: set[str] = set()  # every sku the catalogs name, to tell which products were removed
    Path(config.out).mkdir(parents=True, exist_ok=True)
    # the spool is a temp file in OUT: if this run is killed, the next one removes it with the others
    fd, spool = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}plan-", suffix=".jsonl", dir=config.out)
    # every planned job id, for manifest.parquet's current column (a file: Prefect walks a task's
    # arguments, and a set of millions of ids took it seconds); a partial plan (--limit) says nothing
    current = None if config.limit is not None else tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", prefix=f"{TEMP_PREFIX}current-", suffix=".txt", dir=config.out, delete=False)
    current_file = current.name if current is not None else None
    with os.fdopen(fd, "w", encoding="utf-8") as f, current or nullcontext(), removed_on_failure(spool, current_file):
        for item in plan_jobs(inputs):
            if not isinstance(item, Job):
                skus.add(item.sku)
                problems.add(item)
                continue
            if config.limit is not None and planned >= config.limit:
                break
            planned += 1
            skus.add(item.sku)
            if current is not None:
                current.write(item.job_id + "\n")
            if (item.catalog, item.row) != last_row:
                rows += 1
                last_row = (item.catalog, item.row)
            local = manifest.records.get(item.job_id)
            delivered = next((r for r in (remote.get(item.job_id), local) if uploader is not None
                              and is_delivered(r, item, uploader.dest)), None)
            if delivered is not None:
                skipped += 1  # done at the destination, by this machine or another
                kept_signature += delivered.status == "ok" and signed_otherwise(delivered, signed_by)
                continue
            if manifest.is_done(item, store, config.verify_files, signed_by):
                skipped += 1
                if local.status == "rejected":  # still waiting for a person: the report lists it again
                    still_rejected += 1
                    if len(still_rejected_ids) < MAX_ITEMS:
                        still_rejected_ids.append(item.job_id)
                if uploader is not None and local.status == "ok":
                    waiting.append((item, local))  # done here, never delivered: uploaded now, not made again
                    to_deliver += 1
                    if len(waiting) >= UPLOAD_BATCH:
                        _hand_over(uploader, waiting)
                continue
            if local is not None and signed_otherwise(local, signed_by) and record_done(local, item, store,
                                                                                         config.verify_files, local.c2pa_signer):
                re_signed += 1  # finished, but its files are signed otherwise: made again
            pending += 1
            f.write(item.to_json() + "\n")
    delivery = DeliveryReport()
    if uploader is not None:
        _hand_over(uploader, waiting)
        delivery = uploader.drain()
        uploader.close()
    templates = [t.name for t in inputs.templates]
    removed = [] if config.limit is not None else removed_skus(manifest, set(templates), skus)
    plan = RunPlan(planned, pending, skipped, rows, problems.listed(), problems.count, spool, inputs.model,
                   time.perf_counter() - start, to_deliver, delivery, removed, recovered, re_signed, kept_signature,
                   still_rejected, still_rejected_ids, current_file, templates,
                   str(Path(config.out).absolute() / f"{STOP_FILE_PREFIX}{uuid.uuid4().hex[:12]}"))
    progress.emit("planned", plan)
    crashpoints.reached("planned")
    return plan


def _planned_ids(plan: RunPlan) -> set[str] | None:
    """The job ids the plan named (read back and deleted), or None when it named only part of the
    catalog (--limit) or nothing at all (a catalog that is empty today must not make every image old)."""
    if plan.current_file is None:
        return None
    path = Path(plan.current_file)
    ids = set(path.read_text(encoding="utf-8").split()) if plan.planned else None
    path.unlink(missing_ok=True)
    return ids


def _hand_over(uploader: Uploader, waiting: list[tuple[Job, ManifestRecord]]) -> None:
    """Upload these finished records, under an in-flight marker naming their jobs (see ``Uploader.begin``)."""
    if waiting:
        uploader.begin({job.job_id: image_prefix(job) for job, _ in waiting})
        for _, record in waiting:
            uploader.submit(record)
        waiting.clear()


@contextmanager
def removed_on_failure(*paths: str | None) -> Iterator[None]:
    """Delete ``paths`` (None: none) when the block fails (e.g. a catalog line that cannot be read stops planning)."""
    try:
        yield
    except BaseException:
        for path in paths:
            if path is not None:
                Path(path).unlink(missing_ok=True)
        raise


def removed_skus(manifest: Manifest, templates: set[str], skus: set[str]) -> list[str]:
    """Skus the manifest holds for these templates that the catalogs no longer name (their files are kept)."""
    return sorted({r.sku for r in manifest.records.values() if r.template in templates} - skus)


def read_shards(plan: RunPlan, shard_size: int) -> Iterator[list[Job]]:
    """Read the spooled pending jobs back in shards."""
    shard: list[Job] = []
    with open(plan.pending_file, encoding="utf-8") as f:
        for line in f:
            shard.append(Job.from_json(line))
            if len(shard) >= shard_size:
                yield shard
                shard = []
    if shard:
        yield shard


def engine_options(config: RunConfig, device: str) -> EngineOptions:
    """The engine options a run asks for, on the device it will use (``pick_device``'s answer)."""
    compile_ = config.compile if config.compile is not None else device.startswith("cuda")
    return EngineOptions(compile=compile_, vram_gb=config.vram_gb, one_per_call=device == "cpu",
                         precision=config.precision)


def engine_for(config: RunConfig):
    """This process's engine for the run's model, device and options (loaded once)."""
    device = pick_device(config.device)
    return load_engine(config.model, device, engine_options(config, device))


def run_shard(config: RunConfig, index: int, jobs: list[Job], stop_file: str | None = None) -> ShardResult:
    """Generate, post-process, store and record one shard on this process's engine.

    Records go to the shard's own manifest part; if the shard runs again (its worker died), the
    jobs that part shows finished are skipped, so every job ends up in the manifest exactly once;
    with ``--dest``, those of them not delivered yet are uploaded now.
    """
    store = LocalStore(config.out)
    part = ManifestPart(config.out, f"shard-{index:06d}")
    earlier = part.records()
    signed_by = sealer_for(config).signed_by
    todo = [job for job in jobs if not record_done(earlier.get(job.job_id), job, store, config.verify_files, signed_by)]
    making = {job.job_id for job in todo}
    undelivered = [(job, earlier[job.job_id]) for job in jobs if config.dest and job.job_id not in making
                   and earlier[job.job_id].status == "ok" and earlier[job.job_id].delivery != "delivered"]
    if not todo and not undelivered:
        return ShardResult()
    uploader = open_uploader(config, part)

    def on_record(record) -> None:
        progress.emit("record", record)
        if uploader is not None and record.status == "ok":
            uploader.submit(record)  # uploads run beside the next batch's generation

    try:
        if uploader is not None:  # says at the destination which jobs may land there before they are journaled
            uploader.begin({job.job_id: image_prefix(job) for job in [*todo, *(job for job, _ in undelivered)]})
            for _, record in undelivered:  # the dead attempt made them; its uploads did not finish
                uploader.submit(record)
        result = ShardResult()
        if todo:
            if stop_asked(stop_file):  # before loading a model for it (a shard queued when Ctrl-C came)
                raise Interrupted("stopped by Ctrl-C")
            result = process_shard(todo, engine_for(config), store, part, batch_size=config.batch_size,
                                   max_attempts=config.max_attempts, presets=load_presets(config.presets_file),
                                   on_record=on_record, sealer=sealer_for(config), stop_file=stop_file)
        if uploader is not None:
            result.delivery = uploader.drain()  # the shard is done when S3 has acknowledged its images
        return result
    finally:
        if uploader is not None:
            uploader.close()  # after an error or Ctrl-C: running uploads end, queued ones are left to the rerun
        part.close()


class RunSummary(BaseModel):
    """What ``run.json`` holds."""

    out: str
    model: str
    planned: int
    generated: int
    skipped: int
    failed: int
    rejected: int
    rows: int
    row_problems: int
    problems: list[str]
    pipeline_loads: int
    seconds: float
    stage_seconds: dict[str, float]
    started_at: str
    finished_at: str
    catalogs: list[str]
    templates: list[str]
    versions: dict[str, str]
    dest: str | None = None
    manifest_uri: str | None = None  # the destination's manifest.jsonl, once published
    delivered: int = 0  # jobs whose images reached the destination in this run
    recovered: int = 0  # jobs an interrupted run had delivered without journaling them: adopted, not made again
    re_signed: int = 0  # jobs done earlier, signed otherwise (or unsigned): made again to be signed as this run signs
    kept_signature: int = 0  # jobs delivered earlier, signed otherwise: they keep it (delivered files are never overwritten)
    still_rejected: int = 0  # skipped jobs an earlier run rejected (their files are in rejected/; report.html lists them)
    delivery_conflicts: int = 0
    delivery_failed: int = 0
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    delivery_problems: list[str] = []
    removed: list[str] = []  # skus in earlier runs' manifest (same templates) that the catalogs no longer name
    prompts_cut: int = 0  # generated jobs whose prompt was longer than max_sequence_length tokens (only its start was read)
    report: str = ""  # the path of report.html

    @property
    def exit_code(self) -> int:
        """2 when no job could be planned (no rows, or a problem in every row: a bad input), 1 when jobs
        failed or deliveries did not all land, else 0."""
        if self.planned == 0:
            return 2
        undelivered = self.dest is not None and bool(self.delivery_conflicts or self.delivery_failed or not self.manifest_uri)
        return 1 if self.failed or undelivered else 0


def finish_run(config: RunConfig, plan: RunPlan, results: list[ShardResult], started_at: str, wall_start: float) -> RunSummary:
    """Compact the manifest, write its Parquet copy and run.json, publish them to the destination; return the summary."""
    total = ShardResult()
    for result in results:
        total.add(result)
    total.delivery.add(plan.delivery)
    manifest = Manifest(config.out)
    this_run = list(manifest.part_records.values())  # this run's work, from every worker
    if total.images > len(this_run) or len(this_run) < plan.pending:  # a shard that finds its jobs done reports none
        for spool in (plan.pending_file, plan.current_file):
            if spool is not None:
                Path(spool).unlink(missing_ok=True)
        raise OutputError(
            f"This run planned {plan.pending} job(s) and the workers reported {total.images} image(s), but only "
            f"{len(this_run)} record(s) are in {Path(config.out).absolute() / '.parts'}: they wrote to a --out this "
            f"machine does not see (another machine's disk, or a relative path resolved in their own folder). Nothing "
            f"was deleted. Put --out on storage that every worker and this machine share, under the same absolute "
            f"path, and run again."
        )
    statuses = Counter(r.status for r in this_run)
    planned_ids, templates = _planned_ids(plan), set(plan.templates)
    flags = manifest.finalize(planned_ids, templates)
    # every shard is done: a temp file now is one a killed worker left mid-write (its shard ran again elsewhere)
    LocalStore(config.out).remove_stale_temp_files()
    # loads this run made: not those of engines a worker's preload or an earlier run in the process made
    began = datetime.fromisoformat(started_at.replace("Z", "+00:00")).timestamp()
    here = socket.gethostname() + ":"
    loads = [seconds for load_id, (seconds, loaded_at) in total.engines.items()
             if loaded_at >= began - (0 if load_id.startswith(here) else CLOCK_SKEW)]
    stages = {"load": sum(loads), "plan": plan.seconds, **total.seconds}
    if config.dest:
        stages["upload"] = total.delivery.seconds  # summed over upload threads, which run beside generation
    summary = RunSummary(
        out=str(config.out), model=plan.model, planned=plan.planned, generated=statuses["ok"],
        skipped=plan.skipped, failed=statuses["failed"], rejected=statuses["rejected"], rows=plan.rows,
        row_problems=plan.problem_count, problems=plan.problems, pipeline_loads=len(loads),
        seconds=round(time.perf_counter() - wall_start, 3),
        stage_seconds={k: round(v, 3) for k, v in stages.items()}, started_at=started_at,
        finished_at=utc_now(), catalogs=list(config.catalogs), templates=list(config.templates),
        versions=library_versions(), removed=plan.removed, report=str(Path(config.out) / REPORT_HTML),
        prompts_cut=total.prompts_cut, recovered=plan.recovered, re_signed=plan.re_signed,
        kept_signature=plan.kept_signature, still_rejected=plan.still_rejected,
    )
    earlier = [manifest.records[job_id] for job_id in plan.still_rejected_ids if job_id in manifest.records]
    report = write_report(config.out, this_run, summary, earlier)
    if config.dest:  # the destination's records, flagged by this run's plan, else as the destination or this --out last said
        def parquet(records: list[ManifestRecord], there: dict[str, bool | None]) -> bytes:
            before = flags | {job_id: flag for job_id, flag in there.items() if flag is not None}
            return to_parquet_bytes(records, current_flags(records, planned_ids, templates, before))

        summary = publish(config, summary, total.delivery, manifest, report, parquet)
    else:
        _write_summary(config, summary)
    Path(plan.pending_file).unlink(missing_ok=True)
    return summary


def publish(config: RunConfig, summary: RunSummary, delivery: DeliveryReport, manifest: Manifest, report: Path,
            parquet: Callable[[list[ManifestRecord], dict[str, bool | None]], bytes]) -> RunSummary:
    """Write run.json here and, with the destination's records merged with ours, manifest.jsonl,
    manifest.parquet (``parquet`` of the merged records), run.json and report.html there."""
    uploader = open_uploader(config)
    summary = summary.model_copy(update=dict(
        dest=str(uploader.dest), manifest_uri=uploader.dest.uri(MANIFEST), delivered=delivery.delivered,
        delivery_conflicts=delivery.conflicts, delivery_failed=delivery.failed, uploaded_files=delivery.files,
        uploaded_bytes=delivery.bytes, delivery_problems=list(delivery.problems)))
    _write_summary(config, summary)
    try:
        uploader.read_records()  # manifest.jsonl and every journal part, this run's included
        uploader.publish(manifest.records.values(), _summary_json(summary), report.read_bytes(), parquet)
        if uploader.problems:  # published, with something to say (here and in the local run.json)
            summary = summary.model_copy(update=dict(delivery_problems=[*summary.delivery_problems, *uploader.problems]))
            _write_summary(config, summary)
    except DeliveryError as exc:  # the local run.json says so; the rerun publishes
        problem = f"{exc} The manifest was not published; local outputs are kept. Rerun the same command to deliver."
        summary = summary.model_copy(update=dict(manifest_uri=None, delivery_problems=[*summary.delivery_problems, problem]))
        _write_summary(config, summary)
    finally:
        uploader.close()
    return summary


def _summary_json(summary: RunSummary) -> bytes:
    return (json.dumps(summary.model_dump(), indent=2, ensure_ascii=False) + "\n").encode()


def _write_summary(config: RunConfig, summary: RunSummary) -> None:
    Path(config.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(config.out) / RUN_JSON, _summary_json(summary))

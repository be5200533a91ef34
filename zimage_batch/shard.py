"""One shard of jobs: generate -> post-process -> store -> record, on one engine.

Jobs are grouped into batches of equal size and settings. While the engine generates a
batch, a single background thread post-processes, writes and records the previous one (at
most two batches wait, so memory stays flat). An image that comes out black, blank or
non-finite is regenerated with the next derived seed, up to ``max_attempts`` times, and is
never delivered. A batch whose generation raises is recorded as failed and the shard goes on.
Every file is sealed before it is stored (provenance embedded, then optionally C2PA-signed), so
the manifest's SHA-256 is of the final bytes.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .deliver import DeliveryReport
from .errors import OutputError
from .generate import Engine
from .manifest import Attempt, ManifestPart, ManifestRecord, OutputFile, library_versions
from .plan import Job, derive_seed
from .postprocess import Processed, Rendered, Source, image_problem, process, render
from .presets import PRESETS, Preset, get_preset
from .provenance import Sealer, Stamp, software_name
from .store import LocalStore, safe_name, stops_when_unwritable


STOP = threading.Event()  # set by a first Ctrl-C: every shard of this process ends after its batch in progress
# ... which also creates the run's stop file in --out, for its shards on Dask workers (other processes,
# maybe other machines, that share --out). One name per run (RunPlan.stop_file), so a run's shards are
# never stopped by an earlier run's file, and one that outlived its run still sees its own.


class Interrupted(Exception):
    """A shard stopped early because ``STOP`` was set; its finished jobs are in its manifest part."""


def stop_asked(stop_file: str | None = None) -> bool:
    """Whether a first Ctrl-C asked this shard to stop: in this process, or through its run's stop file."""
    return STOP.is_set() or (stop_file is not None and os.path.exists(stop_file))


@dataclass
class ShardResult:
    """Counts and per-stage seconds of one shard."""

    generated: int = 0
    rejected: int = 0
    failed: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    engines: dict[str, tuple[float, float]] = field(default_factory=dict)  # load id -> (seconds, when) of each engine used
    process: int = field(default_factory=os.getpid)  # where the shard ran
    delivery: DeliveryReport = field(default_factory=DeliveryReport)  # with --dest: what reached S3
    prompts_cut: int = 0  # jobs whose prompt was longer than max_sequence_length tokens

    @property
    def images(self) -> int:
        return self.generated + self.rejected + self.failed

    def add(self, other: ShardResult) -> None:
        self.engines.update(other.engines)
        self.delivery.add(other.delivery)
        self.generated += other.generated
        self.rejected += other.rejected
        self.failed += other.failed
        self.prompts_cut += other.prompts_cut
        for stage, value in other.seconds.items():
            self.seconds[stage] += value


@dataclass
class Generated:
    """What generation produced for one job: the image (or None) and every attempt."""

    job: Job
    image: np.ndarray | None
    attempts: list[Attempt]
    reason: str | None
    batch_size: int  # images in the pipeline call that made the image (or the first call, without one)
    seconds: float


def batches(jobs: Sequence[Job], batch_size: int, key: Callable[[Job], tuple] = Job.batch_key,
            order: Callable[[Job], int] | None = None) -> Iterator[list[Job]]:
    """Group jobs by ``key`` (size and settings), sort each group by ``order``, cut it into batches."""
    groups: dict[tuple, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[key(job)].append(job)
    for group in groups.values():
        if order is not None:
            group.sort(key=order)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def generate_batch(engine: Engine, batch: list[Job], max_attempts: int) -> list[Generated]:
    """Generate a batch, regenerating bad images with derived seeds; never raises for a job's failure."""
    seeds = {job.job_id: job.seed for job in batch}
    attempts: dict[str, list[Attempt]] = {job.job_id: [] for job in batch}
    images: dict[str, np.ndarray] = {}
    made_in: dict[str, int] = {}  # size of the call that made each delivered image (a retry's is smaller)
    reasons: dict[str, str] = {}
    todo = list(batch)
    start = time.perf_counter()
    for attempt in range(1, max_attempts + 1):
        if not todo:
            break
        try:
            arrays, used = generate_splitting(engine, todo, [seeds[j.job_id] for j in todo])
        except Exception as exc:  # a failed batch must not take the run down
            for job in todo:
                attempts[job.job_id].append(Attempt(seed=seeds[job.job_id], outcome="error"))
                reasons[job.job_id] = f"generation failed: {type(exc).__name__}: {str(exc)[:300]}"
            todo = []
            break
        retry = []
        for job, image in zip(todo, arrays):
            problem = image_problem(image)
            attempts[job.job_id].append(Attempt(seed=seeds[job.job_id], outcome=problem or "ok"))
            if problem is None:
                images[job.job_id] = image
                made_in[job.job_id] = used
            else:
                reasons[job.job_id] = f"{problem} image on all {max_attempts} attempts"
                seeds[job.job_id] = derive_seed(job.seed, "retry", attempt)
                retry.append(job)
        todo = retry
    per_image = (time.perf_counter() - start) / len(batch)
    return [
        Generated(job, images.get(job.job_id), attempts[job.job_id],
                  None if job.job_id in images else reasons[job.job_id], made_in.get(job.job_id, len(batch)), per_image)
        for job in batch
    ]


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def generate_splitting(engine: Engine, jobs: list[Job], seeds: list[int]) -> tuple[list[np.ndarray], int]:
    """``engine.generate``, halving the batch on out-of-memory until it fits; returns the images
    and the batch size that worked. One image that does not fit raises."""
    try:
        return engine.generate(jobs, seeds), len(jobs)
    except Exception as exc:
        if len(jobs) == 1 or not is_out_of_memory(exc):
            raise
    _free_gpu_cache()
    half = len(jobs) // 2
    first, used_first = generate_splitting(engine, jobs[:half], seeds[:half])
    second, used_second = generate_splitting(engine, jobs[half:], seeds[half:])
    return first + second, min(used_first, used_second)


def _free_gpu_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_name() -> str:
    """The Dask worker's name when running on one, else host:pid."""
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            return str(distributed.get_worker().name)
        except ValueError:  # not inside a worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def output_name(job: Job, suffix: str) -> str:
    """``<sku>_v<variant>_<job id>_<suffix>``: unique per job, readable per product."""
    return f"{safe_name(job.sku)}_v{job.variant}_{job.job_id[:12]}_{suffix}"


def image_prefix(job: Job) -> str:
    """The start of the path of every image the job delivers: ``images/<sku>/<template>/<name>_``."""
    return f"images/{safe_name(job.sku)}/{safe_name(job.template)}/{output_name(job, '')}"


def default_sealer() -> Sealer:
    """Embeds provenance naming this version of zimage-batch; no signature."""
    return Sealer(software_name(library_versions()["zimage-batch"]))


def finish(item: Generated, store: LocalStore, device: str, presets: Mapping[str, Preset] = PRESETS,
           sealer: Sealer | None = None, precision: str | None = None) -> tuple[ManifestRecord, dict[str, float]]:
    """Post-process, seal and store one generated image; return its manifest record and stage seconds.

    Every preset goes through the same quality gates as ``zimage-batch postprocess``; a white-background
    job is cut out for every preset. If any preset fails a gate the job is rejected: its files go to
    ``rejected/`` (never ``images/``) and the manifest lists every reason. Every file carries the
    job's provenance (and a C2PA signature when the sealer signs) before it is hashed and stored.
    """
    job = item.job
    sealer = sealer or default_sealer()
    seconds = {"postprocess": 0.0, "store": 0.0}
    common = dict(attempts=item.attempts, batch_size=item.batch_size, device=device, precision=precision,
                  c2pa_signer=sealer.signed_by,
                  worker=worker_name(), seconds=round(item.seconds, 4))
    if item.image is None:
        return ManifestRecord.for_job(job, status="failed", reasons=[item.reason], image_seed=None, outputs=[], **common), seconds
    image_seed = item.attempts[-1].seed
    stamp = Stamp.of(job.to_dict(), image_seed, sealer.software)
    folder = f"{safe_name(job.sku)}/{safe_name(job.template)}"
    start = time.perf_counter()
    source = Source(item.image)
    white = job.background == "white"
    results = [process(source, get_preset(name, presets), white=white) for name in job.presets]
    # Every file is sealed (provenance embedded, maybe signed) in memory before any is written, so a
    # seal that fails leaves no file behind. The size cap holds for the sealed bytes: a file the
    # metadata pushed over it is encoded again with that much room kept free.
    def seal(result: Processed) -> bytes | None:
        if result.rendered is None:
            return None
        return sealer.seal(result.rendered.data, stamp, f"{output_name(job, result.preset.name)}.{result.rendered.extension}")

    sealed = [seal(r) for r in results]
    for i, (result, data) in enumerate(zip(results, sealed)):
        cap = result.preset.max_bytes
        if data is not None and cap is not None and len(data) > cap and "over_size_cap" not in result.reasons:
            results[i] = process(source, result.preset, white=white, reserve=len(data) - len(result.rendered.data))
            sealed[i] = seal(results[i])
            if len(sealed[i]) > cap and "over_size_cap" not in results[i].reasons:  # the metadata varied
                results[i] = dataclasses.replace(results[i], reasons=(*results[i].reasons, "over_size_cap"))
    seconds["postprocess"] += time.perf_counter() - start
    reasons = list(dict.fromkeys(reason for result in results for reason in result.reasons))
    top = "rejected" if reasons else "images"
    files = [(f"{top}/{folder}/{output_name(job, r.preset.name)}.{r.rendered.extension}", r.rendered, r.preset.name, data)
             for r, data in zip(results, sealed) if r.rendered is not None]
    if len(files) < len(results):  # some preset could not even be framed: keep the raw image for review
        raw = render(source.image, get_preset("png"))
        files.append((f"rejected/{folder}/{output_name(job, 'raw')}.png", raw, "rejected",
                      sealer.seal(raw.data, stamp, f"{output_name(job, 'raw')}.png")))
    outputs = [_store(store, path, rendered, preset, data, seconds) for path, rendered, preset, data in files]
    record = ManifestRecord.for_job(job, status="rejected" if reasons else "ok", reasons=reasons, image_seed=image_seed,
                                    outputs=outputs, **common)
    return record, seconds


def _store(store: LocalStore, path: str, rendered: Rendered, preset: str, data: bytes, seconds: dict[str, float]) -> OutputFile:
    """Write one sealed file; its record entry."""
    start = time.perf_counter()
    written = store.write(path, data)
    seconds["store"] += time.perf_counter() - start
    return OutputFile(preset=preset, path=written.path, sha256=written.sha256, bytes=written.bytes,
                      width=rendered.width, height=rendered.height, format=rendered.format, mtime_ns=written.mtime_ns)


def process_shard(
    jobs: Sequence[Job],
    engine: Engine,
    store: LocalStore,
    manifest: ManifestPart,
    *,
    batch_size: int = 4,
    max_attempts: int = 3,
    presets: Mapping[str, Preset] = PRESETS,
    on_record: Callable[[ManifestRecord], None] | None = None,
    sealer: Sealer | None = None,
    stop_file: str | None = None,
) -> ShardResult:
    """Run every job of the shard; each finished job is in the manifest before this returns."""
    result = ShardResult(engines={engine.load_id: (engine.load_seconds, engine.loaded_at)})
    precision = engine.options.precision_label(engine.device)

    def finish_all(items: list[Generated]) -> None:
        for item in items:
            try:
                with stops_when_unwritable(store.root):  # a full or read-only --out stops the shard ...
                    record, seconds = finish(item, store, engine.device, presets, sealer, precision)
            except OutputError:
                raise
            except Exception as exc:  # ... but one bad image must not
                stage = "storing" if isinstance(exc, OSError) else "post-processing"
                reason = f"{stage} failed: {type(exc).__name__}: {str(exc)[:300]}"
                record = ManifestRecord.for_job(item.job, status="failed", reasons=[reason], image_seed=None, outputs=[],
                                                attempts=item.attempts, batch_size=item.batch_size, device=engine.device,
                                                precision=precision, worker=worker_name(), seconds=round(item.seconds, 4))
                seconds = {}
            with stops_when_unwritable(store.root):
                manifest.append(record)
            for stage, value in seconds.items():
                result.seconds[stage] += value
            if record.status == "ok":
                result.generated += 1
            elif record.status == "rejected":
                result.rejected += 1
            else:
                result.failed += 1
            if on_record is not None:
                on_record(record)

    waiting: deque[Future] = deque()
    batch_size = min(batch_size, engine.options.max_batch or batch_size)
    start = time.perf_counter()
    engine.prepare(jobs)  # every prompt of the shard, encoded once, before any image
    result.seconds["encode"] += time.perf_counter() - start
    result.prompts_cut = engine.prompts_cut(jobs)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zb-finish") as finisher:
            for batch in batches(jobs, batch_size, engine.batch_key, engine.caption_tokens):
                if stop_asked(stop_file):
                    raise Interrupted("stopped by Ctrl-C")  # the batches before this one are finished and recorded
                start = time.perf_counter()
                generated = generate_batch(engine, batch, max_attempts)
                result.seconds["generate"] += time.perf_counter() - start
                waiting.append(finisher.submit(finish_all, generated))
                while len(waiting) > 1:
                    waiting.popleft().result()
            while waiting:
                waiting.popleft().result()
    finally:
        engine.release(jobs)
    return result

"""The catalog-images flow: plan -> generate shards -> finish.

Run it from the CLI (``zimage-batch run``), or directly::

    from flows.catalog_images import run_catalog
    from zimage_batch.run import RunConfig
    run_catalog(RunConfig(catalogs=["catalogs/demo.csv"], templates=["templates/product_white.j2"],
                          out="out/", model="tiny-random"))

Tasks process shards of jobs, never one task per image. The run publishes Prefect artifacts: a
progress bar updated as shards finish, a summary table and a link to ``OUT/report.html``. The CLI runs it on a
local Prefect server it starts unless ``PREFECT_API_URL`` points at one.
"""

from __future__ import annotations

import time
from collections import deque

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import Progress, publish_summary
from zimage_batch import cluster, progress, run
from zimage_batch import shard as shards  # shards.STOP: imported by name, the Event broke serializing tasks for Dask
from zimage_batch.manifest import utc_now
from zimage_batch.shard import Interrupted, ShardResult
from zimage_batch.store import locked


@task(name="plan", cache_policy=NO_CACHE)
def plan(config: run.RunConfig) -> run.RunPlan:
    """Check inputs, expand the plan and skip finished jobs."""
    return run.plan_run(config)


@task(name="generate-shard", cache_policy=NO_CACHE, tags=["gpu"])
def generate_shard(config: run.RunConfig, index: int, jobs: list, stop_file: str | None = None) -> ShardResult:
    """Generate, post-process, store and record one shard of jobs."""
    return run.run_shard(config, index, jobs, stop_file)


@task(name="finish", cache_policy=NO_CACHE)
def finish(config: run.RunConfig, the_plan: run.RunPlan, results: list[ShardResult], started_at: str, wall_start: float) -> run.RunSummary:
    """Write the compacted manifest, manifest.parquet and run.json."""
    return run.finish_run(config, the_plan, results, started_at, wall_start)


@flow(name="catalog-images", log_prints=False)
def catalog_images(config: run.RunConfig) -> run.RunSummary:
    """Turn catalog rows into delivered images with a provenance manifest."""
    started_at, wall_start = utc_now(), time.perf_counter()
    the_plan = plan(config)
    tracker = Progress(the_plan)
    workers, gpu_resource = cluster.shape(config)
    limit = cluster.in_flight(config, workers)
    results, waiting = [], deque()
    with run.removed_on_failure(the_plan.pending_file, the_plan.current_file):  # e.g. a model that fails to load leaves no spool
        for index, shard in enumerate(run.read_shards(the_plan, config.shard_size)):
            if shards.STOP.is_set():  # a first Ctrl-C (cli.stopping_on_ctrl_c): no new shard
                break
            with cluster.gpu_annotation(gpu_resource):
                waiting.append(generate_shard.submit(config, index, shard, the_plan.stop_file))
            while len(waiting) >= limit:
                results.append(collect(waiting.popleft(), tracker))
        results.extend(collect(future, tracker) for future in waiting)  # those in flight stop after their batch
        if shards.STOP.is_set():
            raise KeyboardInterrupt  # every shard has ended: the run stops here, exit 130, without finishing
    summary = finish(config, the_plan, results, started_at, wall_start)
    publish_summary(summary)
    return summary


def collect(future, tracker: Progress) -> ShardResult:
    """Wait for a shard and report it to the progress bar and the progress artifact. A shard stopped by
    Ctrl-C counts as empty: what it finished is in its manifest part, for the rerun."""
    try:
        result = future.result()
    except Interrupted:
        result = ShardResult()
    progress.emit("shard", result)
    tracker.advance(result.images)
    return result


def run_catalog(config: run.RunConfig, device: str = "cpu") -> run.RunSummary:
    """Run the flow with the task runner the config asks for (in-process, local Dask or a cluster),
    holding the output folder's lock: a second run into the same ``--out`` stops with an error. A
    scheduler lost mid-run is a ``ClusterError`` that says how to resume."""
    runner = cluster.task_runner(config, device)
    flow_ = catalog_images.with_options(task_runner=runner) if runner is not None else catalog_images
    with locked(config.out):
        try:
            return flow_(config)
        except Exception as exc:
            lost = cluster.lost_scheduler(exc, config)
            if lost is None:
                raise
            raise lost from None

"""Incremental nightly runs: how long a rerun takes to recognise N unchanged jobs as done.

    python -m bench.incremental --jobs 200000

Builds (once per size, under bench/out/incremental-N/) a CSV catalog of N products, one template,
and an output folder where every job is finished: a small file per job and a manifest.jsonl record
with its SHA-256, size and mtime, as a run writes them. Then times ``run.plan_run`` (what a rerun
does before any GPU work: load the manifest, expand the plan, check every job's files) with the
default check (size + mtime: one ``stat`` per file) and with ``--verify-files`` (SHA-256 of every
file). Files are ``--bytes`` long (default 1 KB); real images are 100 KB to 2 MB, so the hash path
reads 100 to 2000 times more than here, while the default path does not read files at all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "---\nsize: 1024x1024\npresets: [web]\nbackground: scene\n---\nA {{ color }} {{ title }} on an oak table\n"


def build(folder: Path, jobs: int, size: int) -> tuple[Path, Path, Path]:
    """The catalog, the template and an output folder where all ``jobs`` are done."""
    from zimage_batch.manifest import Attempt, ManifestRecord, OutputFile
    from zimage_batch.plan import Job, check_inputs, plan_jobs
    from zimage_batch.postprocess import PRESETS

    catalog, template, out = folder / "catalog.csv", folder / "shot.j2", folder / "out"
    if (out / "manifest.jsonl").is_file():
        return catalog, template, out
    folder.mkdir(parents=True, exist_ok=True)
    with open(catalog, "w", encoding="utf-8") as f:
        f.write("sku,title,color,price\n")
        for i in range(jobs):
            f.write(f"SKU-{i:08d},Product {i},{('red', 'navy', 'green')[i % 3]},{i % 50}.99\n")
    template.write_text(TEMPLATE, encoding="utf-8")
    inputs = check_inputs([str(catalog)], [str(template)], "simulated:0", PRESETS)
    start = time.perf_counter()
    with open(out.parent / "manifest.tmp", "w", encoding="utf-8") as manifest:
        for job in plan_jobs(inputs):
            assert isinstance(job, Job)
            data = os.urandom(size)
            rel = f"images/{job.sku[-3:]}/{job.sku}_{job.job_id[:12]}_web.jpg"
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            output = OutputFile(preset="web", path=rel, sha256=hashlib.sha256(data).hexdigest(), bytes=size,
                                width=1024, height=1024, format="JPEG", mtime_ns=path.stat().st_mtime_ns)
            record = ManifestRecord.for_job(job, status="ok", image_seed=job.seed, outputs=[output], batch_size=1,
                                            attempts=[Attempt(seed=job.seed, outcome="ok")], device="cpu", seconds=1.0)
            manifest.write(record.model_dump_json() + "\n")
    os.replace(out.parent / "manifest.tmp", out / "manifest.jsonl")
    print(f"built {jobs:,} done jobs in {time.perf_counter() - start:.0f} s under {folder}")
    return catalog, template, out


def timed_plan(catalog: Path, template: Path, out: Path, verify: bool) -> tuple[float, float, object]:
    """(seconds for the whole plan_run, seconds to load the manifest alone, the plan)."""
    from zimage_batch.manifest import Manifest
    from zimage_batch.run import RunConfig, plan_run

    start = time.perf_counter()
    Manifest(out)
    load = time.perf_counter() - start
    config = RunConfig(catalogs=[str(catalog)], templates=[str(template)], out=str(out), model="simulated:0",
                       verify_files=verify)
    start = time.perf_counter()
    plan = plan_run(config)
    seconds = time.perf_counter() - start
    Path(plan.pending_file).unlink(missing_ok=True)
    return seconds, load, plan


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--bytes", type=int, default=1024, help="size of each finished file")
    parser.add_argument("--folder", type=Path, help="where to build (default bench/out/incremental-JOBS)")
    parser.add_argument("--no-verify", action="store_true", help="skip the --verify-files (hash everything) timing")
    args = parser.parse_args(argv)
    folder = args.folder or ROOT / "bench" / "out" / f"incremental-{args.jobs}"
    catalog, template, out = build(folder, args.jobs, args.bytes)
    result = {"jobs": args.jobs, "bytes": args.bytes, "machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    for name, verify in (("size+mtime", False), ("verify-files (SHA-256)", True)):
        if verify and args.no_verify:
            continue
        seconds, load, plan = timed_plan(catalog, template, out, verify)
        assert plan.skipped == plan.planned == args.jobs and plan.pending == 0, plan
        result[name] = round(seconds, 2)
        result[f"{name} manifest load"] = round(load, 2)
        print(f"{name:>24}: {args.jobs:,} of {plan.planned:,} jobs recognised as done in {seconds:.2f} s "
              f"(loading manifest.jsonl alone: {load:.2f} s)")
    return result


if __name__ == "__main__":
    main()

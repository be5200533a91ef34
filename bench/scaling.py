"""Scaling on Dask: end-to-end throughput with a simulated GPU, 1 worker vs N workers.

    python -m bench.scaling [--seconds-per-image 1.0] [--workers 4] [--images-per-worker 64] [--shard-size 32]
    python -m bench.scaling --local      # one `zimage-batch run` without Dask (Prefect's thread runner)

Each configuration is one `zimage-batch run --workers N` command in its own process. The generator
is `--model simulated:SECONDS`: it sleeps a fixed time per image (standing in for the GPU, no CPU
burn) and draws a synthetic product on off-white; everything else is real: the Prefect flow on a
local Dask cluster, the white-background cut-out, amazon_main and web renders, atomic
writes and manifest parts. Throughput is images over the span between the first and the last
image each worker wrote (plus one batch time), summed over workers, so cluster and worker start-up
are reported apart (command_seconds). Prints:
  end-to-end / generator-only at 1 worker (target >= 0.95)
  scaling efficiency at N workers = throughput(N) / (N x throughput(1)) (target >= 0.9)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = """---
size: 1024x1024
presets: [amazon_main, web]
background: white
---
Studio product photo of a {{ color }} {{ kind }} on a pure white background
"""


def throughput(out: Path, batch_seconds: float) -> tuple[float, int]:
    """Steady-state images per second: per worker, its images over the span from its first to its last
    record plus one batch time (the batch before its first record); summed over workers. Worker
    start-up (import, pipeline load), which the flow's wall time includes, is left out."""
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_worker: dict[str, list[float]] = {}
    for r in records:
        by_worker.setdefault(r["worker"], []).append(datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")).timestamp())
    rate = sum(len(t) / (max(t) - min(t) + batch_seconds) for t in by_worker.values())
    return rate, len(records)


def run(workers: int, images: int, seconds: float, shard_size: int, tmp: Path) -> dict:
    """One `zimage-batch run --workers N` in its own process, as a user runs it (no Dask for 0)."""
    catalog = tmp / f"catalog-{workers}.csv"
    with open(catalog, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "color", "kind"])
        for i in range(images):
            writer.writerow([f"SKU-{i:05d}", ("red", "navy", "green")[i % 3], ("mug", "bottle", "lamp")[i % 3]])
    template = tmp / "white.j2"
    template.write_text(TEMPLATE)
    out = tmp / f"out-{workers}"
    cmd = [str(Path(sys.executable).parent / "zimage-batch"), "run", str(catalog), "-t", str(template), "--out", str(out),
           "--model", f"simulated:{seconds}", "--batch-size", "4", "--shard-size", str(shard_size), "-q"]
    if workers:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    rate, count = throughput(out, seconds * 4)
    summary = json.loads((out / "run.json").read_text())
    return {"workers": workers, "images": count, "images_per_s": rate, "command_seconds": wall,
            "rejected": summary["rejected"], "failed": summary["failed"], "pipeline_loads": summary["pipeline_loads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-image", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--images-per-worker", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--local", action="store_true", help="one run without Dask instead of 1 vs N workers")
    args = parser.parse_args()
    generator_only = 1 / args.seconds_per_image
    if args.local:
        with tempfile.TemporaryDirectory() as tmp:
            local = run(0, args.images_per_worker, args.seconds_per_image, args.shard_size, Path(tmp))
        print(json.dumps(local, indent=2))
        print(f"\nno Dask: {local['images_per_s']:.3f} img/s; end-to-end / generator-only = "
              f"{local['images_per_s'] / generator_only:.3f} ({os.cpu_count()} CPUs, simulated GPU {args.seconds_per_image} s/image)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.images_per_worker, args.seconds_per_image, args.shard_size, Path(tmp))
        many = run(args.workers, args.images_per_worker * args.workers, args.seconds_per_image, args.shard_size, Path(tmp))
    print(json.dumps([one, many], indent=2))
    print(f"\n{os.cpu_count()} CPUs ({platform.machine()}), simulated GPU {args.seconds_per_image} s/image, 1024x1024 "
          f"-> amazon_main + web")
    print(f"1 worker:  {one['images_per_s']:.3f} img/s; end-to-end / generator-only = {one['images_per_s'] / generator_only:.3f}")
    efficiency = many["images_per_s"] / (args.workers * one["images_per_s"])
    print(f"{args.workers} workers: {many['images_per_s']:.3f} img/s; scaling efficiency = {efficiency:.3f}")


if __name__ == "__main__":
    main()

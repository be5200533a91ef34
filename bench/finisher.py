"""The CPU side of generation: what finishing one image costs, and what it costs the GPU's thread.

    python -m bench.finisher [--size 1024] [--images 8]

While the GPU makes a batch, one background thread post-processes, seals and stores the previous
one (`shard.finish`). This measures, on this machine's CPU:
  - seconds per image of `finish` for the throughput benchmark's job (png, scene background, a
    noise image as random weights make) and for a catalog job (white cut-out, three presets);
  - how much slower a Python loop of tiny torch ops (what launching GPU kernels looks like from
    Python) runs while the finisher works beside it: the two share the GIL;
  - the GPU's idle time between a shard's generate calls, with a simulated GPU (0.3 s per image,
    slower than the finisher here so it never waits for it): the GPU thread's own work between
    batches (checking each image, handing the batch over).
All must stay well below the GPU's time per image for the overlap to be free.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import CallTimes  # noqa: E402
from bench.throughput import bench_jobs  # noqa: E402
from zimage_batch.generate import SimulatedEngine, synthetic_product  # noqa: E402
from zimage_batch.manifest import Attempt, Manifest  # noqa: E402
from zimage_batch.models import ModelRef  # noqa: E402
from zimage_batch.plan import Job  # noqa: E402
from zimage_batch.shard import Generated, finish, process_shard  # noqa: E402
from zimage_batch.store import LocalStore  # noqa: E402


def seconds_per_image(jobs: list[Job], images: list[np.ndarray], store: LocalStore) -> float:
    start = time.perf_counter()
    for job, image in zip(jobs, images):
        finish(Generated(job, image, [Attempt(seed=job.seed, outcome="ok")], None, len(jobs), 1.0), store, "cuda")
    return (time.perf_counter() - start) / len(jobs)


def between_calls(jobs: list[Job], folder: Path, batch: int = 4, seconds_per_image: float = 0.3) -> float:
    """Seconds per image between a shard's generate calls, the GPU simulated."""
    engine = SimulatedEngine(seconds_per_image, ModelRef("local", "simulated", "simulated"), "bench:between")
    calls = CallTimes(engine)
    process_shard(jobs, engine, LocalStore(folder), Manifest(folder), batch_size=batch)
    return calls.summary(len(jobs))["between_calls_s_per_image"]


def launch_loop(ops: int) -> float:
    """Seconds for ``ops`` tiny in-place torch ops: Python-bound, like a stream of kernel launches."""
    import torch

    x = torch.ones(16)
    start = time.perf_counter()
    for _ in range(ops):
        x.add_(1.0)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="square image side (default 1024)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--ops", type=int, default=20_000, help="tiny torch ops in the launch loop")
    args = parser.parse_args(argv)

    size = f"{args.size}x{args.size}"
    rng = np.random.default_rng(0)
    bench = bench_jobs(args.images, size, 8)
    noise = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in bench]  # as the engine returns
    catalog = [Job(**{**j.to_dict(), "presets": ("amazon_main", "shopify", "web"), "background": "white"}) for j in bench]
    products = [synthetic_product(args.size, args.size, i) for i in range(len(bench))]
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        seconds_per_image(bench[:1], noise[:1], store)  # imports, ICC profile, first-call costs
        result = {"machine": platform.processor() or platform.machine(), "size": size,
                  "bench_job_s": seconds_per_image(bench, noise, store),
                  "catalog_job_s": seconds_per_image(catalog, products, store)}
        alone = launch_loop(args.ops)
        stop = threading.Event()

        def finisher() -> None:
            while not stop.is_set():
                seconds_per_image(catalog[:2], products[:2], store)

        thread = threading.Thread(target=finisher)
        thread.start()
        time.sleep(0.3)
        beside = launch_loop(args.ops)
        stop.set()
        thread.join()
        with tempfile.TemporaryDirectory() as shard_out:
            between = between_calls(bench, Path(shard_out))
    result.update(launch_alone_s=alone, launch_beside_finisher_s=beside, launch_slowdown=beside / alone,
                  between_calls_s_per_image=between)
    print(f"{result['machine']}, {size}: finish {result['bench_job_s']:.3f} s/image (png, scene, noise), "
          f"{result['catalog_job_s']:.3f} s/image (white cut-out + amazon_main, shopify, web); "
          f"{args.ops:,} tiny torch ops {alone:.3f} s alone, {beside:.3f} s beside the finisher "
          f"({result['launch_slowdown']:.2f}x); between generate calls {between * 1000:.1f} ms/image "
          f"(png jobs, batch 4, GPU simulated at 0.3 s/image)")
    return result


if __name__ == "__main__":
    main()

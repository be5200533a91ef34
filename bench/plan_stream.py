"""Planning streams: `zimage-batch plan` over a generated N-row Parquet catalog x 2 templates.

    python -m bench.plan_stream --rows 1000000

Generates the catalog (once, cached under bench/out/), then runs the real CLI command
`zimage-batch plan CATALOG -t product_white.j2 -t poster_text.j2 --jobs FILE` in a child
process and reports wall time and peak memory (ru_maxrss of the child).
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["bottle", "mug", "sneaker", "phone", "tea box", "t-shirt", "tote bag", "lamp"]


def make_catalog(path: Path, rows: int) -> None:
    """A Parquet catalog with the demo's columns and `rows` rows, written in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = 100_000
    schema = None
    with_writer = None
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        ids = range(start, start + n)
        table = pa.table({
            "sku": [f"SKU-{i:08d}" for i in ids],
            "title": [f"Product {i} {KINDS[i % 8]}" for i in ids],
            "title_zh": [f"商品{i}号" for i in ids],
            "brand": [f"Brand{i % 97}" for i in ids],
            "kind": [KINDS[i % 8] for i in ids],
            "color": [("red", "navy blue", "white", "black")[i % 4] for i in ids],
            "material": [("steel", "ceramic", "cotton", "glass")[i % 4] for i in ids],
            "price": [float(i % 500) for i in ids],
        })
        if with_writer is None:
            schema = table.schema
            with_writer = pq.ParquetWriter(path, schema)
        with_writer.write_table(table)
    with_writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    catalog = ROOT / "bench" / "out" / f"catalog-{args.rows}.parquet"
    if not catalog.exists():
        start = time.perf_counter()
        make_catalog(catalog, args.rows)
        print(f"generated {catalog} in {time.perf_counter() - start:.1f} s")
    jobs = ROOT / "bench" / "out" / "jobs.jsonl"
    cmd = [str(Path(sys.executable).parent / "zimage-batch"), "plan", str(catalog), "-t", str(ROOT / "templates/product_white.j2"),
           "-t", str(ROOT / "templates/poster_text.j2"), "--model", "tiny-random", "--jobs", str(jobs), "--show", "0"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode:
        sys.exit(done.stderr)
    lines = sum(1 for _ in open(jobs, encoding="utf-8"))
    print(done.stdout.strip())
    print(f"\nplan: {args.rows:,} rows x 2 templates -> {lines:,} jobs in {seconds:.1f} s "
          f"({lines / seconds:,.0f} jobs/s), peak RSS {peak_mb:,.0f} MB, on {platform.machine()} with "
          f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}")


if __name__ == "__main__":
    main()

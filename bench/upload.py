"""Upload throughput of the S3 delivery stage against a local SeaweedFS (``weed mini``).

    python -m bench.upload [--jobs 200] [--kb 500] [--workers 1 4 8]

Starts ``weed mini`` on free loopback ports (as the tests do), writes ``--jobs`` records of one
random ``--kb`` KB "JPEG" each, and delivers them with ``Uploader`` (one image PUT and one sidecar
PUT per job, create-only, CRC32 checked by the server) into a fresh prefix per worker count.
Loopback only: it measures our per-object overhead and the server, not a network.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from s3server import SeaweedFS  # noqa: E402

from zimage_batch.deliver import S3Destination, Uploader, connect  # noqa: E402
from zimage_batch.manifest import Attempt, ManifestRecord, OutputFile  # noqa: E402
from zimage_batch.plan import Job  # noqa: E402
from zimage_batch.store import LocalStore  # noqa: E402


def make_records(root: Path, jobs: int, size: int) -> list[ManifestRecord]:
    rng = np.random.default_rng(0)
    store, records = LocalStore(root), []
    for i in range(jobs):
        job = Job(job_id=f"bench{i:08d}", sku=f"SKU-{i}", catalog="bench.csv", row=i + 1, template="t", template_path="t.j2",
                  template_sha256="0", variant=0, prompt="a product", negative_prompt="", seed=i, width=1024, height=1024,
                  steps=8, guidance_scale=0.0, max_sequence_length=512, model="bench", presets=("web",), background="scene")
        written = store.write(f"images/SKU-{i}/t/SKU-{i}_web.jpg", rng.bytes(size))
        output = OutputFile(preset="web", path=written.path, sha256=written.sha256, bytes=written.bytes, width=1024,
                            height=1024, format="JPEG")
        records.append(ManifestRecord.for_job(job, status="ok", image_seed=i, attempts=[Attempt(seed=i, outcome="ok")],
                                              outputs=[output], batch_size=1, device="cpu", seconds=0.0))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kb", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedFS(Path(tmp), "bench-access", "bench-secret")
        try:
            server.start()
            server.client().create_bucket(Bucket="bench")
            os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="bench-access",
                              AWS_SECRET_ACCESS_KEY="bench-secret", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
            records = make_records(Path(tmp) / "out", args.jobs, args.kb * 1024)
            megabytes = args.jobs * args.kb * 1024 / 1e6
            print(f"{args.jobs} jobs x {args.kb} KB to weed mini on loopback; {os.cpu_count()} CPUs ({platform.machine()})")
            print(f"{'workers':>8}{'seconds':>10}{'images/s':>10}{'MB/s':>8}{'PUTs/s':>8}")
            for workers in args.workers:
                uploader = Uploader(S3Destination("bench", f"w{workers}"), connect(pool=workers * 2), Path(tmp) / "out",
                                    workers=workers, journal_every=10_000)
                start = time.perf_counter()
                for record in records:
                    uploader.submit(record)
                report = uploader.drain()
                seconds = time.perf_counter() - start
                uploader.close()
                assert report.delivered == args.jobs, report.problems[:3]
                print(f"{workers:>8}{seconds:>10.2f}{args.jobs / seconds:>10.1f}{megabytes / seconds:>8.1f}{2 * args.jobs / seconds:>8.1f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()

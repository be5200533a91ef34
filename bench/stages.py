"""Time per stage of the demo run (load, plan, generate, post-process, store), from its run.json.

    python -m bench.stages [--size 256x256] [--model tiny-random]

Runs the real CLI over catalogs/demo.csv with the three shipped templates into a fresh temp
folder and prints the stage table, so later work can see where time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ["product_white.j2", "lifestyle_scene.j2", "poster_text.j2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).parent / "zimage-batch"), "run", str(ROOT / "catalogs/demo.csv"), "--model", args.model,
               "--size", args.size, "--device", args.device, "--out", tmp, "-q"]
        for name in TEMPLATES:
            cmd += ["-t", str(ROOT / "templates" / name)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(done.stderr)
        run = json.loads((Path(tmp) / "run.json").read_text())
    images = run["generated"] + run["rejected"] + run["failed"]
    print(f"demo run: {images} images at {args.size}, model {run['model']}, {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"{'stage':<12}{'seconds':>10}{'per image':>12}")
    for stage, seconds in run["stage_seconds"].items():
        print(f"{stage:<12}{seconds:>10.2f}{seconds / max(images, 1):>12.3f}")
    print(f"{'flow total':<12}{run['seconds']:>10.2f}{run['seconds'] / max(images, 1):>12.3f}")
    print(f"{'command':<12}{wall:>10.2f}   (with Python start-up, Prefect's embedded server and model load)")
    print("post-process and store run in a thread beside generation, so stages overlap and do not add up.")


if __name__ == "__main__":
    main()

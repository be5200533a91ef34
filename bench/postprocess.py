"""Post-processing cost per image and preset, on one core.

    python -m bench.postprocess [--repeats 7] [--files 30]      (BENCH_CORE=1 pins to another core)

Pins itself to one CPU core (before numpy starts any thread), then times, for synthetic 1024x1024 product shots (the size the
model generates), the whole post-processing of one image for one preset: decode-free input,
sRGB conversion and checks, the cut-out (white presets), framing, encoding and the quality gates.
Also times a 6000x4000 studio JPEG (decoded with and without DCT scaling) and the
`zimage-batch postprocess` package function over a folder of PNG files. Prints Markdown tables
for bench/RESULTS.md. The issue's target: amazon_main under 150 ms of one core.
"""

from __future__ import annotations

import os

CORE = int(os.environ.get("BENCH_CORE", "0"))
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {CORE})  # first: threads started later (numpy's BLAS pool) inherit it

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from scenes import bottle_scene, encoded, mug_scene, shadow_scene  # noqa: E402

from zimage_batch.postprocess import PRESETS, Source, process  # noqa: E402
from zimage_batch.postprocess_files import open_image, postprocess_files  # noqa: E402


def timed(function, repeats: int) -> tuple[float, float]:
    """(min, median) CPU milliseconds of `function()` over `repeats` runs, after one warm-up.

    Also checks that wall time matches: pinned to one core, CPU time > wall time would mean
    threads spinning elsewhere, wall time >> CPU time a busy core.
    """
    function()
    times, walls = [], []
    for _ in range(repeats):
        start, wall = time.process_time(), time.perf_counter()
        function()
        times.append((time.process_time() - start) * 1000)
        walls.append((time.perf_counter() - wall) * 1000)
    if statistics.median(walls) > 1.3 * statistics.median(times):
        print(f"  (note: wall {statistics.median(walls):.0f} ms vs CPU {statistics.median(times):.0f} ms: the core is shared)")
    return min(times), statistics.median(times)


def per_preset(repeats: int) -> None:
    shots = {"bottle": bottle_scene((1024, 1024)).image, "mug": mug_scene((1024, 1024)).image,
             "soft shadow": shadow_scene((1024, 1024)).image}
    print("\n| preset | " + " | ".join(f"{name} (min / median ms)" for name in shots) + " |")
    print("|---|" + "---|" * len(shots))
    for name, preset in PRESETS.items():
        cells = []
        for image in shots.values():
            result = process(Source(image), preset)
            low, mid = timed(lambda image=image: process(Source(image), preset), repeats)
            cells.append(f"{low:.0f} / {mid:.0f}" + ("" if result.status == "ok" else f" ({','.join(result.reasons)})"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    marketplaces = [PRESETS[n] for n in ("amazon_main", "shopify", "google_mc", "ebay", "taobao_main", "jd_main")]

    def all_marketplaces() -> None:
        source = Source(shots["bottle"])  # one cut-out, shared by the six presets
        assert all(process(source, preset).status == "ok" for preset in marketplaces)

    cut_low, cut_mid = timed(lambda: Source(shots["bottle"]).cut(), repeats)
    all_low, all_mid = timed(all_marketplaces, max(3, repeats // 2))
    print(f"\nbottle: cut-out alone {cut_low:.0f} / {cut_mid:.0f} ms; the six marketplace presets from one shared "
          f"cut-out {all_low:.0f} / {all_mid:.0f} ms")


def studio_jpeg(repeats: int) -> None:
    data = encoded(bottle_scene((4000, 6000)).image, "JPEG", quality=92)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "studio.jpg"
        path.write_bytes(data)
        for label, max_side in (("decode at 1/2 scale (DCT scaling) to >= 2048 px, process at 2048", 2048),
                                ("full decode, process at 4096 (the default working size)", 4096)):
            def run(max_side=max_side):
                return process(Source(open_image(path, max_side), max_side=max_side), PRESETS["amazon_main"])
            assert run().status == "ok"
            low, mid = timed(run, max(3, repeats // 2))
            print(f"| 6000x4000 JPEG -> amazon_main, {label} | {low:.0f} | {mid:.0f} |")


def folder(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for i in range(count):
            path = Path(tmp) / f"shot{i:04d}.png"
            scene = (bottle_scene, mug_scene, shadow_scene)[i % 3]((1024, 1024))
            path.write_bytes(encoded(scene.image))
            inputs.append(str(path))
        start, cpu = time.perf_counter(), time.process_time()
        summary = postprocess_files(inputs, ["amazon_main", "web"], Path(tmp) / "out")
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"\n`postprocess_files`: {count} PNG files (1024x1024) x [amazon_main, web]: {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"{count / wall:.1f} images/s ({summary.ok} ok, {summary.rejected_count} rejected), file reads and atomic writes included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--files", type=int, default=30)
    args = parser.parse_args()
    from PIL import __version__ as pillow

    print(f"{date.today()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (pinned to core {CORE}), "
          f"Python {platform.python_version()}, Pillow {pillow}")
    print("CPU time (time.process_time) of one image for one preset, 1024x1024 in, fresh Source each time (cut-out included)")
    per_preset(args.repeats)
    print("\n| studio input | min ms | median ms |\n|---|---|---|")
    studio_jpeg(args.repeats)
    folder(args.files)


if __name__ == "__main__":
    main()

"""GPU throughput: a plain diffusers loop vs the project's engine, same prompts, one process.

    python -m bench.throughput                 # full-size Z-Image architecture, random weights, on the GPU
    python -m bench.throughput --model DIR     # a real ZImagePipeline folder instead
    python -m bench.throughput --tiny          # the same code on the CPU with tiny-random (< 1 min; run by the tests)

Variants, each on the same jobs (prompts and seeds from catalogs/demo.csv x templates), run in this
order whatever order --variants names them (later ones change the shared pipeline; a variant with
levers runs in its base's place, in the order given):
  sdpa           the attention kernel alone at the transformer's shape, per SDPA backend, and an
                 FFN-sized matmul: what the kernels reach on this card (TFLOP/s), to read MFU against.
  plain          `pipe(prompt)` one image at a time, eager: what a user writes first.
  engine         the project's engine through `process_shard` (generation plus the post-processing
                 and storing that overlap it): prompts encoded once per shard, batches of equal
                 caption buckets (no attention mask), eager.
  engine+compile the same, compiled: the transformer's repeated blocks and the VAE decoder (the
                 default on CUDA).
  engine+compile+mask    length-sorted batches with an attention mask where lengths differ.
  generate-only  the compiled engine's `generate` alone, batch after batch: no post-processing, no
                 storing. Against engine+compile it shows what the CPU side costs the GPU.
  profile        one batch of the compiled engine under torch.profiler: device time per kind of
                 kernel (matmul, attention, Inductor's fused elementwise, copies, other), the
                 device's idle time inside the call, the costliest kernels; the Chrome trace is
                 written beside --out (profile-trace.json.gz; profile+eager-vae writes profile-eager-vae-trace.json.gz).
  vram16         `--vram 16`: the text encoder streamed from CPU memory while prompts encode, batch 1.
  vram12         `--vram 12`: as vram16 plus int8 transformer weights, quantized layer by layer on
                 the way to the GPU (peak memory counted from before the quantization); eager,
                 whatever --compile says (EngineOptions.compiles).
  fp8            `--precision fp8`: a fresh transformer in float8 (torchao) and a resident text
                 encoder, compiled (first image after ~23 s on an H100).
  cold-start     a new process: time to the first image with Inductor's on-disk cache warm.
A variant that runs the engine can leave out one of its levers, to measure each alone:
`+complex-rope` (diffusers' complex rotary embedding instead of the engine's real-arithmetic one)
and `+eager-vae` (the VAE decoder not compiled); e.g. `engine+compile+eager-vae`. `+varied` runs an
engine variant on other jobs: the same prompts cut to 72-110 tokens, what Qwen's tokenizer makes of
them, so two caption buckets, partial batches and more than one compiled shape, as in a real run (no
image comparison: the plain loop's prompts are the whole ones). A batched variant
takes its own batch size after `@` (e.g. `engine+compile@8`; default --batch): per-call costs
(latents drawn on the CPU, the copy out) spread over more images.
Prints seconds per image (wall: everything from the first call to the last file; steady: from the
first batch's start, after the shard's prompts are encoded, to the last file; sustained: from the
pass's start, prompt encoding included, to the end of the last generate call, which leaves out only
the shard's last post-processing, overlapped by the next shard in a run; in gen: inside the
engine's generate calls; between: from one call's return to the next call, when the GPU has nothing
queued), images per hour, peak GPU memory, speedup over plain (sustained where measured, else
steady), an MFU estimate, where the device time went (transformer forwards, VAE decodes) and the
GPU's SM clock, temperature and power during each pass (nvidia-smi: so clock drift over a run shows),
and each variant with a lever, workload or batch size of its own against its base variant;
writes the rows as JSON to --out after every variant, so a run cut short keeps what it measured.
Variants not started within --budget seconds are skipped. Needs only torch, transformers,
diffusers, accelerate (the vram variants' streaming), numpy, Pillow, scipy, pydantic, jinja2,
pyyaml, jsonschema (torchao for fp8 and vram12) and this repo (no Prefect, no network).
The variants' names and sets are in bench/variants.py, the timers in bench/measure.py, the
full-size random-weight model in bench/full_size.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.full_size import build_full_size, fresh, group_offloaded  # noqa: E402
from bench.measure import (CallTimes, GpuMonitor, StageTimes, Timing, allocated_gb, free_gpu, gpu_id,  # noqa: E402
                           mean_seconds, peak_gb, reset_peak, sync)
from bench.variants import (BATCHED, DEFAULT_VARIANTS, LEVERS, ORDER, VARIANT_SETS, WORKLOADS,  # noqa: E402
                            configured, parse_variant)
from zimage_batch.generate import CAPTION_BUCKET, Engine, EngineOptions, build_tiny_pipeline, quiet_libraries  # noqa: E402
from zimage_batch.manifest import Manifest  # noqa: E402
from zimage_batch.plan import check_inputs, plan_jobs, Job  # noqa: E402
from zimage_batch.postprocess import PRESETS, Source  # noqa: E402
from zimage_batch.shard import batches, process_shard  # noqa: E402
from zimage_batch.store import LocalStore  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM datasheet


def attention_kernels(pipe, batch: int, tokens: int, device: str) -> dict:
    """SDPA at the transformer's attention shape (batch, heads, tokens, head dim) under each backend,
    and one FFN-sized matmul, in TFLOP/s: the ceilings the transformer's MFU is read against."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = pipe.transformer.config
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = (batch, cfg.n_heads, tokens, cfg.dim // cfg.n_heads)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    flops = 4 * batch * cfg.n_heads * tokens * tokens * shape[-1]
    row: dict = {"variant": "sdpa", "shape": list(shape)}
    for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def call():
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            seconds = mean_seconds(call, device)
        except RuntimeError as exc:  # a backend this device or shape does not have
            row[f"{name}_error"] = str(exc).splitlines()[0][:160]
            continue
        row[f"{name}_ms"], row[f"{name}_tflops"] = seconds * 1e3, flops / seconds / 1e12
    hidden = pipe.transformer.layers[0].feed_forward.w1.out_features
    x = torch.randn(batch * tokens, cfg.dim, device=device, dtype=dtype)
    w = torch.randn(cfg.dim, hidden, device=device, dtype=dtype)
    seconds = mean_seconds(lambda: x @ w, device)
    row["matmul_shape"] = [batch * tokens, cfg.dim, hidden]
    row["matmul_tflops"] = 2 * batch * tokens * cfg.dim * hidden / seconds / 1e12
    del q, k, v, x, w
    return row


def bench_jobs(count: int, size: str, steps: int, max_tokens: int | None = None) -> list[Job]:
    """`count` real jobs: the demo catalog through product_white then lifestyle_scene, one preset (png).

    ``max_tokens`` cuts captions to that many tokens: with random weights the tokenizer is byte-level
    (~3.5x the tokens of Qwen's BPE for these prompts), which would inflate the transformer's work.
    """
    templates = [str(ROOT / "templates" / n) for n in ("product_white.j2", "lifestyle_scene.j2")]
    inputs = check_inputs([str(ROOT / "catalogs/demo.csv")], templates, "tiny-random", PRESETS, size=size, steps=steps)
    jobs = sorted((j for j in plan_jobs(inputs) if isinstance(j, Job)), key=lambda j: j.template != "product_white")
    overrides = {"presets": ("png",), "background": "scene"}
    if max_tokens:
        overrides["max_sequence_length"] = max_tokens
    return [dataclasses.replace(j, **overrides) for j in jobs[:count]]


def varied_jobs(jobs: list[Job]) -> list[Job]:
    """The same jobs with each prompt cut to 72-110 byte-level tokens, chat template included (what
    Qwen's BPE makes of these prompts), so captions pad to 96 or 128 as in a real run: batches of two
    caption buckets, some of them partial (16 timed jobs split 10/6 at batch 4 and 8; tested), and
    the compiled blocks see several shapes."""
    low, high = VARIED_TOKENS

    def cut(i: int, prompt: str) -> str:  # 72, 79, 86, 93, 100, ... tokens: the same every run
        tokens = low + (i * 7) % (high - low + 1)
        return prompt.encode()[: tokens - CHAT_TOKENS].decode(errors="ignore")

    return [dataclasses.replace(j, prompt=cut(i, j.prompt), max_sequence_length=max(j.max_sequence_length, high))
            for i, j in enumerate(jobs)]


VARIED_TOKENS = (72, 110)  # caption tokens of the varied jobs, chat template included
CHAT_TOKENS = 19  # what the chat template adds, byte-level tokenizer


def run_plain(pipe, jobs: list[Job], device: str) -> Timing:
    """The plain diffusers loop: one `pipe(prompt)` call per image."""
    import torch

    images, done_at = [], []
    sync(device)
    start = time.perf_counter()
    for job in jobs:
        out = pipe(prompt=job.prompt, height=job.height, width=job.width, num_inference_steps=job.steps,
                   guidance_scale=job.guidance_scale, generator=torch.Generator("cpu").manual_seed(job.seed),
                   max_sequence_length=job.max_sequence_length)
        images.append(np.asarray(out.images[0]))
        done_at.append(time.perf_counter() - start)
    sync(device)
    return Timing(time.perf_counter() - start, done_at, images)


def run_engine(engine: Engine, jobs: list[Job], batch: int, device: str) -> Timing:
    """The project's engine through process_shard, storing lossless PNGs in a temp folder."""
    from PIL import Image

    done_at: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store, manifest = LocalStore(tmp), Manifest(tmp)
        sync(device)
        start = time.perf_counter()
        result = process_shard(jobs, engine, store, manifest, batch_size=batch,
                               on_record=lambda r: done_at.append(time.perf_counter() - start))
        sync(device)
        seconds = time.perf_counter() - start
        manifest.close()
        if result.failed:
            raise RuntimeError(f"engine failed {result.failed} jobs: {[r.reasons for r in manifest.records.values()]}")
        images = [np.asarray(Image.open(Path(tmp) / manifest.records[j.job_id].outputs[0].path).convert("RGB")) for j in jobs]
    return Timing(seconds, done_at, images, result.seconds["encode"])


def run_generate_only(engine: Engine, jobs: list[Job], batch: int, device: str) -> Timing:
    """The engine's own batches and prompt encoding, without post-processing or storing."""
    done_at, made = [], {}
    sync(device)
    start = time.perf_counter()
    engine.prepare(jobs)
    encoded_at = time.perf_counter() - start
    for group in batches(jobs, batch, engine.batch_key, engine.caption_tokens):
        for job, image in zip(group, engine.generate(group, [j.seed for j in group])):
            made[job.job_id] = np.asarray(Source(image).image)  # as stored: 8-bit RGB
            done_at.append(time.perf_counter() - start)
    sync(device)
    seconds = time.perf_counter() - start
    engine.release(jobs)
    return Timing(seconds, done_at, [made[j.job_id] for j in jobs], encoded_at)


KERNEL_KINDS = [  # (kind, name pattern), first match wins: CUDA kernel names on a GPU, aten op names on the CPU
    ("fused elementwise (Inductor)", re.compile(r"^triton_(poi|red|per)_|cpp_fused", re.I)),  # names may say "convolution"
    ("convolution (VAE)", re.compile(r"conv|fprop|dgrad|implicit_gemm", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|^triton_tem_|aten::(mm|addmm|bmm)$", re.I)),
    ("attention", re.compile(r"fmha|flash|sdpa|attention", re.I)),
    ("copies", re.compile(r"memcpy|memset|aten::copy_", re.I)),
]


def profile_batch(engine: Engine, jobs: list[Job], device: str, trace: Path) -> dict:
    """One generate call under torch.profiler: device time per kind of kernel, the GPU's idle time
    inside the call, the ten costliest kernels; the Chrome trace goes to ``trace`` (gzipped)."""
    import gzip
    import shutil

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    engine.prepare(jobs)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        engine.generate(jobs, [j.seed for j in jobs])
        wall = time.perf_counter() - start
    engine.release(jobs)
    if cuda:  # kernels, with their own (device) times
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:  # aten ops' own CPU time (no children), as if they were kernels
        kernels = [(e.name, e.time_range.start, e.time_range.start + e.self_cpu_time_total) for e in prof.events()
                   if e.name.startswith(("aten::", "cpp_fused", "graph_")) and e.self_cpu_time_total > 0]
    per_kind: dict[str, float] = {}
    per_name: dict[str, float] = {}
    for name, begin, end in kernels:
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(name)), "other")
        per_kind[kind] = per_kind.get(kind, 0.0) + (end - begin) / 1e6
        per_name[name] = per_name.get(name, 0.0) + (end - begin) / 1e6
    busy, reach = 0.0, None  # the union of kernel intervals: the time the device did something
    for _, begin, end in sorted(kernels, key=lambda k: k[1]):
        if reach is None or begin > reach:
            busy += end - begin
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    trace.parent.mkdir(parents=True, exist_ok=True)
    raw = trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    images = len(jobs)
    top = sorted(per_name.items(), key=lambda item: -item[1])[:10]
    return {"variant": "profile", "images": images, "wall_s_per_image": wall / images,
            "busy_s_per_image": busy / 1e6 / images, "idle_s_per_image": wall / images - busy / 1e6 / images,
            "kinds_s_per_image": {k: v / images for k, v in sorted(per_kind.items(), key=lambda item: -item[1])},
            "top_kernels_s_per_image": {name[:120]: v / images for name, v in top}, "trace": str(trace)}


def transformer_flops(pipe, job: Job, caption: int) -> float:
    """FLOPs of the transformer for one image with ``caption`` (padded) caption tokens: 2 x params x
    tokens + attention, per forward."""
    params = sum(p.numel() for p in pipe.transformer.parameters())
    tokens = (job.height // 16) * (job.width // 16) + caption
    cfg = pipe.transformer.config
    attention = 4 * tokens * tokens * cfg.dim * cfg.n_layers
    return job.steps * (2 * params * tokens + attention)


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b)]
    mse = np.mean([np.mean(d.astype(np.float64) ** 2) for d in diffs])
    return {"max_abs_diff": int(max(d.max() for d in diffs)), "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))}


def cold_start(batch: int) -> dict:
    """Time to the first batch in a fresh process whose compile reuses Inductor's on-disk cache."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("cold start (compile caches) is measured on CUDA only")
    child_out = Path(tempfile.gettempdir()) / "cold.json"
    cmd = [sys.executable, "-m", "bench.throughput", "--variants", "engine+compile", "--images", str(batch),
           "--batch", str(batch), "--out", str(child_out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    if done.returncode:
        raise RuntimeError(done.stderr[-800:])
    child = json.loads(child_out.read_text())["rows"][0]
    return {"variant": "cold-start", "process_seconds": time.perf_counter() - start, "first_image_s": child["first_image_s"],
            "note": "new process, same jobs and shapes, Inductor's on-disk cache from the run above"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-random on the CPU (checks the benchmark itself)")
    parser.add_argument("--model", help="a real ZImagePipeline folder instead of random full-size weights")
    parser.add_argument("--images", type=int, default=16, help="timed images per variant (default 16)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", default=None, help="default 1024x1024 (256x256 with --tiny)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96,
                        help="cut captions to this many tokens with random weights (byte-level tokenizer; "
                             "Qwen's BPE gives ~70-110 for these prompts); 512 keeps them whole")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"a set ({', '.join(f'{k}: {v}' for k, v in VARIANT_SETS.items())}), or "
                             f"comma-separated, from: {', '.join(ORDER)}; an engine variant may end in "
                             f"+{', +'.join(LEVERS)} or +varied, and {', '.join(BATCHED)} in "
                             f"@BATCH (default {DEFAULT_VARIANTS})")
    parser.add_argument("--budget", type=float, default=420,
                        help="seconds (from the start) after which no new variant starts (default 420: the longest, "
                             "fp8, then still ends inside 8 minutes)")
    parser.add_argument("--out", default=str(ROOT / "bench/out/throughput.json"))
    args = parser.parse_args(argv)
    names = ",".join(VARIANT_SETS.get(name, name) for name in args.variants.split(","))  # sets expanded
    wanted = list(dict.fromkeys(names.split(",")))  # each once
    parsed = {name: parse_variant(name) for name in wanted}
    unknown = [name for name, variant in parsed.items() if variant is None]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: use {', '.join(ORDER)}, the engine ones optionally with "
                     f"+{', +'.join(LEVERS)} or +varied, and {', '.join(BATCHED)} with @BATCH "
                     f"(e.g. engine+compile+eager-vae@8)")
    wanted.sort(key=lambda name: ORDER.index(parsed[name].base))  # stable: levers keep the order given

    import torch

    began = time.perf_counter()
    quiet_libraries()
    device = "cpu" if args.tiny else "cuda"
    size = args.size or ("256x256" if args.tiny else "1024x1024")
    if device == "cpu":
        torch.set_flush_denormal(True)
    if args.tiny:
        pipe = build_tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
    elif args.model:
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = build_full_size(device)
    build_seconds = time.perf_counter() - began
    largest = max([args.batch, *(v.batch for v in parsed.values() if v.batch)])  # warm-up jobs for the largest batch
    jobs = bench_jobs(args.images + largest, size, args.steps, None if args.tiny else args.max_tokens)
    timed = jobs[args.batch : args.batch + args.images]  # the same jobs whatever the batch sizes asked
    warm = jobs[: args.batch] + jobs[args.batch + args.images :]
    # With a real model's tokenizer (Qwen's BPE) the whole prompts are already ~70-110 tokens.
    varied = bench_jobs(args.images + largest, size, args.steps) if args.model else varied_jobs(jobs)
    workloads = {(): (timed, warm), ("varied",): (varied[args.batch : args.batch + args.images],
                                                  varied[: args.batch] + varied[args.batch + args.images :])}
    if len(timed) < args.images:
        parser.error(f"the demo catalog makes {len(jobs)} jobs: ask for at most {len(jobs) - largest} --images")
    caption = -(-(args.max_tokens if not args.tiny else 96) // CAPTION_BUCKET) * CAPTION_BUCKET  # as the transformer pads
    flops = transformer_flops(pipe, timed[0], caption)
    rows: list[dict] = []
    plain_images: list[np.ndarray] | None = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    result = {"device": gpu, "torch": torch.__version__, "size": size, "steps": args.steps, "images": len(timed),
              "batch": args.batch, "date": time.strftime("%Y-%m-%d"), "build_seconds": round(build_seconds, 1),
              "allocator": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "command": " ".join(["python -m bench.throughput", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    print(f"{gpu}; torch {torch.__version__}; {len(timed)} images at {size}, {args.steps} steps; build {build_seconds:.1f} s",
          flush=True)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    def record(name: str, timing: Timing, first_image: float, batch: int, calls: CallTimes | None = None,
               extra: dict | None = None, same_prompts: bool = True) -> None:
        row = {"variant": name, "s_per_image": timing.seconds / len(timed), "steady_s_per_image": timing.steady(),
               "batch": batch, "peak_gpu_gb": peak_gb(device), "first_image_s": first_image}
        if calls is not None:
            row.update(calls.summary(len(timed)))
        rate = row.get("sustained_s_per_image", row["steady_s_per_image"])  # what the speedup is taken on
        row.update({"images_per_hour": 3600 / rate, "mfu": flops / rate / H100_BF16_PEAK if device == "cuda" else None})
        row.update(extra or {})
        if row.get("transformer_s_per_image") and device == "cuda":
            row["transformer_mfu"] = flops / row["transformer_s_per_image"] / H100_BF16_PEAK
        if plain_images is not None and name != "plain" and same_prompts:
            row.update(compare(plain_images, timing.images))
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def plain() -> None:
        nonlocal plain_images
        reset_peak(device)
        first = run_plain(pipe, warm[:1], device)
        with GpuMonitor(gpu_id(device)) as gpu:
            timing = run_plain(pipe, timed, device)
        plain_images = timing.images
        record("plain", timing, first.seconds, 1, extra=gpu.summary())

    def engine_pass(name: str, options: EngineOptions, batch: int, runner=run_engine, peak_from_load: bool = False,
                    applied: tuple[str, ...] = ()) -> None:
        """Configure, take the levers out, warm up, time. ``peak_gpu_gb`` is the timed
        pass's peak; ``warmup_peak_gb`` covers the warm-up (compiling) and, with ``peak_from_load``,
        configuring (quantizing) too."""
        if peak_from_load:
            reset_peak(device)
        with configured(pipe, device, name, options, applied) as engine:
            if not peak_from_load:
                reset_peak(device)
            resident = allocated_gb(device)
            # Compiling, warm up on the timed jobs themselves, so every batch shape (and mask / no
            # mask) compiles before the clock starts; else a short warm-up.
            compiling = engine.options.compiles and device == "cuda"  # configure compiles on CUDA only
            timed_jobs, warm_jobs = workloads[tuple(lever for lever in applied if lever in WORKLOADS)]
            first = runner(engine, timed_jobs if compiling else warm_jobs[:batch], batch, device)
            print(f"  warm-up: {first.seconds:.1f} s for {len(first.done_at)} images", flush=True)
            warmup_peak = peak_gb(device)
            reset_peak(device)
            calls, split = CallTimes(engine), StageTimes(pipe, device)
            try:
                with GpuMonitor(gpu_id(device)) as gpu:
                    timing = runner(engine, timed_jobs, batch, device)
            finally:
                split.close()
        extra = {"resident_gb_at_start": resident, "warmup_peak_gb": warmup_peak} if device == "cuda" else {}
        record(name, timing, min(first.done_at), batch, calls, {**extra, **split.summary(len(timed)), **gpu.summary()},
               same_prompts="varied" not in applied)  # varied jobs have other prompts than the plain loop's

    def vram12(name: str, applied: tuple[str, ...], batch: int) -> None:
        pipe.transformer = None
        free_gpu()
        pipe.transformer = fresh("transformer", args, device).to("cpu")  # as from_pretrained leaves it
        if not group_offloaded(pipe.text_encoder):  # vram16 did not run: the encoder is still on the GPU
            pipe.text_encoder.to("cpu")
        free_gpu()
        engine_pass(name, EngineOptions(compile=True, vram_gb=12), 1, peak_from_load=True, applied=applied)

    def fp8(name: str, applied: tuple[str, ...], batch: int) -> None:
        if device != "cuda":
            raise Skip("fp8 needs a CUDA GPU with FP8 tensor cores")
        pipe.transformer = pipe.text_encoder = None  # the text encoder was set to stream: a resident one instead
        free_gpu()
        pipe.transformer, pipe.text_encoder = fresh("transformer", args, device), fresh("text_encoder", args, device)
        engine_pass(name, EngineOptions(compile=True, precision="fp8"), batch, applied=applied)

    def profiled(name: str, applied: tuple[str, ...], batch: int) -> None:
        jobs = timed[:batch]
        with configured(pipe, device, name, EngineOptions(compile=True), applied) as engine:
            run_generate_only(engine, jobs, batch, device)  # this batch's shapes compiled before the profile
            trace = Path(args.out).parent / f"{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}-trace.json.gz"  # profile-eager-vae-...
            row = profile_batch(engine, jobs, device, trace)
        row.update(variant=name, batch=len(jobs))
        rows.append(row)
        print(json.dumps(row), flush=True)

    def sdpa(name: str, applied: tuple[str, ...], batch: int) -> None:
        tokens = (timed[0].height // 16) * (timed[0].width // 16) + caption
        row = attention_kernels(pipe, batch, tokens, device)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def passes(options: EngineOptions, runner=run_engine, batch: int | None = None):
        return lambda name, applied, asked: engine_pass(name, options, batch or asked, runner, applied=applied)

    bodies = {
        "sdpa": sdpa,
        "plain": lambda name, applied, batch: plain(),
        "engine": passes(EngineOptions()),
        "engine+compile": passes(EngineOptions(compile=True)),
        "engine+compile+mask": passes(EngineOptions(compile=True, bucket_captions=False)),
        "generate-only": passes(EngineOptions(compile=True), run_generate_only),
        "profile": profiled,
        "vram16": passes(EngineOptions(compile=True, vram_gb=16), batch=1),
        "vram12": vram12,
        "fp8": fp8,
        "cold-start": lambda name, applied, batch: rows.append(cold_start(args.batch)),
    }
    for name in wanted:
        if time.perf_counter() - began > args.budget:
            rows.append({"variant": name, "skipped": f"not started: past the {args.budget:.0f} s budget"})
            continue
        print(f"[{time.perf_counter() - began:.0f} s] {name}", flush=True)
        try:
            variant = parsed[name]
            bodies[variant.base](name, variant.levers, variant.batch or args.batch)
        except Skip as skip:
            rows.append({"variant": name, "skipped": str(skip)})
        except Exception as exc:  # noqa: BLE001 - one failed variant must not cost the others
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
        save()
    result["total_seconds"] = round(time.perf_counter() - began, 1)
    save()
    print_table(rows)
    return result


class Skip(Exception):
    """A variant that cannot run here (not a failure)."""


def print_table(rows: list[dict]) -> None:
    base = next((r["steady_s_per_image"] for r in rows if r["variant"] == "plain" and "steady_s_per_image" in r), None)
    print(f"\n{'variant':<30}{'wall s/img':>11}{'steady':>8}{'sustained':>10}{'in gen':>8}{'between':>8}{'img/hour':>10}"
          f"{'peak GB':>9}{'speedup':>9}{'MFU':>6}{'1st img s':>10}{'PSNR dB':>9}{'SM MHz':>8}")

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "-"

    for r in rows:
        if r["variant"] == "cold-start" and "first_image_s" in r:
            print(f"{'cold-start':<30}first image after {r['first_image_s']:.1f} s in a new process "
                  f"({r['process_seconds']:.0f} s in all, building the weights included)")
            continue
        if r["variant"] == "sdpa" and "shape" in r:
            kernels = ", ".join(f"{name} {r[name + '_tflops']:.0f}" for name in ("default", "flash", "cudnn", "efficient")
                                if name + "_tflops" in r)
            print(f"{'sdpa':<30}attention {r['shape']} TFLOP/s: {kernels}; matmul {r['matmul_shape']}: "
                  f"{r['matmul_tflops']:.0f} TFLOP/s")
            continue
        if r["variant"].startswith("profile") and "kinds_s_per_image" in r:
            kinds = ", ".join(f"{kind} {seconds:.3f}" for kind, seconds in r["kinds_s_per_image"].items())
            print(f"{r['variant']:<30}one batch, per image: {r['wall_s_per_image']:.3f} s in the call, device busy "
                  f"{r['busy_s_per_image']:.3f}, idle {r['idle_s_per_image']:.3f}; {kinds}; trace {r['trace']}")
            continue
        if "steady_s_per_image" not in r:
            print(f"{r['variant']:<30}{r.get('error') or r.get('skipped') or r}")
            continue
        rate = r.get("sustained_s_per_image", r["steady_s_per_image"])
        speed = f"{base / rate:.2f}x" if base else "-"
        mem = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] is not None else "-"
        mfu = f"{r['mfu']:.0%}" if r["mfu"] is not None else "-"
        psnr = f"{r['psnr_db']:.1f}" if "psnr_db" in r else "-"
        clock = f"{r['gpu_sm_mhz_mean']:.0f}" if "gpu_sm_mhz_mean" in r else "-"
        print(f"{r['variant']:<30}{r['s_per_image']:>11.3f}{r['steady_s_per_image']:>8.3f}{cell(r, 'sustained_s_per_image'):>10}"
              f"{cell(r, 'in_generate_s_per_image'):>8}{cell(r, 'between_calls_s_per_image'):>8}"
              f"{3600 / rate:>10,.0f}{mem:>9}{speed:>9}{mfu:>6}{r['first_image_s']:>10.1f}{psnr:>9}{clock:>8}")
    for r in rows:
        if "transformer_s_per_image" in r:
            rest = r["in_generate_s_per_image"] - r["transformer_s_per_image"] - r["vae_decode_s_per_image"]
            print(f"{r['variant']}: per image {r['transformer_s_per_image']:.3f} s in transformer forwards, "
                  f"{r['vae_decode_s_per_image']:.3f} s in VAE decodes, {rest:.3f} s else inside the generate calls"
                  + (f"; transformer MFU {r['transformer_mfu']:.0%}" if "transformer_mfu" in r else ""))
    for line in against_base(rows):
        print(line)


def against_base(rows: list[dict]) -> list[str]:
    """Each variant with levers, a workload or its own batch size against its base variant
    of the same run (sustained s per image): what the next change to the defaults rests on."""
    rates = {r["variant"]: r["sustained_s_per_image"] for r in rows if "sustained_s_per_image" in r}
    lines = []
    for name, rate in rates.items():
        variant = parse_variant(name)
        if variant is None or variant.base not in rates or name == variant.base:
            continue
        base = rates[variant.base]
        lines.append(f"{name}: {rate:.3f} s per image vs {variant.base} {base:.3f} s ({(rate / base - 1) * 100:+.1f}%)")
    return lines


if __name__ == "__main__":
    main()

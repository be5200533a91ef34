"""GPU throughput: a plain diffusers loop vs the project's engine, same prompts, one process.

    python -m bench.throughput                 # full-size Z-Image architecture, random weights, on the GPU
    python -m bench.throughput --model DIR     # a real ZImagePipeline folder instead
    python -m bench.throughput --tiny          # the same code on the CPU with tiny-random (< 1 min; run by the tests)

Variants, each on the same jobs (prompts and seeds from catalogs/demo.csv x templates):
  plain          `pipe(prompt)` one image at a time, eager: what a user writes first.
  engine         the project's engine through `process_shard` (generation plus the post-processing
                 and storing that overlap it): prompts encoded once per shard, batches of equal
                 caption buckets (no attention mask), eager.
  engine+compile the same after `compile_repeated_blocks` (the default on CUDA).
  engine+compile+mask    length-sorted batches with an attention mask where lengths differ.
  vram16         the compiled engine with the text encoder off the GPU between shards, batch 1.
Prints seconds per image, images per hour, peak GPU memory, speedup over plain and an MFU
estimate for the transformer; writes the rows as JSON to --out. Needs only torch,
transformers, diffusers, numpy, Pillow, scipy, pydantic and this repo (no Prefect, no network).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zimage_batch.generate import Engine, EngineOptions, build_tiny_pipeline, configure, quiet_libraries  # noqa: E402
from zimage_batch.manifest import Manifest  # noqa: E402
from zimage_batch.models import ModelRef  # noqa: E402
from zimage_batch.plan import check_inputs, plan_jobs, Job  # noqa: E402
from zimage_batch.postprocess import PRESETS  # noqa: E402
from zimage_batch.shard import process_shard  # noqa: E402
from zimage_batch.store import LocalStore  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, H100 SXM datasheet


def build_full_size(device: str):
    """The full-size Z-Image-Turbo architecture with random weights (same FLOPs as the real model)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_pipeline().tokenizer  # byte-level: ~3x the tokens of Qwen's BPE for English text
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
            text_encoder = Qwen3Model(Qwen3Config(
                hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
                tie_word_embeddings=True))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for module in (transformer, text_encoder, vae):
            for param in module.parameters():
                if param.ndim == 2:
                    param.normal_(0.0, 0.02)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    return [Job(**{**j.to_dict(), **overrides}) for j in jobs[:count]]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    """Peak GPU memory held by PyTorch's allocator (reserved, i.e. what the card must have)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_reserved() / 1e9
    return None


def run_plain(pipe, jobs: list[Job], device: str) -> tuple[float, list[np.ndarray]]:
    """The plain diffusers loop: one `pipe(prompt)` call per image."""
    import torch

    images = []
    sync(device)
    start = time.perf_counter()
    for job in jobs:
        out = pipe(prompt=job.prompt, height=job.height, width=job.width, num_inference_steps=job.steps,
                   guidance_scale=job.guidance_scale, generator=torch.Generator("cpu").manual_seed(job.seed),
                   max_sequence_length=job.max_sequence_length)
        images.append(np.asarray(out.images[0]))
    sync(device)
    return time.perf_counter() - start, images


def run_engine(engine: Engine, jobs: list[Job], batch: int, device: str) -> tuple[float, list[np.ndarray], float]:
    """The project's engine through process_shard, storing lossless PNGs in a temp folder.

    Returns total seconds, the images, and the seconds until the first image was stored."""
    from PIL import Image

    first: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store, manifest = LocalStore(tmp), Manifest(tmp)
        sync(device)
        start = time.perf_counter()
        result = process_shard(jobs, engine, store, manifest, batch_size=batch,
                               on_record=lambda r: first or first.append(time.perf_counter() - start))
        sync(device)
        seconds = time.perf_counter() - start
        manifest.close()
        if result.failed:
            raise RuntimeError(f"engine failed {result.failed} jobs: {[r.reasons for r in manifest.records.values()]}")
        images = [np.asarray(Image.open(Path(tmp) / manifest.records[j.job_id].outputs[0].path).convert("RGB")) for j in jobs]
    return seconds, images, first[0]


def transformer_flops(pipe, job: Job) -> float:
    """FLOPs of the transformer for one image: 2 x params x tokens + attention, per forward."""
    params = sum(p.numel() for p in pipe.transformer.parameters())
    tokens = (job.height // 16) * (job.width // 16) + 128
    cfg = pipe.transformer.config
    attention = 4 * tokens * tokens * cfg.dim * cfg.n_layers
    return job.steps * (2 * params * tokens + attention)


def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b)]
    mse = np.mean([np.mean(d.astype(np.float64) ** 2) for d in diffs])
    return {"max_abs_diff": int(max(d.max() for d in diffs)), "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))}


def cold_start(images: int, batch: int) -> dict:
    """Time to the first batch in a fresh process whose compile reuses Inductor's on-disk cache."""
    cmd = [sys.executable, "-m", "bench.throughput", "--variants", "engine+compile", "--images", str(images),
           "--batch", str(batch), "--out", str(Path(tempfile.gettempdir()) / "cold.json")]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400)
    if done.returncode:
        raise RuntimeError(done.stderr[-800:])
    child = json.loads((Path(tempfile.gettempdir()) / "cold.json").read_text())["rows"][0]
    return {"variant": "cold-start", "process_seconds": time.perf_counter() - start, "first_image_s": child["first_image_s"],
            "note": "new process, same jobs and shapes, Inductor's on-disk cache from the run above"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-random on the CPU (checks the benchmark itself)")
    parser.add_argument("--model", help="a real ZImagePipeline folder instead of random full-size weights")
    parser.add_argument("--images", type=int, default=12, help="timed images per variant (default 12)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", default=None, help="default 1024x1024 (256x256 with --tiny)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96,
                        help="cut captions to this many tokens with random weights (byte-level tokenizer; "
                             "Qwen's BPE gives ~70-110 for these prompts); 512 keeps them whole")
    parser.add_argument("--variants", default="plain,engine,engine+compile,vram16,cold-start")
    parser.add_argument("--out", default=str(ROOT / "bench/out/throughput.json"))
    args = parser.parse_args(argv)

    import torch

    quiet_libraries()
    device = "cpu" if args.tiny else "cuda"
    size = args.size or ("256x256" if args.tiny else "1024x1024")
    if device == "cpu":
        torch.set_flush_denormal(True)
    start = time.perf_counter()
    if args.tiny:
        pipe = build_tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
    elif args.model:
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = build_full_size(device)
    build_seconds = time.perf_counter() - start
    jobs = bench_jobs(args.images + args.batch, size, args.steps, None if args.tiny else args.max_tokens)
    warm, timed = jobs[: args.batch], jobs[args.batch :]
    variants = args.variants.split(",")
    flops = transformer_flops(pipe, timed[0])
    rows, plain_images = [], None
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"{gpu}; torch {torch.__version__}; {len(timed)} images at {size}, {args.steps} steps; build {build_seconds:.1f} s", flush=True)

    def record(name: str, seconds: float, images: list[np.ndarray], first_image: float, batch: int) -> None:
        per_image = seconds / len(timed)
        row = {"variant": name, "s_per_image": per_image, "images_per_hour": 3600 / per_image, "batch": batch,
               "peak_gpu_gb": peak_gb(device), "first_image_s": first_image,
               "mfu": flops / per_image / H100_BF16_PEAK if device == "cuda" else None}
        if plain_images is not None and name != "plain":
            row.update(compare(plain_images, images))
        rows.append(row)
        print(json.dumps(row), flush=True)

    def attempt(name: str, body) -> None:
        """Run one variant; a failure is recorded, not fatal, so one GPU call measures the rest."""
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)

    def plain() -> None:
        nonlocal plain_images
        reset_peak(device)
        first_image, _ = run_plain(pipe, warm[:1], device)
        seconds, plain_images = run_plain(pipe, timed, device)
        record("plain", seconds, plain_images, first_image, 1)

    def engine_variant(name: str, options: EngineOptions, batch: int, load_id: str):
        def body() -> None:
            engine = Engine(configure(pipe, device, options), device, ModelRef("local", "bench", "bench"), 0.0, load_id, options)
            reset_peak(device)
            # Warm up on the timed jobs themselves when compiling: every batch shape (and
            # mask / no mask) compiles before the clock starts.
            _, _, first_image = run_engine(engine, timed if options.compile else warm[:batch], batch, device)
            seconds, images, _ = run_engine(engine, timed, batch, device)
            record(name, seconds, images, first_image, batch)
        return body

    bodies = {
        "plain": plain,
        "engine": engine_variant("engine", EngineOptions(), args.batch, "bench:0"),
        "engine+compile": engine_variant("engine+compile", EngineOptions(compile=True), args.batch, "bench:1"),
        "engine+compile+mask": engine_variant("engine+compile+mask", EngineOptions(compile=True, bucket_captions=False),
                                              args.batch, "bench:3"),
        "vram16": engine_variant("vram16", EngineOptions(compile="engine+compile" in variants, vram_gb=16), 1, "bench:2"),
    }
    for name in variants:
        if name in bodies:
            attempt(name, bodies[name])
    if "cold-start" in variants and device == "cuda":
        attempt("cold-start", lambda: rows.append(cold_start(args.images, args.batch)))

    base = next((r["s_per_image"] for r in rows if r["variant"] == "plain"), None)
    print(f"\n{'variant':<16}{'s/image':>9}{'img/hour':>10}{'peak GB':>9}{'speedup':>9}{'MFU':>7}{'1st img s':>11}{'PSNR dB':>9}")
    for r in rows:
        if "s_per_image" not in r:
            print(f"{r['variant']:<16}{r.get('error') or r}")
            continue
        speed = f"{base / r['s_per_image']:.2f}x" if base else "-"
        mem = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] is not None else "-"
        mfu = f"{r['mfu']:.0%}" if r["mfu"] is not None else "-"
        psnr = f"{r['psnr_db']:.1f}" if "psnr_db" in r else "-"
        print(f"{r['variant']:<16}{r['s_per_image']:>9.3f}{r['images_per_hour']:>10,.0f}{mem:>9}{speed:>9}{mfu:>7}{r['first_image_s']:>11.1f}{psnr:>9}")
    result = {"device": gpu, "torch": torch.__version__, "size": size, "steps": args.steps, "images": len(timed),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m bench.throughput", *(argv or sys.argv[1:])]),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""The throughput benchmark's variants: their names (a base, levers taken out, trials and workloads
put in, a batch size after ``@``), the named sets sized for one device call, and the engine each one
runs on the shared pipeline. What each variant measures is in ``bench/throughput.py``'s docstring."""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zimage_batch.blocks import RealRopeAttnProcessor, unfuse_projections, use_real_rope  # noqa: E402
from zimage_batch.generate import Engine, EngineOptions, configure  # noqa: E402
from zimage_batch.models import ModelRef  # noqa: E402

ORDER = ["sdpa", "plain", "engine", "engine+compile", "engine+compile+mask", "generate-only", "profile", "vram16", "vram12",
         "fp8", "cold-start"]
LEVERS = ("complex-rope", "eager-vae")  # the engine without one of its levers, e.g. engine+compile+eager-vae
UNLEVERED = ("sdpa", "plain", "cold-start")
COMPILED = ("engine+compile", "engine+compile+mask", "generate-only", "profile", "vram16", "fp8")
WORKLOADS = {"varied": ("engine", "engine+compile", "engine+compile+mask", "generate-only")}  # other jobs: (bases)
TRIALS = {  # engine options tried before they become defaults, e.g. engine+compile+fused: (option changes, bases)
    "fused": ({"fuse_projections": True}, COMPILED),
    "tensorwise": ({"fp8_scales": "tensor"}, ("fp8",)),
}
BATCHED = ("sdpa", "engine", "engine+compile", "engine+compile+mask", "generate-only", "profile", "fp8")  # take @N
# Named sets, each sized for one device call (~5-6 minutes on an H100, estimated from the runs in
# bench/RESULTS.md, build and compile warm-ups included): "bf16-set" decides the default profile's
# trials and batch size, "fp8-set" the fp8 trials and the re-measured 16 GB profile. Each has the
# plain loop, the baseline every speedup is taken against in the same process.
VARIANT_SETS = {
    "bf16-set": "plain,engine+compile,engine+compile+fused,engine+compile@8,engine+compile+varied,profile,profile+fused",
    "fp8-set": "plain,vram16,fp8,fp8+fused,fp8+tensorwise",
    "memory-set": "plain,engine+compile,vram16,vram12,cold-start",
}
DEFAULT_VARIANTS = "bf16-set"


class Variant(NamedTuple):
    base: str
    levers: tuple[str, ...] = ()
    batch: int | None = None  # None: --batch


def parse_variant(name: str) -> Variant | None:
    """``engine+compile+complex-rope+eager-vae@8`` -> the base variant, the levers it leaves out (or
    the trials it puts in), its batch size; None where the name is not a variant."""
    name, at, size = name.partition("@")
    parts = name.split("+")
    levers: list[str] = []
    while len(parts) > 1 and (parts[-1] in LEVERS or parts[-1] in TRIALS or parts[-1] in WORKLOADS):
        levers.insert(0, parts.pop())
    variant = Variant("+".join(parts), tuple(levers), int(size) if size.isascii() and size.isdigit() and int(size) > 0 else None)
    if variant.base not in ORDER or (variant.levers and variant.base in UNLEVERED):
        return None
    if any(name in TRIALS and variant.base not in TRIALS[name][1] for name in levers):
        return None
    if any(name in WORKLOADS and variant.base not in WORKLOADS[name] for name in levers):
        return None
    if "fused" in levers and "complex-rope" in levers:  # diffusers' processor reads q, k and v apart
        return None
    if at and (variant.batch is None or variant.base not in BATCHED):
        return None
    return variant


@contextmanager
def levers(pipe, names: tuple[str, ...]):
    """Take levers out of a configured (not yet run, so not yet compiled) pipeline, to measure each
    against the engine with it; put them back afterwards. ``complex-rope``: diffusers' own attention
    processor (complex rotary embedding). ``eager-vae``: the VAE decoder not compiled (CUDA only:
    on the CPU it never is)."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    compiled_vae = pipe.vae.decoder._compiled_call_impl
    if "complex-rope" in names:
        for module in pipe.transformer.modules():
            if isinstance(getattr(module, "processor", None), RealRopeAttnProcessor):
                module.set_processor(ZSingleStreamAttnProcessor())
    if "eager-vae" in names:
        pipe.vae.decoder._compiled_call_impl = None
    try:
        yield
    finally:
        if "complex-rope" in names:
            use_real_rope(pipe.transformer)
        pipe.vae.decoder._compiled_call_impl = compiled_vae


def with_trials(options: EngineOptions, names: tuple[str, ...]) -> EngineOptions:
    """The engine options with these trials put in."""
    for name in names:
        if name in TRIALS:
            options = dataclasses.replace(options, **TRIALS[name][0])
    return options


@contextmanager
def configured(pipe, device: str, name: str, options: EngineOptions, applied: tuple[str, ...]):
    """An engine on the shared pipeline with the variant's trials put in and levers taken out;
    afterwards (also after a failure) its bf16 transformer as it was, so the next variant measures
    what it names (a quantized transformer is replaced by the next variant that needs another).

    Each compiled variant starts from a reset compiler: once compiled blocks meet a second shape,
    dynamo recompiles them for dynamic sizes, so a variant would otherwise measure whatever shapes
    the ones before it left (batch 8 after batch 4, say). A graph compiled before comes from
    Inductor's on-disk cache in seconds."""
    import torch

    options = with_trials(options, applied)
    if options.compiles and device.startswith("cuda"):
        torch._dynamo.reset()
    try:
        engine = Engine(configure(pipe, device, options), device, ModelRef("local", "bench", "bench"), 0.0,
                        f"bench:{name}", options)
        with levers(pipe, applied):
            yield engine
    finally:
        if options.fuse_projections and options.weights is None:
            unfuse_projections(pipe.transformer)

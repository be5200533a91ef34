"""The throughput benchmark's variants: their names (a base, levers taken out, workloads put in, a
batch size after ``@``), the named sets sized for one device call, and the engine each one
runs on the shared pipeline. What each variant measures is in ``bench/throughput.py``'s docstring."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zimage_batch.blocks import RealRopeAttnProcessor, use_real_rope  # noqa: E402
from zimage_batch.generate import Engine, EngineOptions, configure  # noqa: E402
from zimage_batch.models import ModelRef  # noqa: E402

ORDER = ["sdpa", "plain", "engine", "engine+compile", "engine+compile+mask", "generate-only", "profile", "vram16", "vram12",
         "fp8", "cold-start"]
LEVERS = ("complex-rope", "eager-vae")  # the engine without one of its levers, e.g. engine+compile+eager-vae
UNLEVERED = ("sdpa", "plain", "cold-start")
COMPILED = ("engine+compile", "engine+compile+mask", "generate-only", "profile", "vram16", "fp8")
WORKLOADS = {"varied": ("engine", "engine+compile", "engine+compile+mask", "generate-only")}  # other jobs: (bases)
BATCHED = ("sdpa", "engine", "engine+compile", "engine+compile+mask", "generate-only", "profile", "fp8")  # take @N
# Named sets, each sized for one device call (~5-6 minutes on an H100, estimated from the runs in
# bench/RESULTS.md, build and compile warm-ups included): "bf16-set" the default profile, on the
# benchmark's captions and on a real run's mix, and a profile of one batch; "fp8-set" the fp8 profile
# and the 16 GB one. Each has the plain loop, the baseline every speedup is taken against in the
# same process.
VARIANT_SETS = {
    "bf16-set": "plain,engine+compile,engine+compile+varied,profile",
    "fp8-set": "plain,fp8,vram16",
    "memory-set": "plain,engine+compile,vram16,vram12,cold-start",
}
DEFAULT_VARIANTS = "bf16-set"


class Variant(NamedTuple):
    base: str
    levers: tuple[str, ...] = ()
    batch: int | None = None  # None: --batch


def parse_variant(name: str) -> Variant | None:
    """``engine+compile+complex-rope+eager-vae@8`` -> the base variant, the levers it leaves out (or
    the workload it runs), its batch size; None where the name is not a variant."""
    name, at, size = name.partition("@")
    parts = name.split("+")
    levers: list[str] = []
    while len(parts) > 1 and (parts[-1] in LEVERS or parts[-1] in WORKLOADS):
        levers.insert(0, parts.pop())
    variant = Variant("+".join(parts), tuple(levers), int(size) if size.isascii() and size.isdigit() and int(size) > 0 else None)
    if variant.base not in ORDER or (variant.levers and variant.base in UNLEVERED):
        return None
    if any(name in WORKLOADS and variant.base not in WORKLOADS[name] for name in levers):
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


@contextmanager
def configured(pipe, device: str, name: str, options: EngineOptions, applied: tuple[str, ...]):
    """An engine on the shared pipeline with the variant's levers taken out (and put back afterwards,
    also after a failure); a quantized transformer is replaced by the next variant that needs another.

    Each compiled variant starts from a reset compiler: once compiled blocks meet a second shape,
    dynamo recompiles them for dynamic sizes, so a variant would otherwise measure whatever shapes
    the ones before it left (batch 8 after batch 4, say). A graph compiled before comes from
    Inductor's on-disk cache in seconds."""
    import torch

    if options.compiles and device.startswith("cuda"):
        torch._dynamo.reset()
    engine = Engine(configure(pipe, device, options), device, ModelRef("local", "bench", "bench"), 0.0,
                    f"bench:{name}", options)
    with levers(pipe, applied):
        yield engine

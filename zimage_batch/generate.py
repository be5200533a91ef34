"""Generation: one diffusers ``ZImagePipeline`` per process, loaded once and reused.

``load_engine(model, device)`` returns the process's ``Engine`` for that model, loading it
the first time (``pipeline_loads()`` counts loads). ``Engine.generate`` runs one batch of
same-sized jobs with one ``torch.Generator`` per image, so an image depends on its seed and
not on its batch position. Generators live on the CPU, so the starting noise of a seed is the
same on every device. bf16 on CUDA (fp16 gives black images), fp32 on the CPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError
from .models import DEFAULT_MODEL, ModelRef, resolve_model
from .plan import Job

_LOCK = threading.Lock()
_ENGINES: dict[tuple[str, str], Engine] = {}
_LOADS = 0


def pipeline_loads() -> int:
    """How many pipelines this process has loaded."""
    return _LOADS


def cache_dir() -> Path:
    """Where the tiny offline pipeline is saved (``ZIMAGE_BATCH_CACHE`` or ~/.cache/zimage-batch)."""
    return Path(os.environ.get("ZIMAGE_BATCH_CACHE", Path.home() / ".cache" / "zimage-batch"))


def pick_device(device: str) -> str:
    """Resolve ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU here (torch {torch.__version__}). Use --device cpu, or install a CUDA build of torch.")
    return device


@dataclass
class Engine:
    """A loaded pipeline on one device, and what it needs to generate."""

    pipe: object
    device: str
    model: ModelRef
    load_seconds: float
    load_id: str = ""

    def generate(self, jobs: Sequence[Job], seeds: Sequence[int]) -> list[np.ndarray]:
        """Generate one batch (same size, steps and guidance); returns float32 HxWx3 arrays in [0, 1]."""
        import torch

        first = jobs[0]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[j.prompt for j in jobs],  # a fresh list: the pipeline rewrites it in place
                negative_prompt=[j.negative_prompt for j in jobs] if first.guidance_scale > 0 else None,
                height=first.height,
                width=first.width,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=generators,
                max_sequence_length=first.max_sequence_length,
                output_type="np",
            )
        return [np.asarray(img, dtype=np.float32) for img in out.images]


def load_engine(model: str = DEFAULT_MODEL, device: str = "auto") -> Engine:
    """The process's engine for ``model`` on ``device``, loaded on first use."""
    global _LOADS
    ref = resolve_model(model)
    device = pick_device(device)
    key = (ref.identity, device)
    with _LOCK:
        if key not in _ENGINES:
            start = time.perf_counter()
            pipe = _load_pipeline(ref, device)
            load_id = f"{socket.gethostname()}:{os.getpid()}:{len(_ENGINES)}"
            _ENGINES[key] = Engine(pipe, device, ref, time.perf_counter() - start, load_id)
            _LOADS += 1
        return _ENGINES[key]


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' own progress bars and info logs (we show our own)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _load_pipeline(ref: ModelRef, device: str):
    import torch
    from diffusers import ZImagePipeline

    quiet_libraries()
    if device == "cpu":
        # Tiny random weights drive activations into denormal floats, which run ~100x slower on
        # x86 CPUs (8 s instead of 0.07 s per batch, measured); flushing them to zero fixes it.
        torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    source = str(tiny_random_path()) if ref.kind == "tiny" else ref.source
    try:
        pipe = ZImagePipeline.from_pretrained(source, dtype=dtype)
    except Exception as exc:  # hub, network and file errors come in many types
        raise ModelError(_load_failure(ref, exc)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_failure(ref: ModelRef, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if ref.kind == "hub":
        return (
            f"Model {ref.source} could not be loaded ({type(exc).__name__}: {reason[:300]}). "
            f"It is not in the local Hugging Face cache and could not be downloaded. On a machine with "
            f"internet run `hf download {ref.source}` (about 20 GB) and set HF_HOME to that cache, or "
            f"download it to a folder and pass --model /path/to/folder. Use --model tiny-random to try "
            f"the pipeline offline."
        )
    return (
        f"Model folder {ref.source} could not be loaded ({type(exc).__name__}: {reason[:300]}). "
        f"Check that it is a complete diffusers ZImagePipeline folder (model_index.json plus the "
        f"transformer, text_encoder, tokenizer, vae and scheduler subfolders)."
    )


def tiny_random_path() -> Path:
    """The saved tiny pipeline, built on first use (atomically, so concurrent workers agree)."""
    target = cache_dir() / "tiny-random-v1"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_pipeline(seed: int = 0):
    """The real ZImagePipeline with tiny random weights and a byte-level tokenizer, built offline."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=len(tokenizer) + 5,
            max_position_embeddings=2048,
            rope_theta=1e6,
        )
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=32,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1536, 512, 512],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 32, 32],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: 256 printable characters, one per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]

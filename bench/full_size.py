"""The full-size Z-Image-Turbo architecture with seeded random weights (the same FLOPs and memory as
the real model, which cannot be downloaded here), and fresh copies of its parts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zimage_batch.generate import build_tiny_pipeline  # noqa: E402

def full_size_transformer(device: str):
    """The full-size transformer with random weights (seeded: the same weights every time)."""
    from diffusers import ZImageTransformer2DModel

    return random_module(device, 0, lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]))


def full_size_text_encoder(device: str):
    """The full-size Qwen3 text encoder with random weights (seeded)."""
    from transformers import Qwen3Config, Qwen3Model

    return random_module(device, 1, lambda: Qwen3Model(Qwen3Config(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
        tie_word_embeddings=True)))


def build_full_size(device: str):
    """The full-size Z-Image-Turbo architecture with random weights (same FLOPs as the real model)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = build_tiny_pipeline().tokenizer  # byte-level: ~3x the tokens of Qwen's BPE for English text
    transformer, text_encoder = full_size_transformer(device), full_size_text_encoder(device)
    vae = random_module(device, 2, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_module(device: str, seed: int, build):
    """``build()`` in bf16 directly on ``device`` from a fixed seed, 2-D weights re-drawn with std
    0.02 so activations stay finite (the default init blows up at this size)."""
    import torch

    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            module = build()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.02)
    return module.eval()


def fresh(part: str, args: argparse.Namespace, device: str):
    """A new copy of the pipeline's ``transformer`` or ``text_encoder``, with the same weights as
    the first (for the variants that quantize or must undo the text encoder's streaming)."""
    if args.tiny:
        return getattr(build_tiny_pipeline(), part).to(device)
    if args.model:  # just that component's subfolder, not the whole pipeline
        import torch
        from diffusers import ZImageTransformer2DModel
        from transformers import Qwen3Model

        loader = ZImageTransformer2DModel if part == "transformer" else Qwen3Model
        return loader.from_pretrained(args.model, subfolder=part, dtype=torch.bfloat16).to(device)
    return full_size_transformer(device) if part == "transformer" else full_size_text_encoder(device)


def group_offloaded(module) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(module)

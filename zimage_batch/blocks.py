"""Z-Image's transformer blocks, rewritten where the compiler does better with another form.

* The rotary embedding in real arithmetic. diffusers' ``ZSingleStreamAttnProcessor`` rotates
  queries and keys as complex numbers (``view_as_complex``, a complex multiply, ``view_as_real``).
  Inductor generates no code for complex operators, so in a compiled transformer those steps stay
  separate eager kernels, each reading and writing the whole query or key in float32, in every block
  of every forward. Written with cos and sin, the same rotation is plain elementwise arithmetic that
  Inductor fuses with the q/k norms. The images are the same within float rounding (a test compares
  them). Eager, it launches more kernels than the complex form (about eight per tensor against
  three), so the engine installs it only where it compiles.
* Tried and dropped: q/k/v, and the feed-forward's gate/up projections, each fused into one
  matmul. On an H100 it changed nothing measurable (bf16 0.798 vs 0.800 s per image, fp8 0.574 vs
  0.578, 0.8 GB more at the peak; bench/RESULTS.md, 2026-11-27), so the layers stay as diffusers has them.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, tokens, heads, head_dim) by ``freqs`` (batch, tokens, head_dim / 2, 2:
    cos, sin), pairing neighbouring channels as the complex form does, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(3).type_as(x)


class RealRopeAttnProcessor:
    """``ZSingleStreamAttnProcessor`` with ``rotate`` in place of the complex rotation; otherwise the
    same steps in the same order (projections, q/k norms, rotation, attention through diffusers'
    dispatcher, output projection)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:  # complex64 (batch, tokens, head_dim / 2): viewed as (cos, sin) pairs
            freqs = torch.view_as_real(freqs_cis)
            query, key = rotate(query, freqs), rotate(key, freqs)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def use_real_rope(transformer) -> None:
    """Give every attention module of a Z-Image transformer the real-arithmetic processor (before
    it is compiled; a processor swapped afterwards recompiles)."""
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), ZSingleStreamAttnProcessor):
            module.set_processor(RealRopeAttnProcessor())

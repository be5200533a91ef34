"""Z-Image's transformer blocks, rewritten where the compiler does better with another form.

* The rotary embedding in real arithmetic. diffusers' ``ZSingleStreamAttnProcessor`` rotates
  queries and keys as complex numbers (``view_as_complex``, a complex multiply, ``view_as_real``).
  Inductor generates no code for complex operators, so in a compiled transformer those steps stay
  separate eager kernels, each reading and writing the whole query or key in float32, in every block
  of every forward. Written with cos and sin, the same rotation is plain elementwise arithmetic that
  Inductor fuses with the q/k norms. The images are the same within float rounding (a test compares
  them). Eager, it launches more kernels than the complex form (about eight per tensor against
  three), so the engine installs it only where it compiles.
* Fused projections (``fuse_projections``): the attention's q, k and v projections as one matmul,
  and the feed-forward's two input projections (SwiGLU's gate and up) as one: the input is read once
  instead of three or two times, and each GEMM is larger. The weights are the same numbers,
  concatenated; ``unfuse_projections`` splits them back exactly. With fp8 weights each fused layer is
  quantized as one: with per-row scales that gives the same scales as apart, with per-tensor scales
  one scale for all its parts. Off by default until measured (``EngineOptions.fuse_projections``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import FeedForward, ZSingleStreamAttnProcessor


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
    dispatcher, output projection). Takes the q, k and v projections apart or fused (``to_qkv``)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).unflatten(-1, (3, attn.heads, -1)).unbind(-3)
        else:
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


class FusedFeedForward(torch.nn.Module):
    """Z-Image's SwiGLU feed-forward, ``w2(silu(w1(x)) * w3(x))``, with ``w1`` and ``w3`` stacked in
    one linear layer ``w13`` (gate rows first, then up rows)."""

    def __init__(self, w13: torch.nn.Linear, w2: torch.nn.Linear):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _linear(weight: torch.Tensor, requires_grad: bool) -> torch.nn.Linear:
    """A bias-free linear layer holding ``weight`` (no initialisation of weights to throw away)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=requires_grad)
    return layer


def _stacked(parts: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer whose output is the parts' outputs side by side."""
    return _linear(torch.cat([p.weight.detach() for p in parts]), parts[0].weight.requires_grad)


def _split(fused: torch.nn.Linear, parts: int) -> list[torch.nn.Linear]:
    """``_stacked`` undone: ``parts`` equal linear layers."""
    return [_linear(rows.clone(), fused.weight.requires_grad) for rows in fused.weight.detach().chunk(parts)]


def _named(transformer, wanted) -> list[str]:
    """The names of the modules ``wanted`` picks: looked up again one at a time, so no list holds
    on to a layer that has been replaced (its weights are freed as the loop goes)."""
    return [name for name, module in transformer.named_modules() if wanted(module)]


def _parent(transformer, name: str) -> tuple[torch.nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return transformer.get_submodule(parent), child


def fuse_projections(transformer) -> None:
    """Fuse the feed-forward's gate/up projections in every block of a Z-Image transformer, and
    q/k/v where the attention has the real-rotation processor (the one that reads ``to_qkv``); before
    it is compiled or quantized. One layer at a time, so the extra memory is one layer's weights."""
    for name in _named(transformer, lambda m: isinstance(getattr(m, "processor", None), RealRopeAttnProcessor)
                       and not m.fused_projections):
        attn = transformer.get_submodule(name)
        if any(getattr(attn, part).bias is not None for part in ("to_q", "to_k", "to_v")):
            raise ValueError("fuse_projections expects Z-Image's bias-free q/k/v projections")
        attn.to_qkv = _stacked([attn.to_q, attn.to_k, attn.to_v])
        del attn.to_q, attn.to_k, attn.to_v
        attn.fused_projections = True
    for name in _named(transformer, lambda m: type(m) is FeedForward):
        parent, child = _parent(transformer, name)
        ff = getattr(parent, child)
        setattr(parent, child, FusedFeedForward(_stacked([ff.w1, ff.w3]), ff.w2))


def unfuse_projections(transformer) -> None:
    """Undo ``fuse_projections``: the original layers, with the very same weights."""
    for name in _named(transformer, lambda m: getattr(m, "fused_projections", False) and hasattr(m, "to_qkv")):
        attn = transformer.get_submodule(name)
        attn.to_q, attn.to_k, attn.to_v = _split(attn.to_qkv, 3)
        del attn.to_qkv
        attn.fused_projections = False
    for name in _named(transformer, lambda m: isinstance(m, FusedFeedForward)):
        parent, child = _parent(transformer, name)
        fused = getattr(parent, child)
        with torch.device("meta"):
            ff = FeedForward(fused.w13.in_features, fused.w13.out_features // 2)
        ff.w1, ff.w3 = _split(fused.w13, 2)
        ff.w2 = fused.w2
        setattr(parent, child, ff)

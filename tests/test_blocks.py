"""Z-Image's blocks as the engine compiles them: the rotary embedding in real arithmetic, fused projections."""

import numpy as np
import pytest
import torch

from zimage_batch.blocks import (FusedFeedForward, RealRopeAttnProcessor, fuse_projections, rotate,
                                 unfuse_projections, use_real_rope)
from zimage_batch.generate import build_tiny_pipeline, load_engine


def complex_rotation(x, freqs_cis):  # diffusers' ZSingleStreamAttnProcessor, step for step
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def test_rotate_is_the_complex_rotation():
    x = torch.randn(2, 10, 3, 8)
    freqs_cis = torch.polar(torch.ones(2, 10, 4), torch.rand(2, 10, 4) * 6.28)
    assert torch.allclose(rotate(x, torch.view_as_real(freqs_cis)), complex_rotation(x, freqs_cis), atol=1e-6)
    half = x.to(torch.bfloat16)
    assert rotate(half, torch.view_as_real(freqs_cis)).dtype == torch.bfloat16


PROMPTS = (["a red mug on white"], ["a red mug on white", "国风茶馆的木质招牌，带清晰“茗香”二字, on a long street"])


def images_of(pipe, prompts):  # a fresh prompt list each call: the pipeline rewrites the one it is given
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompt=list(prompts), generator=generators, height=128, width=128, num_inference_steps=3,
                guidance_scale=0.0, output_type="np").images


def test_images_are_diffusers_own_with_and_without_an_attention_mask():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS
    theirs = [images_of(pipe, p) for p in prompts]  # the second batch pads the shorter caption: a mask
    use_real_rope(pipe.transformer)
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    assert len(processors) == 2 + 1 + 1 and all(isinstance(p, RealRopeAttnProcessor) for p in processors)
    for p, image in zip(prompts, theirs):
        assert np.array_equal(images_of(pipe, p), image)


def test_fused_projections_keep_the_images_and_come_apart_exactly():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    use_real_rope(pipe.transformer)
    weights = {name: p.clone() for name, p in pipe.transformer.state_dict().items()}
    apart = [images_of(pipe, p) for p in PROMPTS]
    fuse_projections(pipe.transformer)
    fuse_projections(pipe.transformer)  # a second call changes nothing
    blocks = [*pipe.transformer.noise_refiner, *pipe.transformer.context_refiner, *pipe.transformer.layers]
    assert all(b.attention.fused_projections and not hasattr(b.attention, "to_q") for b in blocks)
    assert all(isinstance(b.feed_forward, FusedFeedForward) for b in blocks)
    layer = blocks[-1]
    dim = layer.dim
    assert layer.attention.to_qkv.weight.shape == (3 * dim, dim)
    assert torch.equal(layer.attention.to_qkv.weight[dim : 2 * dim], weights[f"layers.{len(pipe.transformer.layers) - 1}.attention.to_k.weight"])
    for p, image in zip(PROMPTS, apart):  # with and without a mask; one matmul instead of three sums in another order
        fused = images_of(pipe, p)
        assert np.abs(fused - image).max() < 1e-4
    unfuse_projections(pipe.transformer)
    assert set(pipe.transformer.state_dict()) == set(weights)
    assert all(torch.equal(p, weights[name]) for name, p in pipe.transformer.state_dict().items())
    assert all(np.array_equal(images_of(pipe, p), image) for p, image in zip(PROMPTS, apart))


def test_fusing_needs_the_real_rotation_processor():
    pipe = build_tiny_pipeline()
    fuse_projections(pipe.transformer)  # diffusers' processor reads to_q/to_k/to_v: attention stays apart
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    assert all(isinstance(b.feed_forward, FusedFeedForward) for b in pipe.transformer.layers)  # any processor


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_a_fused_block_compiles_to_the_same_numbers():
    block = build_tiny_pipeline().transformer.layers[0]
    use_real_rope(block)
    x, adaln = torch.randn(2, 40, block.dim), torch.randn(2, min(block.dim, 256))
    freqs_cis = torch.polar(torch.ones(2, 40, block.head_dim // 2), torch.rand(2, 40, block.head_dim // 2))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    eager = block(x, mask, freqs_cis, adaln)
    fuse_projections(block)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    assert torch.allclose(compiled(x, mask, freqs_cis, adaln), eager, atol=1e-5)


def test_the_engine_uses_it_where_it_compiles():
    from zimage_batch.generate import EngineOptions

    def processors(options):
        engine = load_engine("tiny-random", "cpu", options)
        return {type(m.processor).__name__ for m in engine.pipe.transformer.modules() if hasattr(m, "processor")}

    assert processors(EngineOptions(compile=True)) == {"RealRopeAttnProcessor"}
    assert processors(EngineOptions()) == {"ZSingleStreamAttnProcessor"}  # eager: the complex form takes fewer kernels
    assert processors(EngineOptions(compile=True, vram_gb=12)) == {"ZSingleStreamAttnProcessor"}  # int8 runs eager


def test_the_engine_fuses_projections_only_when_asked_and_compiling():
    from zimage_batch.generate import EngineOptions

    def fused(options):
        transformer = load_engine("tiny-random", "cpu", options).pipe.transformer
        return any(isinstance(m, FusedFeedForward) for m in transformer.modules())

    assert fused(EngineOptions(compile=True, fuse_projections=True))
    assert not fused(EngineOptions(compile=True))
    assert not fused(EngineOptions(fuse_projections=True))  # eager: diffusers' processor, projections apart


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_inductor_generates_the_rotation_instead_of_falling_back_to_complex_kernels():
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
    from torch._inductor.utils import run_and_get_code

    block = build_tiny_pipeline().transformer.layers[0]
    x, adaln = torch.randn(2, 40, block.dim), torch.randn(2, min(block.dim, 256))
    freqs_cis = torch.polar(torch.ones(2, 40, block.head_dim // 2), torch.rand(2, 40, block.head_dim // 2))
    eager = block(x, None, freqs_cis, adaln)
    code = {}
    for name in ("diffusers", "ours"):
        if name == "ours":
            use_real_rope(block)
        assert isinstance(block.attention.processor, RealRopeAttnProcessor if name == "ours" else ZSingleStreamAttnProcessor)
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):  # generate the code, not a cached copy
            out, sources = run_and_get_code(torch.compile(block, fullgraph=True), x, None, freqs_cis, adaln)
        assert torch.allclose(out, eager, atol=1e-5)
        code[name] = "\n".join(sources)
    assert "aten.view_as_complex" in code["diffusers"]  # an eager kernel per complex step, float32 in and out
    assert "aten.view_as_complex" not in code["ours"]  # left: a view of the small rotary table, no kernel

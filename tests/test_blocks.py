"""Z-Image's blocks as the engine compiles them: the rotary embedding in real arithmetic."""

import numpy as np
import pytest
import torch

from zimage_batch.blocks import RealRopeAttnProcessor, rotate, use_real_rope
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


def test_the_engine_uses_it_where_it_compiles():
    from zimage_batch.generate import EngineOptions

    def processors(options):
        engine = load_engine("tiny-random", "cpu", options)
        return {type(m.processor).__name__ for m in engine.pipe.transformer.modules() if hasattr(m, "processor")}

    assert processors(EngineOptions(compile=True)) == {"RealRopeAttnProcessor"}
    assert processors(EngineOptions()) == {"ZSingleStreamAttnProcessor"}  # eager: the complex form takes fewer kernels
    assert processors(EngineOptions(compile=True, vram_gb=12)) == {"ZSingleStreamAttnProcessor"}  # int8 runs eager


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

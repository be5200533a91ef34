"""The real ZImagePipeline with tiny random weights, loaded through from_pretrained."""

import numpy as np
import pytest

from zimage_batch import generate
from zimage_batch.errors import ModelError
from zimage_batch.generate import load_engine
from zimage_batch.plan import Job
from zimage_batch.postprocess import image_problem


def job(prompt="a ceramic mug", seed=1, size=256, **kw) -> Job:
    fields = dict(job_id=f"id-{prompt}-{seed}", sku="S", catalog="c", row=1, template="t", template_path="t.j2",
                  template_sha256="0", variant=0, prompt=prompt, negative_prompt="", seed=seed, width=size, height=size,
                  steps=8, guidance_scale=0.0, max_sequence_length=512, model="tiny-random/v1", presets=("web",),
                  background="scene")
    fields.update(kw)
    return Job(**fields)


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny-random", "cpu")


def test_tiny_random_is_a_real_pipeline_saved_and_loaded(engine, model_cache):
    from diffusers import ZImagePipeline

    assert isinstance(engine.pipe, ZImagePipeline)
    assert (model_cache / "tiny-random-v1" / "model_index.json").is_file()
    assert engine.model.identity == "tiny-random/v1" and engine.device == "cpu"


def test_engine_is_loaded_once_per_process(engine):
    loads = generate.pipeline_loads()
    assert load_engine("tiny-random", "cpu") is engine
    assert generate.pipeline_loads() == loads


def test_same_seed_gives_identical_images_and_batching_does_not_change_them(engine):
    jobs = [job("a mug", 7), job("国风茶馆的木质招牌，带清晰“茗香”二字", 8), job("a sneaker", 9)]
    first = engine.generate(jobs, [j.seed for j in jobs])
    again = engine.generate(jobs, [j.seed for j in jobs])
    alone = engine.generate(jobs[1:2], [8])
    assert all(a.shape == (256, 256, 3) and a.dtype == np.float32 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert np.abs(first[1] - alone[0]).max() < 1e-4
    assert not np.array_equal(first[0], engine.generate([jobs[0]], [10])[0])


def test_prompt_list_is_not_mutated(engine):
    jobs = [job("keep me")]
    engine.generate(jobs, [1])
    assert jobs[0].prompt == "keep me"


def test_non_square_sizes(engine):
    out = engine.generate([job(size=256, width=384, height=256)], [3])
    assert out[0].shape == (256, 384, 3)


@pytest.mark.parametrize(
    "image, problem",
    [
        (np.zeros((8, 8, 3), np.float32), "black"),
        (np.full((8, 8, 3), 0.5, np.float32), "blank"),
        (np.full((8, 8, 3), np.nan, np.float32), "non_finite"),
        (np.random.default_rng(0).random((8, 8, 3), dtype=np.float32), None),
    ],
)
def test_image_problem(image, problem):
    assert image_problem(image) == problem


def test_unreachable_hub_model_gives_one_clear_paragraph(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        load_engine("Tongyi-MAI/Z-Image-Turbo", "cpu")
    text = str(err.value)
    assert "Tongyi-MAI/Z-Image-Turbo" in text and "hf download" in text and "--model" in text
    assert "\n" not in text and "Traceback" not in text


def test_broken_local_model_folder(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    with pytest.raises(ModelError, match="broken could not be loaded"):
        load_engine(str(folder), "cpu")


def test_cuda_requested_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="no CUDA GPU"):
        load_engine("tiny-random", "cuda")


def test_pre_encoded_prompts_give_the_pipelines_own_images(engine):
    import torch

    j = job("a red teapot on a table", 11)
    ours = engine.generate([j], [11])[0]
    with torch.inference_mode():
        theirs = engine.pipe(prompt=["a red teapot on a table"], height=256, width=256, num_inference_steps=8,
                             guidance_scale=0.0, generator=[torch.Generator().manual_seed(11)], output_type="np").images[0]
    assert np.abs(ours - theirs).max() < 1e-5


def test_caption_buckets_separate_lengths_only_when_asked(engine):
    from dataclasses import replace

    from zimage_batch.generate import EngineOptions

    short, short2, long_ = job("a mug"), job("a cup"), job("a mug " * 40)
    assert engine.caption_tokens(short) < engine.caption_tokens(long_)
    assert engine.batch_key(short) == engine.batch_key(short2) != engine.batch_key(long_)
    masked = replace(engine, options=EngineOptions(bucket_captions=False))
    assert masked.batch_key(short) == masked.batch_key(long_)
    engine.release()


def test_vram_profile_caps_the_batch():
    from zimage_batch.generate import EngineOptions

    assert EngineOptions(vram_gb=16).max_batch == 1 and EngineOptions().max_batch is None

"""The real ZImagePipeline with tiny random weights, loaded through from_pretrained."""

import threading

import numpy as np
import pytest

from conftest import levels
from zimage_batch import generate
from zimage_batch.errors import ModelError
from zimage_batch.generate import fetch_model, load_engine
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
    assert all(a.shape == (256, 256, 3) and a.dtype == np.uint8 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert levels(first[1], alone[0]) <= 1  # batched vs alone: float noise, at most one 8-bit level
    assert not np.array_equal(first[0], engine.generate([jobs[0]], [10])[0])


def test_prompt_list_is_not_mutated(engine):
    jobs = [job("keep me")]
    engine.generate(jobs, [1])
    assert jobs[0].prompt == "keep me"


def test_non_square_sizes(engine):
    out = engine.generate([job(size=256, width=384, height=256)], [3])
    assert out[0].shape == (256, 384, 3)


def test_images_leave_the_device_as_the_bytes_postprocessing_would_make():
    import torch

    from zimage_batch.postprocess import Source

    rng = np.random.default_rng(3)
    values = rng.random((2, 3, 16, 16), dtype=np.float32)
    values[0, :, 0, :4] = np.array([0.5, 1.5, 2.5, 254.5], np.float32) / 255  # near the rounding ties
    values[1, 0, 0, 0] = np.nan  # a failed decode: kept as floats, rejected by the checks
    out = generate.to_host(torch.from_numpy(values))
    assert out[0].dtype == np.uint8 and out[0].shape == (16, 16, 3)
    assert np.array_equal(out[0], np.asarray(Source(values[0].transpose(1, 2, 0)).image))
    assert out[1].dtype == np.float32 and image_problem(out[1]) == "non_finite"
    assert Source(out[1]).problem == "non_finite"


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


def test_blank_check_answers_as_the_full_standard_deviation_does():
    rng = np.random.default_rng(5)
    images = [np.full((64, 64, 3), 128, np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    for spread in (0.3, 0.8, 1.0, 1.05, 1.3, 3.0):  # near the 1.02-level limit, both sides
        images.append(np.clip(np.round(120 + rng.normal(0, spread, (64, 64, 3))), 0, 255).astype(np.uint8))
    stripes = np.full((64, 64, 3), 120, np.uint8)
    stripes.reshape(-1)[1::16] = 250  # all the spread where the every-16th sample does not look
    sparse = np.full((64, 64, 3), 120, np.uint8)
    sparse.reshape(-1)[::997] = 130  # a few faint dots in a flat picture: blank by the full pass
    images += [stripes, sparse, rng.random((64, 64, 3), dtype=np.float32) * 0.003 + 0.5]
    for image in images:
        limit = 0.004 * (255.0 if image.dtype == np.uint8 else 1.0)
        expected = "blank" if float(image.std(dtype=np.float32)) < limit else None
        assert image_problem(image) == expected, float(image.std())
    assert image_problem(stripes) is None and image_problem(sparse) == "blank"


def test_unreachable_hub_model_gives_one_clear_paragraph(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for attempt in (lambda: load_engine("Tongyi-MAI/Z-Image-Turbo", "cpu"), lambda: fetch_model("Tongyi-MAI/Z-Image-Turbo")):
        with pytest.raises(ModelError) as err:
            attempt()
        text = str(err.value)
        assert "Tongyi-MAI/Z-Image-Turbo" in text and "hf download" in text and "--model" in text
        assert "\n" not in text and "Traceback" not in text
        assert "local_files_only" not in text  # diffusers' advice for its own API: no use to a user of ours


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
    assert levels(ours, np.round(theirs * 255.0)) <= 1


def test_caption_buckets_separate_lengths_only_when_asked(engine):
    from dataclasses import replace

    from zimage_batch.generate import EngineOptions

    short, short2, long_ = job("a mug"), job("a cup"), job("a mug " * 40)
    assert engine.caption_tokens(short) < engine.caption_tokens(long_)
    assert engine.batch_key(short) == engine.batch_key(short2) != engine.batch_key(long_)
    masked = replace(engine, options=EngineOptions(bucket_captions=False))
    assert masked.batch_key(short) == masked.batch_key(long_)
    engine.release()


def test_memory_profiles_follow_the_vram_budget():
    from zimage_batch.generate import EngineOptions, options_for

    full, big, card16, card12 = EngineOptions(), EngineOptions(vram_gb=48), EngineOptions(vram_gb=16), EngineOptions(vram_gb=12)
    assert not full.stream_text_encoder and full.weights is None and full.max_batch is None
    assert not big.stream_text_encoder and big.weights is None and big.max_batch is None
    assert card16.stream_text_encoder and card16.weights is None and card16.max_batch == 1
    assert card12.stream_text_encoder and card12.weights == "int8" and card12.max_batch == 1
    assert EngineOptions(vram_gb=12, precision="fp8").weights == "fp8"  # fp8 weights are 8-bit too
    assert EngineOptions(compile=True, vram_gb=16).compiles and EngineOptions(compile=True, precision="fp8").compiles
    assert not EngineOptions(compile=True, vram_gb=12).compiles  # int8 weights compiled ran far slower (H100)
    assert full.precision_label("cpu") == "fp32" and full.precision_label("cuda") == "bf16"
    assert card12.precision_label("cuda") == "bf16+int8-weights"
    assert EngineOptions(precision="fp8").precision_label("cuda") == "bf16+fp8-e4m3-rowwise"
    for options in (full, card12, EngineOptions(precision="fp8")):  # reproduce loads a recorded precision back
        assert options_for(options.precision_label("cuda")).weights == options.weights
    assert options_for(None) == EngineOptions()  # records older than schema v4


def test_streamed_text_encoder_gives_the_same_images(engine):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from zimage_batch.generate import EngineOptions

    streamed = load_engine("tiny-random", "cpu", EngineOptions(vram_gb=16))
    assert streamed is not engine and _is_group_offload_enabled(streamed.pipe.text_encoder)
    assert not _is_group_offload_enabled(streamed.pipe.transformer)
    jobs = [job(f"a linen shirt, folded, tag {i}", i) for i in range(10)]  # more prompts than one streamed chunk (8)
    streamed.prepare(jobs)
    assert np.array_equal(streamed.generate(jobs[9:], [9])[0], engine.generate(jobs[9:], [9])[0])
    streamed.release()


def test_int8_profile_quantizes_the_transformer_blocks_only(engine):
    import torch

    from zimage_batch.generate import EngineOptions

    small = load_engine("tiny-random", "cpu", EngineOptions(vram_gb=12))
    assert not torch._inductor.config.coordinate_descent_tuning  # torchao must not retune every compile in the process
    transformer = small.pipe.transformer
    for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w2", "noise_refiner.0.adaLN_modulation.0",
                 "context_refiner.0.attention.to_out.0"):
        weight = transformer.get_submodule(name).weight
        assert type(weight).__module__.startswith("torchao") and "int8" in str(weight.dtype) + type(weight).__name__.lower()
    for name in ("t_embedder.mlp.0", "cap_embedder.1", "all_x_embedder.2-1", "all_final_layer.2-1.linear"):
        assert type(transformer.get_submodule(name).weight) is torch.nn.Parameter  # precision-sensitive: kept
    j = job("a glass teapot", 4)
    full, eight_bit = engine.generate([j], [4])[0], small.generate([j], [4])[0]
    assert 0 < levels(full, eight_bit) < 13  # close, not equal: 8-bit weights change pixels a little


def test_missing_torchao_and_fp8_without_a_gpu_are_clear_errors(monkeypatch):
    import sys

    from zimage_batch.generate import EngineOptions, check_options

    with pytest.raises(ModelError, match="FP8 tensor cores .* on the CPU"):
        check_options(EngineOptions(precision="fp8"), "cpu")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(ModelError, match=r"--vram 12 quantizes the transformer with torchao.*zimage-batch\[quant\]"):
        check_options(EngineOptions(vram_gb=12), "cpu")
    check_options(EngineOptions(vram_gb=16), "cpu")  # 16 GB needs no torchao


def test_the_engine_counts_prompts_longer_than_their_token_limit(engine):
    short, long = job("a mug", max_sequence_length=64), job("a ceramic mug " * 20, seed=2, max_sequence_length=64)
    engine.prepare([short, long])
    try:
        assert engine.prompts_cut([short, long]) == 1 and engine.prompts_cut([short]) == 0
    finally:
        engine.release([short, long])
    assert engine.prompts_cut([long]) == 0  # forgotten with the shard's prompts


def test_a_load_that_fails_is_not_tried_again_by_a_caller_that_waited_for_it(monkeypatch):
    """Two shards in flight both need the pipeline: when the first one's load fails, the second gets the
    same error instead of a second (with a real model: minutes long) load; a later call tries again."""
    import threading

    from zimage_batch import generate

    class Watched:
        """The engines' lock, telling when a second caller waits on it."""

        def __init__(self):
            self.lock, self.waiting = threading.Lock(), threading.Event()

        def __enter__(self):
            if self.lock.locked():
                self.waiting.set()
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()

    lock = Watched()
    monkeypatch.setattr(generate, "_LOCK", lock)
    monkeypatch.setattr(generate, "_ENGINES", {})
    monkeypatch.setattr(generate, "_FAILED", {})
    loads = []

    def broken(ref, device):
        loads.append(threading.current_thread().name)
        assert lock.waiting.wait(30)  # the second shard asks while this one loads
        raise ModelError("Model folder broken could not be loaded (a test)")

    monkeypatch.setattr(generate, "_load_pipeline", broken)
    errors = []

    def shard():
        try:
            load_engine("tiny-random", "cpu")
        except ModelError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=shard) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(errors) == 2 and len(set(errors)) == 1
    with pytest.raises(ModelError):
        load_engine("tiny-random", "cpu")
    assert len(loads) == 2  # asked after the failure: tried again


def test_compiles_are_announced_when_they_happen_and_only_then():
    """The engine wraps its pipeline call in ``announcing_compiles`` where it compiles (CUDA); dynamo's
    compile callbacks say when a call compiles: a new shape does, a shape met before does not."""
    import torch

    from zimage_batch import progress
    from zimage_batch.generate import announcing_compiles

    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2 + 1, backend="eager")
    events = []
    with progress.listening(lambda event, value: events.append((event, value))):
        with announcing_compiles("2 x 64x64"):
            double(torch.ones(2, 3))
        assert [e for e, _ in events] == ["compiling", "compiled"] and events[0][1] == "2 x 64x64" and events[1][1] >= 0
        with announcing_compiles("2 x 64x64"):
            double(torch.ones(2, 3))  # compiled before: nothing to say
        with announcing_compiles("4 x 64x64"):
            double(torch.ones(4, 3, 5))  # a new shape compiles again
        double(torch.ones(5, 3, 5, 7))  # outside the block: not announced
        with announcing_compiles("1 x 64x64"):  # this thread compiles nothing; another one does
            other = threading.Thread(target=double, args=(torch.ones(6, 3, 5, 7, 2),))
            other.start()
            other.join()
    assert [e for e, _ in events] == ["compiling", "compiled", "compiling", "compiled"] and events[2][1] == "4 x 64x64"

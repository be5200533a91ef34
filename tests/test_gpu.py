"""The CUDA paths of the engine with the tiny real pipeline: memory profiles, 8-bit weights, compile.

Run on a GPU host with ``pytest -m gpu tests/test_gpu.py`` (skipped without CUDA). The full-size
numbers come from ``bench/throughput.py``; these check behaviour, not speed.
"""

import numpy as np
import pytest

from conftest import levels
from zimage_batch.generate import EngineOptions, load_engine
from zimage_batch.plan import Job

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def job(prompt: str, seed: int) -> Job:
    return Job(job_id=f"id-{seed}", sku="S", catalog="c", row=1, template="t", template_path="t.j2", template_sha256="0",
               variant=0, prompt=prompt, negative_prompt="", seed=seed, width=256, height=256, steps=8, guidance_scale=0.0,
               max_sequence_length=512, model="tiny-random/v1", presets=("web",), background="scene")


JOBS = [job("a red mug on a wooden table", 1), job("国风茶馆的木质招牌，带清晰“茗香”二字", 2)]


@pytest.fixture(scope="module")
def full():
    engine = load_engine("tiny-random", "cuda")
    return engine, engine.generate(JOBS, [j.seed for j in JOBS])


def test_a_pipeline_loaded_in_one_thread_generates_in_another(full, monkeypatch):
    """A run loads the pipeline in its first shard's thread (a Prefect task thread) and the next shard
    generates on another thread: the same images as an engine loaded and used on the main thread."""
    import threading

    from zimage_batch import generate

    monkeypatch.setattr(generate, "_ENGINES", {})  # a fresh load, as in a new run
    _, reference = full
    done = {}
    loader = threading.Thread(target=lambda: done.setdefault("engine", load_engine("tiny-random", "cuda")))
    loader.start()
    loader.join()
    user = threading.Thread(target=lambda: done.setdefault("images", done["engine"].generate(JOBS, [j.seed for j in JOBS])))
    user.start()
    user.join()
    assert done["engine"] is not full[0] and all(levels(a, b) < 13 for a, b in zip(done["images"], reference))


def test_streamed_text_encoder_stays_off_the_gpu_and_keeps_the_images(full):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    _, reference = full
    engine = load_engine("tiny-random", "cuda", EngineOptions(vram_gb=16))
    images = [engine.generate([j], [j.seed])[0] for j in JOBS]
    assert _is_group_offload_enabled(engine.pipe.text_encoder)
    assert all(p.device.type == "cpu" for p in engine.pipe.text_encoder.parameters())  # between encodes
    assert all(p.device.type == "cuda" for p in engine.pipe.transformer.parameters())
    assert engine.pipe._execution_device.type == "cuda"
    assert all(levels(a, b) < 13 for a, b in zip(images, reference))  # bf16 noise: batch 1 vs 2


def test_compiled_engine_compiles_the_blocks_and_the_vae_decoder_and_keeps_the_images(full):
    from zimage_batch.blocks import RealRopeAttnProcessor

    _, reference = full
    engine = load_engine("tiny-random", "cuda", EngineOptions(compile=True))
    assert engine.pipe.transformer.layers[0]._compiled_call_impl is not None
    assert engine.pipe.vae.decoder._compiled_call_impl is not None
    assert isinstance(engine.pipe.transformer.layers[0].attention.processor, RealRopeAttnProcessor)
    images = engine.generate(JOBS, [j.seed for j in JOBS])
    assert all(levels(i, r) < 13 for i, r in zip(images, reference))  # compiled vs eager: bf16 noise


def test_int8_weights_on_the_gpu_run_eager_and_stay_close(full):
    _, reference = full
    engine = load_engine("tiny-random", "cuda", EngineOptions(vram_gb=12, compile=True))
    weight = engine.pipe.transformer.layers[0].attention.to_q.weight
    assert type(weight).__module__.startswith("torchao") and weight.device.type == "cuda"
    assert engine.pipe.transformer.layers[0]._compiled_call_impl is None  # compiled int8 ran far slower (H100)
    assert engine.pipe.vae.decoder._compiled_call_impl is None
    images = [engine.generate([j], [j.seed])[0] for j in JOBS]
    assert all(i.dtype == np.uint8 and levels(i, r) < 26 for i, r in zip(images, reference))  # uint8: finite


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 needs compute capability 8.9+")
def test_fp8_generates_finite_images_close_to_bf16(full):
    _, reference = full
    engine = load_engine("tiny-random", "cuda", EngineOptions(precision="fp8"))
    assert engine.options.precision_label("cuda") == "bf16+fp8-e4m3-rowwise"
    images = engine.generate(JOBS, [j.seed for j in JOBS])
    assert all(i.dtype == np.uint8 and levels(i, r) < 51 for i, r in zip(images, reference))  # uint8: finite


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 needs compute capability 8.9+")
def test_compiled_fp8_generates_finite_images_close_to_bf16(full):
    _, reference = full
    engine = load_engine("tiny-random", "cuda", EngineOptions(precision="fp8", compile=True))
    images = engine.generate(JOBS, [j.seed for j in JOBS])
    assert all(i.dtype == np.uint8 and levels(i, r) < 51 for i, r in zip(images, reference))  # uint8: finite


def test_the_compiled_engine_announces_the_first_batch_of_a_shape(full, monkeypatch):
    from zimage_batch import generate, progress

    monkeypatch.setattr(generate, "_ENGINES", {})  # a fresh engine: nothing of it compiled yet
    torch._dynamo.reset()
    engine = load_engine("tiny-random", "cuda", EngineOptions(compile=True))
    events = []
    with progress.listening(lambda event, value: events.append((event, value))):
        engine.generate(JOBS[:1], [1])
        engine.generate(JOBS[:1], [2])  # the same shape: compiled already
    assert engine.compiled and [e for e, _ in events] == ["compiling", "compiled"] and events[0][1] == "1 x 256x256"

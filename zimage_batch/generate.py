"""Generation: one diffusers ``ZImagePipeline`` per process, loaded once and reused.

``load_engine(model, device)`` returns the process's ``Engine`` for that model, loading it
the first time (``pipeline_loads()`` counts loads). ``Engine.generate`` runs one batch of
same-sized jobs with one ``torch.Generator`` per image, so an image depends on its seed and
not on its batch position. Generators live on the CPU, so the starting noise of a seed is the
same on every device. bf16 on CUDA (fp16 gives black images), fp32 on the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import progress
from .errors import ModelError
from .models import DEFAULT_MODEL, ModelRef, resolve_model
from .plan import Job

_LOCK = threading.Lock()
_ENGINES: dict[tuple[str, str, EngineOptions], Engine] = {}
_FAILED: dict[tuple[str, str, EngineOptions], tuple[float, str]] = {}  # when each key last failed to load, and why
_LOADS = 0
_SIMULATED_GPU = threading.Lock()  # the simulated GPU, like a real one, runs one batch at a time


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


FULL_MEMORY_GB = 40  # at or above this --vram budget everything stays on the GPU (batch 4: 30.6 GB on an H100)
SMALLEST_PROFILE_GB = 12
INT8_BELOW_GB = 16  # below this budget the transformer's block weights are int8
VRAM_RANGE = (SMALLEST_PROFILE_GB, 200)  # what --vram accepts


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs the pipeline; part of the engine's cache key.

    compile: regional ``torch.compile`` of the transformer's repeated blocks, and the VAE decoder
        (CUDA; the first call per image size compiles: ~50 s on a fresh H100 machine, ~15 s from
        Inductor's on-disk cache). Not with int8 weights (``--vram 12``): compiled, they ran far
        slower than eager on an H100 (see ``compiles``).
    one_per_call: one image per pipeline call. A batched image differs from the same image made
        alone by float noise (~1e-6), enough to flip a few 8-bit pixels; one per call makes every
        image's bytes independent of batching, shards and workers. The default on the CPU.
    bucket_captions: batch only prompts whose captions pad to the same length (no attention
        mask, maybe smaller batches) rather than length-sorted batches with a mask where lengths
        differ. Measured on an H100 (compiled, batch 4): 1.05 vs 1.12 s per image.
    precision: ``bf16`` (fp32 on the CPU), or ``fp8``: the transformer blocks' linear layers in
        float8 (e4m3, per-row scales, dynamic activations; torchao) on GPUs with FP8 tensor cores
        (compute capability 8.9+: Ada, Hopper). fp8 changes pixels; it is never the default.
    vram_gb: a GPU memory budget; see ``memory_profile``.
    """

    compile: bool = False
    vram_gb: int | None = None
    bucket_captions: bool = True
    one_per_call: bool = False
    precision: str = "bf16"

    @property
    def stream_text_encoder(self) -> bool:
        """Keep the text encoder in CPU memory and stream its layers to the GPU while prompts encode."""
        return self.vram_gb is not None and self.vram_gb < FULL_MEMORY_GB

    @property
    def weights(self) -> str | None:
        """The transformer blocks' 8-bit weight format, if any: ``fp8``, ``int8`` or None (bf16)."""
        if self.precision == "fp8":
            return "fp8"
        if self.vram_gb is not None and self.vram_gb < INT8_BELOW_GB:
            return "int8"
        return None

    @property
    def compiles(self) -> bool:
        """Whether ``configure`` compiles the transformer. Measured on an H100 (torch 2.11, torchao
        0.18): with int8 weights, once Inductor had autotuned the int8 x bf16 matmuls, the compiled
        blocks made no image in 50 s (280 s in another run); eager, an image every 1.65 s at a
        9.9 GB peak. So int8 runs eager."""
        return self.compile and self.weights != "int8"

    @property
    def max_batch(self) -> int | None:
        if self.one_per_call or self.stream_text_encoder:
            return 1
        return None

    def precision_label(self, device: str) -> str:
        """What the manifest records: the compute dtype plus any 8-bit weights, e.g. ``bf16+int8-weights``."""
        base = "bf16" if device.startswith("cuda") else "fp32"
        if self.weights == "fp8":
            return f"{base}+fp8-e4m3-rowwise"
        if self.weights == "int8":
            return f"{base}+int8-weights"
        return base


def options_for(precision: str | None) -> EngineOptions:
    """Engine options that make images at a recorded precision (a manifest's ``precision``)."""
    if precision and "fp8" in precision:
        return EngineOptions(precision="fp8")
    if precision and "int8" in precision:
        return EngineOptions(vram_gb=SMALLEST_PROFILE_GB)
    return EngineOptions()


def memory_profile(vram_gb: int | None) -> str:
    """One line on what a ``--vram`` budget does (for --help, logs and the docs)."""
    if vram_gb is None or vram_gb >= FULL_MEMORY_GB:
        return "everything on the GPU, batches as asked"
    if vram_gb >= INT8_BELOW_GB:
        return ("transformer resident, text encoder streamed from CPU memory while a shard's prompts encode, "
                "batch 1 (measured on an H100: 13.75 GiB peak, 0.89 s per 1024x1024 image)")
    return ("as the 16 GB profile, plus the transformer's block weights in int8, not compiled "
            "(measured on an H100: 9.2 GiB peak, 1.65 s per 1024x1024 image)")


CAPTION_BUCKET = 32  # the transformer pads captions to multiples of 32 tokens
ENCODE_CHUNK = 32  # prompts per text-encoder call (a streamed encoder's weights cross PCIe once per call)


@dataclass
class Engine:
    """A loaded pipeline on one device, and what it needs to generate.

    Prompts are encoded once per shard (``prepare``), deduplicated, and looked up by
    ``generate``. A lock keeps GPU work to one shard at a time, so a worker can run two shards
    and one's post-processing overlaps the other's generation. Batches are cut from jobs sorted by caption length, so little work goes to
    padding; with ``bucket_captions`` only equal padded lengths share a batch (no attention mask).
    """

    pipe: object
    device: str
    model: ModelRef
    load_seconds: float
    load_id: str = ""
    options: EngineOptions = EngineOptions()
    loaded_at: float = field(default_factory=time.time)  # when (epoch seconds): a run counts the loads it made
    _embeds: dict = field(default_factory=dict, repr=False)
    _cut: set = field(default_factory=set, repr=False)  # (prompt, max length) whose tokens did not all fit
    _gpu: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def compiled(self) -> bool:
        """Whether ``configure`` compiled the transformer's blocks and the VAE decoder (CUDA only)."""
        return self.options.compiles and self.device.startswith("cuda")

    def prepare(self, jobs: Sequence[Job]) -> None:
        """Encode every prompt of these jobs that is not encoded yet (the shard's prompts, up front)."""
        with self._gpu:
            self._encode_missing(jobs)

    def prompts_cut(self, jobs: Sequence[Job]) -> int:
        """How many of these (prepared) jobs have a prompt longer than their ``max_sequence_length``
        tokens, chat template included: the text encoder read only its start, as diffusers does."""
        return sum((job.prompt, job.max_sequence_length) in self._cut for job in jobs)

    def _encode_missing(self, jobs: Sequence[Job]) -> None:
        wanted: dict[int, dict[str, None]] = {}  # max length -> prompts not encoded yet, in order
        for job in jobs:
            texts = [job.prompt, job.negative_prompt] if job.guidance_scale > 0 else [job.prompt]
            for text in texts:
                if (text, job.max_sequence_length) not in self._embeds:
                    wanted.setdefault(job.max_sequence_length, {})[text] = None
        for length, texts in wanted.items():
            texts = list(texts)
            for start in range(0, len(texts), ENCODE_CHUNK):
                chunk = texts[start : start + ENCODE_CHUNK]
                for text, embed in zip(chunk, self._encode(chunk, length)):
                    self._embeds[(text, length)] = embed

    def _encode(self, texts: list[str], length: int) -> list:
        """The pipeline's own prompt encoding (chat template, padding to ``length``, the text
        encoder's second-to-last hidden state, real tokens only), keeping just that one hidden
        state instead of all 37 layers' (~100 MB per prompt at 512 tokens) and no KV cache.

        Padding to the chunk's longest prompt instead would give the same embeddings up to float
        rounding, and a fifth of the encoder's work for ~100-token prompts, but rounding that
        depends on which prompts share a chunk: an image would no longer reproduce byte for byte
        from its record alone (``reproduce``; a test caught it). Encoding is ~0.4% of an image's
        time on an H100, so the padding stays."""
        import torch

        pipe = self.pipe
        prompts = [pipe.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=True) for text in texts]
        inputs = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        whole = pipe.tokenizer(prompts, truncation=False).input_ids
        self._cut.update((text, length) for text, ids in zip(texts, whole) if len(ids) > length)
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device).bool()
        captured = []  # the last layer's input: hidden_states[-2], what the pipeline uses

        def keep(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        hook = pipe.text_encoder.layers[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.inference_mode():
                pipe.text_encoder(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            hook.remove()
        return [captured[0][i][mask[i]] for i in range(len(texts))]

    def release(self, jobs: Sequence[Job] | None = None) -> None:
        """Forget the encoded prompts of these jobs (at the end of their shard), or all of them."""
        with self._gpu:
            if jobs is None:
                self._embeds.clear()
                self._cut.clear()
            for job in jobs or ():
                self._embeds.pop((job.prompt, job.max_sequence_length), None)
                self._embeds.pop((job.negative_prompt, job.max_sequence_length), None)
                self._cut.discard((job.prompt, job.max_sequence_length))

    def caption_tokens(self, job: Job) -> int:
        """How many tokens the job's prompt encodes to."""
        with self._gpu:
            self._encode_missing([job])
            return self._embeds[(job.prompt, job.max_sequence_length)].shape[0]

    def batch_key(self, job: Job) -> tuple:
        """Jobs with equal keys share a pipeline call: same settings (and caption bucket, if asked)."""
        if self.options.bucket_captions:
            return (*job.batch_key(), -(-self.caption_tokens(job) // CAPTION_BUCKET))
        return job.batch_key()

    def generate(self, jobs: Sequence[Job], seeds: Sequence[int]) -> list[np.ndarray]:
        """Generate one batch (same size, steps and guidance); returns HxWx3 uint8 arrays (see ``to_host``)."""
        import torch

        first = jobs[0]
        length = first.max_sequence_length
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        if self.device == "cpu":
            torch.set_flush_denormal(True)  # per thread, and shards run on their own threads (see _load_pipeline)
        with self._gpu, torch.inference_mode():  # one shard at a time on the GPU; the next one's CPU work overlaps
            self._encode_missing(jobs)
            negative = [self._embeds[(j.negative_prompt, length)] for j in jobs] if first.guidance_scale > 0 else None
            shape = f"{len(jobs)} x {first.width}x{first.height}"
            with announcing_compiles(shape) if self.compiled else nullcontext():
                out = self.pipe(
                    prompt_embeds=[self._embeds[(j.prompt, length)] for j in jobs],
                    negative_prompt_embeds=negative,
                    height=first.height,
                    width=first.width,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    output_type="pt",
                )
            return to_host(out.images)


@contextmanager
def announcing_compiles(shape: str) -> Iterator[None]:
    """Tell the progress listeners when the block compiles (dynamo's compile callbacks): a batch of a
    shape the compiled graphs have not met (image size, batch size, caption length) waits tens of
    seconds on a GPU, ~50 s for the first on a fresh machine. Emits ``("compiling", shape)`` at the
    first compile and ``("compiled", seconds)`` (from then to the block's end) after it; nothing when
    nothing compiles, or where torch has no compile callbacks."""
    import torch

    handler = getattr(getattr(torch._dynamo, "callback", None), "callback_handler", None)
    if handler is None or not hasattr(handler, "remove_start_callback"):
        yield
        return
    started: list[float] = []
    caller = threading.get_ident()

    def on_start(_args) -> None:  # runs in the compiling thread, once per graph; another thread's is not ours
        if not started and threading.get_ident() == caller:
            started.append(time.perf_counter())
            progress.emit("compiling", shape)

    handler.register_start_callback(on_start)
    try:
        yield
    finally:
        handler.remove_start_callback(on_start)
    if started:
        progress.emit("compiled", time.perf_counter() - started[0])


def to_host(images) -> list[np.ndarray]:
    """The pipeline's NCHW output in [0, 1] -> HxWx3 uint8 arrays, rounded on the device exactly as
    ``postprocess.Source`` rounds floats (x 255 in float32, half to even), so a quarter of the bytes
    cross to the host and the CPU has no conversion left to do. An image with a non-finite value (the
    "black image" failure) comes back as float32 with its NaNs, for the checks to reject it."""
    import torch

    finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
    pixels = (images.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [pixels[i] if ok else images[i].permute(1, 2, 0).float().cpu().numpy() for i, ok in enumerate(finite)]


def configure(pipe, device: str, options: EngineOptions):
    """Apply the engine options to a freshly loaded pipeline and move it to ``device``.

    Order matters: the text encoder is set to stream (it never lands on the GPU whole), then 8-bit
    weights are made layer by layer on the way to the GPU (so a 12 GB card never holds the bf16
    transformer), then compile. A transformer to be compiled gets the attention processor whose
    rotary embedding is real arithmetic (``blocks.RealRopeAttnProcessor``: the same images;
    compiled, faster).
    """
    import torch

    cuda = device.startswith("cuda")
    check_options(options, device)
    if options.compiles:
        from .blocks import use_real_rope

        use_real_rope(pipe.transformer)
    allocator_set = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if options.vram_gb is not None and cuda and not allocator_set:
        # Fewer stranded blocks between the encoder's streamed layers and the transformer's work;
        # applies to segments made from now on (the user's own allocator settings win).
        set_allocator = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch 2.11+; the older
        set_allocator = set_allocator or getattr(torch.cuda.memory, "_set_allocator_settings", None)  # name warns there
        if set_allocator is not None:
            set_allocator("expandable_segments:True")
    if options.stream_text_encoder:
        from diffusers.hooks import apply_group_offloading
        from diffusers.hooks.group_offloading import _is_group_offload_enabled

        if not _is_group_offload_enabled(pipe.text_encoder):
            pipe.text_encoder.to("cpu")
            # One layer per group: with a CUDA stream the next layer's copy overlaps this one's compute.
            apply_group_offloading(pipe.text_encoder, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=cuda, non_blocking=cuda)
    if options.weights is not None:
        quantize_transformer(pipe.transformer, options.weights, device)
    if options.stream_text_encoder:
        pipe.vae.to(device)
        pipe.transformer.to(device)
    else:
        pipe.to(device)
    if cuda:
        torch.cuda.empty_cache()
    if options.compiles and cuda:
        # Batch sizes (1 is specialised), caption lengths, mask/no mask and image sizes each add a
        # graph; the default limit of 8 is hit by a long-running worker (seen on an H100).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # Left: the per-forward rotary table (a lookup of complex numbers, once per call, tiny).
        warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex operators")
        # diffusers' upsampler asks a cached torch-version check, which dynamo traces through (harmless).
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function")
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        # The VAE decoder too: 0.087 -> 0.039 s per 1024x1024 image on an H100 (bench/RESULTS.md).
        pipe.vae.decoder.compile(fullgraph=True)
    return pipe


def check_options(options: EngineOptions, device: str) -> None:
    """8-bit weights need torchao, and fp8 FP8 tensor cores (compute capability 8.9+): say so
    before anything big loads."""
    if options.weights == "int8":
        _torchao(f"--vram {options.vram_gb}")
    if options.weights != "fp8":
        return
    import torch

    if not device.startswith("cuda"):
        raise ModelError("--precision fp8 needs an NVIDIA GPU with FP8 tensor cores (Ada or Hopper, compute capability "
                         "8.9 or newer); this run is on the CPU. Drop --precision fp8 (the default is bf16).")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ModelError(f"--precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}. Drop --precision fp8, or use --vram 12 "
                         f"for 8-bit (int8) weights on this card.")
    _torchao("--precision fp8")


def _quiet_torchao() -> None:
    """torchao's notices about optional kernels it cannot load, and torch's deprecation notes about
    its enums, are not the user's business (diffusers imports torchao whenever it is installed)."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _torchao(option: str):
    _quiet_torchao()
    try:
        import torchao.quantization
    except ImportError:
        raise ModelError(f"{option} quantizes the transformer with torchao, which is not installed. Install it with "
                         f"`pip install 'zimage-batch[quant]'` (or `pip install torchao`) and run again.") from None
    return torchao.quantization


def quantize_transformer(transformer, weights: str, device: str) -> None:
    """Put the linear layers of the transformer's repeated blocks (nearly all of its weights and
    FLOPs) in 8-bit: ``int8`` weight-only (per channel), or ``fp8`` weights and activations
    (e4m3, per-row scales). Embedders and the final layer stay in full precision. One scale per
    tensor instead of per row was tried on an H100 and dropped: slower (0.614 vs 0.578 s per image)
    and further from bf16 (PSNR 37.7 vs 38.4 dB; bench/RESULTS.md, 2026-11-27).

    ``set_inductor_config=False``: otherwise torchao turns on Inductor's coordinate-descent tuning
    (checking all directions) for the whole process, which benchmarks every compiled kernel many
    times over. An earlier compiled fp8 try with torchao's default did not finish warming up in 6
    minutes on an H100; with it off the warm-up took 26 s."""
    import torch

    quant = _torchao("--precision fp8" if weights == "fp8" else "--vram 12")
    if weights == "fp8":
        config = quant.Float8DynamicActivationFloat8WeightConfig(granularity=quant.PerRow(), set_inductor_config=False)
    else:
        config = quant.Int8WeightOnlyConfig(set_inductor_config=False)
    blocks = ("layers.", "noise_refiner.", "context_refiner.")

    def in_blocks(module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.startswith(blocks)

    quant.quantize_(transformer, config, filter_fn=in_blocks, device=torch.device(device))


@dataclass
class SimulatedEngine:
    """Stands in for the GPU in benchmarks and tests: sleeps a fixed time per image (no CPU burn)
    and returns a synthetic product on an off-white backdrop, different per seed."""

    seconds_per_image: float
    model: ModelRef
    load_id: str
    device: str = "cpu"
    load_seconds: float = 0.0
    options: EngineOptions = EngineOptions()
    loaded_at: float = field(default_factory=time.time)  # when (epoch seconds): a run counts the loads it made

    def prepare(self, jobs: Sequence[Job]) -> None:
        pass

    def prompts_cut(self, jobs: Sequence[Job]) -> int:
        return 0

    def release(self, jobs: Sequence[Job] | None = None) -> None:
        pass

    def caption_tokens(self, job: Job) -> int:
        return len(job.prompt)

    def batch_key(self, job: Job) -> tuple:
        return job.batch_key()

    def generate(self, jobs: Sequence[Job], seeds: Sequence[int]) -> list[np.ndarray]:
        with _SIMULATED_GPU:
            time.sleep(self.seconds_per_image * len(jobs))
        return [synthetic_product(job.width, job.height, seed) for job, seed in zip(jobs, seeds)]


def synthetic_product(width: int, height: int, seed: int) -> np.ndarray:
    """A product-like block, its colour and size drawn from ``seed``, on an off-white backdrop; 8-bit
    RGB, as the engine returns images."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 246, dtype=np.uint8)
    w, h = int(width * rng.uniform(0.3, 0.6)), int(height * rng.uniform(0.4, 0.7))
    x, y = (width - w) // 2, (height - h) // 2
    image[y : y + h, x : x + w] = np.round(rng.uniform(0.05, 0.6, 3) * 255).astype(np.uint8)
    return image


def load_engine(model: str = DEFAULT_MODEL, device: str = "auto", options: EngineOptions = EngineOptions()) -> Engine:
    """The process's engine for ``model`` on ``device``, loaded on first use."""
    global _LOADS
    ref = resolve_model(model)
    if ref.kind == "simulated":
        key = (ref.identity + ref.source, "cpu", options)
        with _LOCK:
            if key not in _ENGINES:
                _ENGINES[key] = SimulatedEngine(float(ref.source.split(":", 1)[1]), ref, f"{socket.gethostname()}:{os.getpid()}:sim")
                _LOADS += 1
            return _ENGINES[key]
    device = pick_device(device)
    key = (ref.identity, device, options)
    asked = time.monotonic()
    with _LOCK:
        failed = _FAILED.get(key)
        if failed is not None and failed[0] >= asked:  # it failed while this caller waited (the other shard in
            raise ModelError(failed[1])                   # flight): the same error, not a second long load
        if key not in _ENGINES:
            progress.emit("loading", f"{model} on {device}")
            start = time.perf_counter()
            try:
                pipe = configure(_load_pipeline(ref, device), device, options)
            except Exception as exc:  # only its text is kept: the exception holds the half-loaded pipeline
                _FAILED[key] = (time.monotonic(), str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}")
                raise  # a later call tries again: the cause may be gone by then
            _FAILED.pop(key, None)
            load_id = f"{socket.gethostname()}:{os.getpid()}:{len(_ENGINES)}"
            _ENGINES[key] = Engine(pipe, device, ref, time.perf_counter() - start, load_id, options)
            _LOADS += 1
            progress.emit("loaded", _ENGINES[key].load_seconds)
        return _ENGINES[key]


def fetch_model(model: str) -> None:
    """Have the model's files at hand without loading them: a hub model not in the Hugging Face cache
    is downloaded (as loading would), the offline test model is built. A run calls this before it
    writes anything, so an unreachable model stops it there; the pipeline loads when a shard needs it."""
    ref = resolve_model(model)
    if ref.kind == "tiny":
        tiny_random_path()
    elif ref.kind == "hub":
        quiet_libraries()
        from diffusers import DiffusionPipeline

        try:
            DiffusionPipeline.download(ref.source)  # what from_pretrained fetches, nothing more
        except Exception as exc:  # hub, network and file errors come in many types
            raise ModelError(_load_failure(ref, exc)) from None


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' own progress bars and info logs (we show our own)."""
    _quiet_torchao()
    import diffusers.utils.logging
    import transformers.utils.logging

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _load_pipeline(ref: ModelRef, device: str):
    import torch

    quiet_libraries()
    from diffusers import ZImagePipeline

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
    return pipe


def _load_failure(ref: ModelRef, exc: Exception) -> str:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    reason = re.sub(r"\s*[^.(]*local_files_only[^.)]*\.?", "", reason)  # diffusers' advice is for its own API, not ours
    if len(reason) > 300:
        reason = reason[:300].rsplit(" ", 1)[0] + " ..."
    if ref.kind == "hub":
        return (
            f"Model {ref.source} could not be loaded ({type(exc).__name__}: {reason}). "
            f"It is not in the local Hugging Face cache and could not be downloaded. On a machine with "
            f"internet run `hf download {ref.source}` (about 20 GB) and set HF_HOME to that cache, or "
            f"download it to a folder and pass --model /path/to/folder. Use --model tiny-random to try "
            f"the pipeline offline."
        )
    return (
        f"Model folder {ref.source} could not be loaded ({type(exc).__name__}: {reason}). "
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

    quiet_libraries()
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

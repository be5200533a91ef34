"""What the benchmarks measure with: device syncs and peak memory, timed passes, the engine's
generate calls and pipeline stages timed without added syncs, and the GPU's clock while a pass runs."""

from __future__ import annotations

import gc
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from zimage_batch.generate import Engine

def mean_seconds(call, device: str, repeat: int = 10) -> float:
    """Mean seconds per call over ``repeat`` calls, after three untimed ones."""
    for _ in range(3):
        call()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    sync(device)
    return (time.perf_counter() - start) / repeat


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated_gb(device: str) -> float | None:
    """GPU memory held by live tensors now (what a variant starts with)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated() / 1e9
    return None


def peak_gb(device: str) -> float | None:
    """Peak GPU memory held by PyTorch's allocator (reserved, i.e. what the card must have)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_reserved() / 1e9
    return None


def free_gpu() -> None:
    """Release what earlier variants left: compiled code (dynamo's caches keep references to the
    modules it compiled) and the allocator's cached blocks, so a peak measured next is honest."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Timing:
    """One timed pass: total seconds, when each image was done and when the shard's prompt encoding
    ended (seconds from the start)."""

    seconds: float
    done_at: list[float]
    images: list[np.ndarray]
    encoded_at: float = 0.0

    def steady(self) -> float:
        """Seconds per image from the first batch's start (after the shard's prompts are encoded,
        once per shard in a run) to the last image done. For the variants through ``process_shard``
        the shard's tail (the last batch's post-processing and storing, ~1.2 s on the H100 host:
        ~0.07 s per image with 16 images) is in it; generate-only has none."""
        return (max(self.done_at) - self.encoded_at) / len(self.done_at)


class GpuMonitor:
    """Samples the GPU's SM clock, temperature and power with nvidia-smi twice a second while a pass
    runs, so clock drift over a long run shows beside each number. ``gpu`` names the card torch uses
    (nvidia-smi counts cards in its own order); does nothing where nvidia-smi is missing."""

    FIELDS = ("clocks.sm", "temperature.gpu", "power.draw")

    def __init__(self, gpu: str | None, period: float = 0.5):
        self.tool = shutil.which("nvidia-smi") if gpu else None
        self.command = [self.tool, "-i", gpu, f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits"]
        self.period, self.samples = period, {field: [] for field in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.tool else None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""  # a sample lost is not a failed pass
            if self._stop.is_set():
                break  # read after the pass: the idle card's clock would drag the numbers down
            for field, value in zip(self.FIELDS, (out.splitlines() or [""])[0].split(",")):
                try:
                    self.samples[field].append(float(value))
                except ValueError:  # "[N/A]": a field this card does not report
                    pass
            self._stop.wait(self.period)

    def __enter__(self) -> "GpuMonitor":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        clocks, temps, watts = (self.samples[field] for field in self.FIELDS)
        out = {}
        if clocks:
            out.update(gpu_sm_mhz_mean=sum(clocks) / len(clocks), gpu_sm_mhz_min=min(clocks))
        if temps:
            out["gpu_temp_c_max"] = max(temps)
        if watts:
            out["gpu_power_w_mean"] = sum(watts) / len(watts)
        return out


def gpu_id(device: str) -> str | None:
    """The card torch uses, as nvidia-smi names it (``GPU-<uuid>``); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    import torch

    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    if uuid is None:
        return str(torch.cuda.current_device())
    return str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}"


class CallTimes:
    """Times the engine's ``generate`` calls. Each call ends by copying its images to the host (a
    sync), so from one call's return to the next call's start the GPU has nothing queued: the
    between-calls time is GPU idle time that the CPU side (checks, batching, the finisher's GIL
    share) puts between batches."""

    def __init__(self, engine: Engine):
        self.spans: list[tuple[float, float]] = []
        self.began = time.perf_counter()  # made just before the timed pass starts
        generate = engine.generate

        def timed(jobs, seeds):
            start = time.perf_counter()
            try:
                return generate(jobs, seeds)
            finally:
                self.spans.append((start, time.perf_counter()))

        engine.generate = timed

    def summary(self, images: int) -> dict:
        inside = sum(end - start for start, end in self.spans)
        between = sum(later[0] - earlier[1] for earlier, later in zip(self.spans, self.spans[1:]))
        return {"generate_calls": len(self.spans), "in_generate_s_per_image": inside / images,
                "between_calls_s_per_image": between / images,
                "sustained_s_per_image": (self.spans[-1][1] - self.began) / images}


class StageTimes:
    """Device time of the transformer's forwards and the VAE's decodes during a pass (CUDA events
    in the stream, so no syncs are added; wall clock on the CPU). What is left of the time inside
    the generate calls is the pipeline's own work (latents, scheduler, conversion, copy out)."""

    def __init__(self, pipe, device: str):
        self.device, self.spans = device, {"transformer": [], "vae_decode": []}
        self.wrapped = [(pipe.transformer, "forward", "transformer"), (pipe.vae, "decode", "vae_decode")]
        for owner, attr, name in self.wrapped:
            setattr(owner, attr, self._timed(getattr(owner, attr), self.spans[name]))

    def _timed(self, call, spans: list):
        import functools

        import torch

        @functools.wraps(call)
        def timed(*args, **kwargs):
            if self.device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = call(*args, **kwargs)
                end.record()
                spans.append(lambda: start.elapsed_time(end) / 1000)
            else:
                began = time.perf_counter()
                out = call(*args, **kwargs)
                elapsed = time.perf_counter() - began
                spans.append(lambda: elapsed)
            return out

        return timed

    def close(self) -> None:
        """Unwrap the pipeline (also after a failed pass, so the next variant is not timed twice)."""
        for owner, attr, _ in self.wrapped:
            owner.__dict__.pop(attr, None)  # the instance attribute goes, the class's method is back

    def summary(self, images: int) -> dict:
        """Seconds per image in each stage."""
        sync(self.device)
        return {f"{name}_s_per_image": sum(span() for span in spans) / images for name, spans in self.spans.items()}

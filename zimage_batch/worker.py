"""Dask worker preload: load the pipeline when a GPU worker starts, so the first shard does not wait.

    dask-cuda-worker tcp://scheduler:8786 --resources GPU=1 --preload zimage_batch.worker

Reads the model and options from the environment (the same values the runs will use, or the
worker would load a second pipeline): ``ZIMAGE_BATCH_MODEL`` (default Tongyi-MAI/Z-Image-Turbo),
``ZIMAGE_BATCH_DEVICE`` (default auto), ``ZIMAGE_BATCH_COMPILE`` (1/0, default: on with CUDA),
``ZIMAGE_BATCH_VRAM_GB``, ``ZIMAGE_BATCH_PRECISION`` (bf16 or fp8). A worker that cannot load the model fails to start, with the reason in
its log, instead of failing every shard later.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("zimage_batch.worker")


def warm_config():
    """The RunConfig fields the preload needs, from the environment (read once, here at the edge)."""
    from .run import RunConfig

    compile_ = os.environ.get("ZIMAGE_BATCH_COMPILE")
    vram = os.environ.get("ZIMAGE_BATCH_VRAM_GB")
    return RunConfig(catalogs=["-"], templates=["-"], out="-",
                     model=os.environ.get("ZIMAGE_BATCH_MODEL", "Tongyi-MAI/Z-Image-Turbo"),
                     device=os.environ.get("ZIMAGE_BATCH_DEVICE", "auto"),
                     compile=None if compile_ is None else compile_ == "1",
                     vram_gb=int(vram) if vram else None,
                     precision=os.environ.get("ZIMAGE_BATCH_PRECISION", "bf16"))


def dask_setup(worker) -> None:
    """Called by Dask when the worker starts (``--preload zimage_batch.worker``)."""
    from .run import engine_for

    engine = engine_for(warm_config())
    logger.info("zimage-batch: %s loaded on %s in %.1f s (worker %s)", engine.model.identity, engine.device,
                engine.load_seconds, worker.name)

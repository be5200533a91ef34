"""Dask worker preload: load the pipeline when a GPU worker starts, so the first shard does not wait.

    CUDA_VISIBLE_DEVICES=0 dask worker tcp://scheduler:8786 --nthreads 2 --resources GPU=2 --preload zimage_batch.worker

one worker per GPU (``GPU=2`` with ``--nthreads 2``: each shard asks for one unit, so a worker runs
two shards at once, as ``--workers`` does; see infra/README.md). Reads the model and options from the
worker's environment, which must hold the values the runs use, or the worker loads a second pipeline:
``ZIMAGE_BATCH_MODEL`` (default Tongyi-MAI/Z-Image-Turbo), ``ZIMAGE_BATCH_DEVICE`` (auto, cuda or cpu;
default auto), ``ZIMAGE_BATCH_COMPILE`` (1/true/yes/on or 0/false/no/off; default: on with CUDA),
``ZIMAGE_BATCH_VRAM_GB`` (a whole number of GB, 12 to 200), ``ZIMAGE_BATCH_PRECISION`` (bf16 or fp8).

The worker's stderr gets one line when the pipeline is loaded. A bad value, or a model that cannot be
loaded, gets one line saying what failed and how to fix it, and ends the worker process (status 2 for
a bad value, 3 for the model), so ``dask worker`` exits non-zero instead of joining the cluster and
failing every shard later. A worker without a nanny (``--no-nanny``) may share its process with other
code, so there the error is only logged, as distributed logs any failed preload.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import ZImageBatchError

logger = logging.getLogger("zimage_batch.worker")

BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
LOAD_FAILED = 3  # exit status when the model cannot be loaded (ModelError's)


def env_value(name: str) -> str | None:
    """A variable of the worker's environment; unset or empty is None."""
    value = os.environ.get(name, "").strip()
    return value or None


def bad_value(name: str, value: str, expected: str, unset: str) -> ZImageBatchError:
    return ZImageBatchError(f"{name}={value!r} in the worker's environment is not {expected}: fix it there (e.g. "
                            f"/etc/zimage-batch/worker.env, one value per line, no comment after it), or unset it "
                            f"for {unset}.")


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when unset)."""
    value = env_value(name)
    if value is None:
        return choices[0]
    if value not in choices:
        raise bad_value(name, value, f"one of {', '.join(choices)}", choices[0])
    return value


def env_flag(name: str) -> bool | None:
    """true/yes/on/1 or false/no/off/0 (any case); None when unset."""
    value = env_value(name)
    if value is None:
        return None
    if value.lower() not in BOOLEANS:
        raise bad_value(name, value, "1, true, yes, on, 0, false, no or off",
                        "the default (on with CUDA)")
    return BOOLEANS[value.lower()]


def env_vram() -> int | None:
    """``ZIMAGE_BATCH_VRAM_GB`` as --vram takes it; None when unset."""
    from .generate import VRAM_RANGE

    value = env_value("ZIMAGE_BATCH_VRAM_GB")
    if value is None:
        return None
    if not value.isdigit() or not VRAM_RANGE[0] <= int(value) <= VRAM_RANGE[1]:
        raise bad_value("ZIMAGE_BATCH_VRAM_GB", value, f"a whole number of GB from {VRAM_RANGE[0]} to {VRAM_RANGE[1]} "
                        f"(e.g. 16)", "no memory budget")
    return int(value)


def warm_config():
    """The RunConfig fields the preload needs, from the environment (read once, here at the edge)."""
    from .models import DEFAULT_MODEL
    from .run import RunConfig

    return RunConfig(catalogs=["-"], templates=["-"], out="-",
                     model=env_value("ZIMAGE_BATCH_MODEL") or DEFAULT_MODEL,
                     device=env_choice("ZIMAGE_BATCH_DEVICE", ("auto", "cuda", "cpu")),
                     compile=env_flag("ZIMAGE_BATCH_COMPILE"),
                     vram_gb=env_vram(),
                     precision=env_choice("ZIMAGE_BATCH_PRECISION", ("bf16", "fp8")))


def log_to_stderr() -> None:
    """Give the preload's logger a handler like distributed's (which configures only its own loggers)."""
    import dask

    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def dask_setup(worker) -> None:
    """Called by Dask when the worker starts (``--preload zimage_batch.worker``): load, or end the worker."""
    from .run import engine_for

    log_to_stderr()
    hint = ""
    try:
        config = warm_config()
        hint = (f" (this worker has ZIMAGE_BATCH_MODEL={config.model}, ZIMAGE_BATCH_DEVICE={config.device}: set the "
                f"ZIMAGE_BATCH_* variable where the message says --model, --device, --compile, --vram or --precision)")
        engine = engine_for(config)
    except Exception as exc:  # distributed would log it and start the worker anyway
        if not worker.nanny:
            raise
        known = isinstance(exc, ZImageBatchError)
        status = exc.exit_code if known else LOAD_FAILED
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        logger.error("zimage-batch: worker %s stops (status %d), its preload failed: %s%s", worker.name, status,
                     " ".join(message.split()), hint)
        for handler in logger.handlers:
            handler.flush()
        os._exit(status)  # its nanny then stops, and `dask worker` exits non-zero
    logger.info("zimage-batch: %s loaded on %s in %.1f s (worker %s)", engine.model.identity, engine.device,
                engine.load_seconds, worker.name)

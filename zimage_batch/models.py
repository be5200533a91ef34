"""Model references: what ``--model`` names, and the identity that goes into job ids.

``--model`` takes a Hugging Face hub id (default ``Tongyi-MAI/Z-Image-Turbo``), a local
diffusers folder (one with ``model_index.json``), or ``tiny-random``: the real
``ZImagePipeline`` with tiny random weights, built offline (its images are noise). For
benchmarks and tests of the machinery around the GPU, ``simulated:SECONDS`` stands in for the
GPU: it sleeps SECONDS per image and draws a synthetic product on white (no model at all). This
module imports no torch: planning uses it to compute job ids without loading anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ModelError

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_VERSION = "v1"
SIMULATED = "simulated"


@dataclass(frozen=True)
class ModelRef:
    """A resolved ``--model``: its kind, where to load it from, and its identity."""

    kind: Literal["tiny", "local", "hub", "simulated"]
    source: str
    identity: str


def resolve_model(model: str) -> ModelRef:
    """Resolve ``--model`` without loading anything; raises ModelError for a bad local path."""
    if model == TINY_RANDOM:
        return ModelRef("tiny", TINY_RANDOM, f"{TINY_RANDOM}/{TINY_RANDOM_VERSION}")
    if model.startswith(f"{SIMULATED}:"):
        try:
            seconds = float(model.split(":", 1)[1])
            if not 0 <= seconds <= 60:
                raise ValueError
        except ValueError:
            raise ModelError(f"--model {model}: use {SIMULATED}:SECONDS with SECONDS per image from 0 to 60, e.g. {SIMULATED}:0.8.") from None
        return ModelRef("simulated", model, f"{SIMULATED}/v1")
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") != 1
    if looks_local:
        index = path / "model_index.json"
        if not index.is_file():
            what = "does not exist" if not path.exists() else "has no model_index.json (not a diffusers pipeline folder)"
            raise ModelError(
                f"Model folder {model} {what}. Pass a folder saved by diffusers' save_pretrained "
                f"(or downloaded with `hf download {DEFAULT_MODEL} --local-dir DIR`), a hub id such as "
                f"{DEFAULT_MODEL}, or `tiny-random` for the offline test model."
            )
        return ModelRef("local", str(path.resolve()), f"local:{path.resolve().name}@{_config_digest(path)}")
    return ModelRef("hub", model, model)


def _config_digest(folder: Path) -> str:
    """A short hash of a pipeline folder's configs (not its weights: hashing 20 GB per run is too slow)."""
    h = hashlib.sha256()
    for config in sorted(folder.glob("*.json")) + sorted(folder.glob("*/config.json")):
        h.update(config.relative_to(folder).as_posix().encode())
        h.update(config.read_bytes())
    return h.hexdigest()[:12]

"""Matting backends: how the product is found before it goes onto pure white.

``--matting`` names one:

* ``classical`` (default): the border flood fill of ``postprocess.cut_out_white``. Offline,
  deterministic, no weights; needs a plain light backdrop and can keep a soft contact shadow.
* ``rembg:PATH``: a U^2-Net-family ONNX file (``u2net.onnx``, ``u2netp.onnx``, ``silueta.onnx``) run by
  the ``rembg`` package (``pip install "rembg[cpu]"``) as its ``u2net_custom`` model.
* ``birefnet:PATH``: a BiRefNet ONNX export run by ``onnxruntime`` (``pip install onnxruntime``).

Learned backends cut products out of any background and drop shadows. Nothing is ever
downloaded: the weights must already be at PATH, and a missing file or package fails at once
with a ``ModelError`` that says what to install or download, before any image is processed.
Each backend is a ``postprocess.Matting``: ``cut(image, keep_shadow=...) -> CutOut``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ModelError
from .postprocess import CLASSICAL, CutOut, Matting, cut_out_alpha

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
BIREFNET_SIZE = 1024  # input side when the ONNX file does not fix it
_INSTALL = {"rembg": 'pip install "rembg[cpu]"', "onnxruntime": "pip install onnxruntime"}
_WEIGHTS_HINT = {
    "rembg": "a U^2-Net ONNX file such as u2net.onnx (https://github.com/danielgatis/rembg/releases)",
    "birefnet": "a BiRefNet ONNX export such as BiRefNet-general-epoch_244.onnx (https://github.com/ZhengPeng7/BiRefNet/releases)",
}


@dataclass(frozen=True)
class LearnedMatting:
    """A backend that predicts an alpha matte (H x W in 0..1) for an sRGB picture."""

    name: str
    predict: Callable[[Image.Image], np.ndarray]

    def cut(self, image: Image.Image, *, keep_shadow: bool = False) -> CutOut:
        """The product on pure white; learned mattes leave shadows out, so `keep_shadow` has no effect."""
        return cut_out_alpha(image, self.predict(image.convert("RGB")))


def load_matting(spec: str) -> Matting:
    """The backend `spec` names (``classical``, ``rembg:PATH`` or ``birefnet:PATH``), ready to use."""
    kind, _, path = spec.partition(":")
    if kind == "classical" and not path:
        return CLASSICAL
    if kind not in _WEIGHTS_HINT or not path:
        raise ModelError(
            f"--matting {spec!r} is not a matting backend. Use 'classical' (the default), 'rembg:PATH' or "
            f"'birefnet:PATH', where PATH is an ONNX file already on this machine."
        )
    weights = Path(path).expanduser()
    if not weights.is_file():
        what = "is a folder, not a file" if weights.is_dir() else "does not exist"
        raise ModelError(
            f"--matting {kind}: the weights {weights} {what}. zimage-batch never downloads weights: download "
            f"{_WEIGHTS_HINT[kind]} yourself and pass its path, or use --matting classical (no weights)."
        )
    loader = _rembg if kind == "rembg" else _birefnet
    return LearnedMatting(f"{kind}:{weights.name}", loader(weights))


def _import(module: str, backend: str) -> Any:
    """Import an optional package, or fail with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"--matting {backend} needs the {module} package, which cannot be imported here ({exc}). "
            f"Install it with `{_INSTALL[module]}` into this environment, or use --matting classical."
        ) from None


def _rembg(weights: Path) -> Callable[[Image.Image], np.ndarray]:
    """rembg's u2net_custom session on a local file (that session type never downloads)."""
    rembg = _import("rembg", "rembg")
    try:
        session = rembg.new_session("u2net_custom", model_path=str(weights))
    except Exception as exc:  # onnxruntime's errors have no common base class
        raise ModelError(f"--matting rembg: {weights} could not be loaded as an ONNX model: {exc}") from None

    def predict(image: Image.Image) -> np.ndarray:
        mask = rembg.remove(image, session=session, only_mask=True)
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0

    return predict


def _birefnet(weights: Path) -> Callable[[Image.Image], np.ndarray]:
    """A BiRefNet ONNX export on onnxruntime's CPU provider: ImageNet-normalised input, sigmoid output."""
    ort = _import("onnxruntime", "birefnet")
    try:
        session = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors have no common base class
        raise ModelError(f"--matting birefnet: {weights} could not be loaded as an ONNX model: {exc}") from None
    graph_input = session.get_inputs()[0]
    dims = list(graph_input.shape)[2:]
    height, width = (int(d) if isinstance(d, int) and d > 0 else BIREFNET_SIZE for d in (dims + [None, None])[:2])

    def predict(image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        batch = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
        outputs = [o for o in session.run(None, {graph_input.name: batch}) if np.ndim(o) == 4]
        logits = max(outputs, key=lambda o: o.shape[-1] * o.shape[-2])[0, 0].astype(np.float32)
        probability = 1.0 / (1.0 + np.exp(-logits))
        matte = Image.fromarray(probability, "F").resize(image.size, Image.Resampling.BILINEAR)
        return np.asarray(matte, dtype=np.float32)

    return predict

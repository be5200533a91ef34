"""Matting backends: the classical default, and learned ones that fail fast without weights or packages.

No learned weights can be downloaded here (and the tool must never download them), so the learned
backends run against small fake ``onnxruntime`` / ``rembg`` modules that record how they are called.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scenes import bottle_scene, iou_outside_edge, noise_image
from zimage_batch.errors import ModelError
from zimage_batch.matting import IMAGENET_MEAN, IMAGENET_STD, LearnedMatting, load_matting
from zimage_batch.postprocess import CLASSICAL, PRESETS, Source, process


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not really onnx")
    return path


def test_classical_is_the_default_backend() -> None:
    assert load_matting("classical") is CLASSICAL and CLASSICAL.name == "classical"


@pytest.mark.parametrize("spec", ["u2net", "rembg", "birefnet:", "classical:x", "sam:model.onnx"])
def test_an_unknown_backend_lists_the_choices(spec: str) -> None:
    with pytest.raises(ModelError, match="'classical' \\(the default\\), 'rembg:PATH' or 'birefnet:PATH'"):
        load_matting(spec)


@pytest.mark.parametrize("kind", ["rembg", "birefnet"])
def test_missing_weights_fail_fast_and_nothing_is_downloaded(kind: str, tmp_path, monkeypatch) -> None:
    imported = []
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))
    with pytest.raises(ModelError) as caught:
        load_matting(f"{kind}:{tmp_path / 'models' / 'missing.onnx'}")
    message = str(caught.value)
    assert "missing.onnx does not exist" in message and "never downloads weights" in message
    assert "--matting classical" in message and caught.value.exit_code == 3
    assert imported == []  # failed before touching the package
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelError, match="is a folder, not a file"):
        load_matting(f"{kind}:{tmp_path / 'folder.onnx'}")


@pytest.mark.parametrize(("kind", "package", "install"), [("rembg", "rembg", 'pip install "rembg[cpu]"'),
                                                           ("birefnet", "onnxruntime", "pip install onnxruntime")])
def test_a_missing_package_fails_fast_with_how_to_install_it(kind, package, install, weights, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(ModelError) as caught:
        load_matting(f"{kind}:{weights}")
    assert f"needs the {package} package" in str(caught.value) and install in str(caught.value)


def _fake_onnxruntime(mask: np.ndarray, calls: list) -> types.ModuleType:
    """An onnxruntime whose model returns logits +8 on `mask` (64x64) and -8 elsewhere, plus a coarse
    32x32 side output that a backend must not pick."""

    class Session:
        def __init__(self, path, providers):
            calls.append(("load", path, tuple(providers)))

        def get_inputs(self):
            return [types.SimpleNamespace(name="input_image", shape=[1, 3, 64, 64])]

        def run(self, names, feeds):
            calls.append(("run", feeds["input_image"]))
            logits = np.where(mask, 8.0, -8.0).astype(np.float32)[None, None]
            return [np.zeros((1, 1, 32, 32), np.float32), logits]

    return types.SimpleNamespace(InferenceSession=Session)


def test_birefnet_runs_a_local_onnx_file_with_imagenet_input_and_sigmoid_output(weights, monkeypatch) -> None:
    scene = bottle_scene((256, 256))
    small_truth = np.asarray(Image.fromarray(scene.truth).resize((64, 64), Image.Resampling.NEAREST))
    calls: list = []
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_onnxruntime(small_truth, calls))
    backend = load_matting(f"birefnet:{weights}")
    assert isinstance(backend, LearnedMatting) and backend.name == "birefnet:model.onnx"
    assert calls == [("load", str(weights), ("CPUExecutionProvider",))]
    cut = backend.cut(scene.image)
    batch = calls[1][1]
    assert batch.shape == (1, 3, 64, 64) and batch.dtype == np.float32
    corner = (np.asarray(scene.image.resize((64, 64)), dtype=np.float32)[0, 0] / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(batch[0, :, 0, 0], corner, atol=0.05)
    assert cut.problem is None and iou_outside_edge(cut.mask, scene.truth) > 0.9
    away = ~ndimage.binary_dilation(cut.mask, np.ones((3, 3), bool), iterations=3)  # past the soft edge
    assert (np.asarray(cut.image)[away] == 255).all()


def test_a_learned_backend_cuts_out_what_the_classical_one_cannot(weights, monkeypatch) -> None:
    noisy = noise_image((512, 512))
    square = np.zeros((64, 64), bool)
    square[16:48, 20:44] = True
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_onnxruntime(square, []))
    assert process(Source(noisy), PRESETS["jd_main"]).reasons == ("backdrop_not_uniform",)
    result = process(Source(noisy, load_matting(f"birefnet:{weights}")), PRESETS["jd_main"])
    assert result.status == "ok", result.explain()
    assert result.fill_ratio == pytest.approx(0.85, abs=0.005) and result.border_white_fraction == 1.0


def test_rembg_uses_its_custom_session_on_the_local_file(weights, monkeypatch) -> None:
    scene = bottle_scene((128, 128))
    calls: list = []

    def new_session(name, **kwargs):
        calls.append((name, kwargs))
        return "session"

    def remove(image, session, only_mask):
        calls.append(("remove", image.size, session, only_mask))
        return Image.fromarray((scene.truth * 255).astype(np.uint8), "L")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(new_session=new_session, remove=remove))
    cut = load_matting(f"rembg:{weights}").cut(scene.image, keep_shadow=True)
    assert calls == [("u2net_custom", {"model_path": str(weights)}), ("remove", (128, 128), "session", True)]
    assert cut.problem is None and iou_outside_edge(cut.mask, scene.truth) > 0.97


def test_weights_that_do_not_load_are_a_clear_error(weights, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("INVALID_PROTOBUF : Load model failed")

    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=refuse))
    with pytest.raises(ModelError, match="model.onnx could not be loaded as an ONNX model: INVALID_PROTOBUF"):
        load_matting(f"birefnet:{weights}")

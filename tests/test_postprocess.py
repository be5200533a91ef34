"""Tests for zimage_batch.postprocess on synthetic product shots whose true masks are known."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin
from scipy import ndimage

from scenes import (
    BOTTLE_BLUE,
    MUG_RED,
    OFF_WHITE,
    bottle_scene,
    compose,
    coverage,
    decode,
    encoded,
    grid,
    iou_outside_edge,
    mug_scene,
    non_white_box,
    plain_backdrop,
    ring_values,
    rounded_rect,
    shaded,
    shadow_scene,
    shadow_to_edge_scene,
)
from zimage_batch.postprocess import (
    PRESETS,
    SRGB_ICC,
    CutOut,
    Preset,
    Source,
    UnknownPresetError,
    cut_out_alpha,
    cut_out_white,
    encode,
    frame,
    get_preset,
    image_problem,
    process,
    render,
)

# --- cut_out_white -----------------------------------------------------------------------------


@pytest.mark.parametrize("scene_name", ["bottle", "mug", "graded"])
def test_cut_out_matches_true_mask_and_whitens_backdrop(scene_name: str) -> None:
    if scene_name == "graded":  # 238 at the top to 252 at the bottom: a backdrop graded by 14 levels
        scene = bottle_scene(backdrop=plain_backdrop((512, 512), (238, 238, 236), (252, 251, 249)))
    else:
        scene = {"bottle": bottle_scene, "mug": mug_scene}[scene_name]()
    cut = cut_out_white(scene.image)
    assert cut.problem is None
    assert cut.mask.dtype == bool and cut.mask.shape == scene.truth.shape
    assert iou_outside_edge(cut.mask, scene.truth) >= 0.97
    out = np.asarray(cut.image)
    assert cut.image.mode == "RGB"
    assert (ring_values(out) == 255).all()
    background = ~ndimage.binary_dilation(scene.truth, iterations=2)
    assert (out[background] == 255).all()
    assert (out[ndimage.binary_erosion(scene.truth, iterations=2)] < 255).any(axis=-1).all()


def test_mug_handle_hole_becomes_pure_white() -> None:
    scene = mug_scene()
    assert scene.regions["hole"].sum() > 200
    before = np.asarray(scene.image)[scene.regions["hole"]]
    assert before.mean() < 250 and not (before == 255).all(axis=-1).any()  # off-white before
    cut = cut_out_white(scene.image)
    assert (np.asarray(cut.image)[scene.regions["hole"]] == 255).all()
    assert not cut.mask[scene.regions["hole"]].any()


def test_small_backdrop_coloured_specks_inside_product_stay_product() -> None:
    scene = bottle_scene()
    pixels = np.asarray(scene.image).copy()
    specks = np.zeros(scene.truth.shape, dtype=bool)
    for y, x in [(200, 240), (260, 250), (320, 270)]:
        specks[y : y + 2, x : x + 2] = True
    pixels[specks] = OFF_WHITE
    cut = cut_out_white(Image.fromarray(pixels))
    assert cut.mask[specks].all()
    assert (np.asarray(cut.image)[specks] == pixels[specks]).all()


def test_edge_is_feathered_inwards_without_halo() -> None:
    scene = bottle_scene()
    cut = cut_out_white(scene.image)
    before, after = np.asarray(scene.image).astype(int), np.asarray(cut.image).astype(int)
    edge = cut.mask & ~ndimage.binary_erosion(cut.mask, structure=np.ones((3, 3)))
    assert ((after - before)[edge].mean(axis=-1) > 5).mean() > 0.95  # blended towards white
    inside = ndimage.binary_erosion(cut.mask, iterations=2)
    assert (after[inside] == before[inside]).all()
    assert (after[~cut.mask] == 255).all()  # no halo outside the mask


def test_dust_and_hair_are_dropped_and_a_two_piece_product_is_kept() -> None:
    size = (512, 512)
    ys, xs = grid(size)
    pieces = np.minimum(np.hypot(ys - 256, xs - 170) - 60, np.hypot(ys - 256, xs - 342) - 60)  # two earrings
    image, truth = compose(plain_backdrop(size), coverage(pieces), shaded(size, MUG_RED))
    pixels = np.asarray(image).copy()
    dust = np.zeros(size, dtype=bool)
    dust[40, 40] = dust[460, 100] = dust[100, 470] = True  # single dark pixels
    dust[440:446, 440:446] = True  # a 6x6 crumb: survives the opening, far smaller than the product
    dust[256, 402:440] = True  # a 1-px hair sticking out of the right piece: removed by the opening
    pixels[dust] = (60, 60, 60)
    cut = cut_out_white(Image.fromarray(pixels))
    assert cut.problem is None
    assert not cut.mask[dust].any()
    assert (np.asarray(cut.image)[dust] == 255).all()
    assert iou_outside_edge(cut.mask, truth) >= 0.97  # both pieces kept


def test_bbox_is_the_product_box() -> None:
    scene = bottle_scene()
    cut = cut_out_white(scene.image)
    ys, xs = np.nonzero(scene.truth)
    expected = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert cut.bbox() is not None
    assert np.abs(np.subtract(cut.bbox(), expected)).max() <= 1
    assert CutOut(cut.image, np.zeros_like(cut.mask), "no_product").bbox() is None


def test_soft_shadow_is_removed_by_default() -> None:
    scene = shadow_scene()
    before = np.asarray(scene.image)[scene.regions["shadow"]].astype(int)
    assert (OFF_WHITE[0] - before[:, 0]).mean() > 25  # the shadow is well beyond the tolerance
    cut = cut_out_white(scene.image)
    assert cut.problem is None
    assert iou_outside_edge(cut.mask, scene.truth) >= 0.97
    out = np.asarray(cut.image)
    assert (out[scene.regions["shadow"]] == 255).all()
    assert (out[scene.regions["clear"]] == 255).all()


def test_grey_product_is_not_mistaken_for_shadow() -> None:
    scene = bottle_scene(colour=(200.0, 200.0, 200.0))  # neutral, 33..57 darker than the backdrop: shadow-like
    cut = cut_out_white(scene.image)
    assert cut.problem is None
    assert iou_outside_edge(cut.mask, scene.truth) >= 0.97


def light_grey_scene(label: bool, size: tuple[int, int] = (1024, 1024)) -> tuple[Image.Image, np.ndarray]:
    """A flat RGB 200 product with a 6-px soft edge (as a lens or a resize gives), optionally with a blue
    label: neutral, 46 levels darker than the backdrop and soft, so every pixel looks like a shadow."""
    h, w = size
    soft = rounded_rect(size, (h / 2, w / 2), (h * 0.35, w * 0.16), radius=w * 0.04) / 6  # a 6-px ramp, not 1 px
    grey = np.full((*size, 3), 200.0, dtype=np.float32)
    image, truth = compose(plain_backdrop(size), coverage(soft), grey, noise=0.0)
    if label:
        sticker = coverage(rounded_rect(size, (h / 2, w / 2), (h * 0.12, w * 0.1), radius=4))
        image, _ = compose(np.asarray(image, dtype=np.float32), sticker, np.array(BOTTLE_BLUE, dtype=np.float32))
    return image, truth


@pytest.mark.parametrize("label", [False, True], ids=["plain", "with a label"])
def test_a_light_grey_product_with_soft_edges_is_kept_whole(label: bool) -> None:
    image, truth = light_grey_scene(label)
    for keep_shadow in (False, True):
        cut = cut_out_white(image, keep_shadow=keep_shadow)
        assert cut.problem is None
        assert iou_outside_edge(cut.mask, truth) >= 0.97  # not just the label, and not "no product"
    result = process(Source(image), PRESETS["amazon_main"])
    assert result.status == "ok" and result.fill_ratio == pytest.approx(0.85, abs=0.005)
    pixels = np.asarray(decode(result.rendered)).astype(int)
    body = np.abs(pixels[400, 700:1300] - 200)  # a row through the grey body, above the label
    assert body.mean() <= 3 and body.max() <= 12  # delivered, not whitened


def test_a_flat_grey_base_under_a_dark_column_stays_product() -> None:
    """A lamp's wide light-grey base (soft-edged, below the column's centre) looks like a floor shadow
    pixel by pixel: it is kept, never erased (a shadow larger than the product is kept too: see
    _contact_shadows)."""
    size = (1024, 1024)
    h, w = size
    soft = rounded_rect(size, (h * 0.70, w / 2), (h * 0.05, w * 0.30), radius=w * 0.02) / 6  # a 6-px ramp
    image, base = compose(plain_backdrop(size), coverage(soft), np.full((*size, 3), 200.0, dtype=np.float32), noise=0.0)
    column = coverage(rounded_rect(size, (h * 0.45, w / 2), (h * 0.20, w * 0.05), radius=8))
    image, _ = compose(np.asarray(image, dtype=np.float32), column, np.array(BOTTLE_BLUE, dtype=np.float32))
    cut = cut_out_white(image)
    assert cut.problem is None and (cut.mask & base).sum() >= 0.97 * base.sum()
    assert np.abs(np.asarray(cut.image)[715, 300:700].astype(int) - 200).mean() <= 3  # not whitened


def test_kept_shadow_is_soft_grey_and_white_elsewhere() -> None:
    scene = shadow_scene()
    cut = cut_out_white(scene.image, keep_shadow=True)
    assert cut.problem is None
    assert iou_outside_edge(cut.mask, scene.truth) >= 0.97
    out = np.asarray(cut.image).astype(int)
    shadow = out[scene.regions["shadow"]]
    assert shadow.mean() < 245 and (shadow < 255).all()
    assert (shadow[:, 0] == shadow[:, 1]).all() and (shadow[:, 1] == shadow[:, 2]).all()  # neutral grey
    assert (out[scene.regions["clear"]] == 255).all()
    # No grey box: next to a pure-white pixel the kept shadow is nearly white too.
    grey = out[..., 0]
    off_product = ~ndimage.binary_dilation(cut.mask, iterations=2)
    for a, b, keep in [(grey[:, 1:], grey[:, :-1], off_product[:, 1:] & off_product[:, :-1]),
                       (grey[1:], grey[:-1], off_product[1:] & off_product[:-1])]:
        step = np.abs(a - b)[keep & ((a == 255) | (b == 255))]
        assert step.max() <= 12


def test_product_touching_the_edge_is_flagged() -> None:
    size = (512, 512)
    sdf = rounded_rect(size, (400, 256), (140, 80), radius=10)  # reaches below the bottom edge
    image, truth = compose(plain_backdrop(size), coverage(sdf), shaded(size, BOTTLE_BLUE))
    cut = cut_out_white(image)
    assert cut.problem == "product_touches_edge"
    assert cut.mask[-1].any()
    assert iou_outside_edge(cut.mask, truth) >= 0.97


def test_noise_is_not_a_uniform_backdrop_and_stays_unchanged() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    cut = cut_out_white(Image.fromarray(pixels))
    assert cut.problem == "backdrop_not_uniform"
    assert np.array_equal(np.asarray(cut.image), pixels)
    assert cut.mask.all()


def test_saturated_backdrop_is_not_a_plain_light_backdrop() -> None:
    scene = bottle_scene((256, 256), backdrop=plain_backdrop((256, 256), (250, 200, 60)))
    assert cut_out_white(scene.image).problem == "backdrop_not_uniform"


def test_black_image_is_not_ok() -> None:
    cut = cut_out_white(Image.new("RGB", (256, 256), (0, 0, 0)))
    assert cut.problem is not None
    assert np.asarray(cut.image).max() == 0  # not whitened


def test_empty_backdrop_has_no_product() -> None:
    image, _ = compose(plain_backdrop((256, 256)), np.zeros((256, 256), np.float32), plain_backdrop((256, 256)))
    cut = cut_out_white(image)
    assert cut.problem == "no_product"
    assert not cut.mask.any() and cut.bbox() is None


def test_bad_tolerance_is_rejected() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        cut_out_white(bottle_scene().image, tolerance=300)


# --- presets -------------------------------------------------------------------------------------


def test_presets_are_the_documented_ones() -> None:
    amazon = PRESETS["amazon_main"]
    got = (amazon.width, amazon.height, amazon.fit, amazon.fill, amazon.format, amazon.quality)
    assert got == (2000, 2000, "pad", 0.85, "JPEG", 90)
    assert (PRESETS["web"].long_side, PRESETS["web"].format, PRESETS["web"].quality) == (1024, "JPEG", 88)
    assert (PRESETS["web_webp"].long_side, PRESETS["web_webp"].format, PRESETS["web_webp"].quality) == (1024, "WEBP", 85)
    assert (PRESETS["png"].long_side, PRESETS["png"].fit, PRESETS["png"].format) == (None, "long_side", "PNG")
    assert all(name == preset.name for name, preset in PRESETS.items())
    assert get_preset("web") is PRESETS["web"]


def test_unknown_preset_names_it_and_the_known_ones() -> None:
    with pytest.raises(UnknownPresetError) as caught:
        get_preset("amazon_mian")
    message = str(caught.value)
    assert "amazon_mian" in message
    assert all(name in message for name in PRESETS)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "fields",
    [
        {"fit": "pad", "width": None, "height": 2000, "fill": 0.85},
        {"fit": "pad", "width": 2000, "height": 2000, "fill": 1.5},
        {"fit": "long_side", "width": 800, "height": None, "long_side": 800},
        {"fit": "long_side", "width": None, "height": None, "long_side": 800, "extension": "png"},
    ],
)
def test_inconsistent_presets_are_rejected(fields: dict[str, object]) -> None:
    base = {"name": "bad", "format": "JPEG", "extension": "jpg", "description": "test"}
    with pytest.raises(ValueError, match="bad"):
        Preset(**{**base, **fields})


# --- render -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "fmt"),
    [
        ("amazon_main", (2000, 2000), "JPEG"),
        ("web", (1024, 768), "JPEG"),
        ("web_webp", (1024, 768), "WEBP"),
        ("png", (640, 480), "PNG"),
    ],
)
def test_every_preset_has_exact_size_and_format(name: str, size: tuple[int, int], fmt: str) -> None:
    cut = cut_out_white(bottle_scene((480, 640)).image)
    rendered = render(cut.image, PRESETS[name], cut.mask)
    decoded = decode(rendered)
    assert (rendered.width, rendered.height) == decoded.size == size
    assert rendered.format == decoded.format == fmt
    assert rendered.preset == name and rendered.extension == PRESETS[name].extension
    assert decoded.mode == "RGB"
    if fmt == "PNG":
        assert np.array_equal(np.asarray(decoded), np.asarray(cut.image))  # lossless at the original size


def test_amazon_main_fills_85_percent_centred_on_pure_white() -> None:
    cut = cut_out_white(bottle_scene((1024, 1024)).image)
    decoded = decode(render(cut.image, get_preset("amazon_main"), cut.mask))
    pixels = np.asarray(decoded)
    left, upper, right, lower = non_white_box(pixels)
    assert max(right - left, lower - upper) == pytest.approx(0.85 * 2000, rel=0.02)
    assert (left + right) / 2 == pytest.approx(1000, abs=40)
    assert (upper + lower) / 2 == pytest.approx(1000, abs=40)
    assert (ring_values(pixels) == 255).all()  # exact after JPEG encoding
    assert JpegImagePlugin.get_sampling(decoded) == 0  # 4:4:4 at quality >= 90


def test_pad_without_mask_treats_the_whole_image_as_product() -> None:
    product = Image.new("RGB", (800, 600), (30, 90, 160))  # 400x300 would need more than max_upscale (4x)
    lossless = PRESETS["amazon_main"].model_copy(update={"format": "PNG", "extension": "png"})  # no JPEG ringing
    pixels = np.asarray(decode(render(product, lossless)))
    left, upper, right, lower = non_white_box(pixels)
    assert right - left == pytest.approx(1700, abs=3)
    assert lower - upper == pytest.approx(1275, abs=3)
    assert (left + right) / 2 == pytest.approx(1000, abs=2) and (upper + lower) / 2 == pytest.approx(1000, abs=2)
    assert (ring_values(pixels) == 255).all()


def test_web_jpeg_keeps_white_border_and_uses_420() -> None:
    cut = cut_out_white(bottle_scene().image)
    decoded = decode(render(cut.image, PRESETS["web"], cut.mask))
    assert (ring_values(np.asarray(decoded)) == 255).all()
    assert JpegImagePlugin.get_sampling(decoded) == 2  # 4:2:0 below quality 90


def test_kept_shadow_survives_the_amazon_frame() -> None:
    scene = shadow_scene((1024, 1024))
    frames = {}
    for keep in (False, True):
        cut = cut_out_white(scene.image, keep_shadow=keep)
        frames[keep] = np.asarray(decode(render(cut.image, PRESETS["amazon_main"], cut.mask)))
    below_product = (slice(1860, 1960), slice(800, 1200))  # the bottle ends at row ~1850
    assert frames[True][below_product].min() < 240
    assert frames[False][below_product].min() >= 250
    assert (ring_values(frames[True]) == 255).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_carries_no_exif(name: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (30, 90, 160)).save(buffer, "JPEG", exif=exif)
    tagged = Image.open(io.BytesIO(buffer.getvalue()))
    assert "exif" in tagged.info  # the input does carry EXIF
    rendered = render(tagged, PRESETS[name])
    decoded = decode(rendered)
    assert "exif" not in decoded.info and len(decoded.getexif()) == 0
    assert b"CameraMaker" not in rendered.data


def _swapped_primaries_profile() -> bytes:
    """An RGB ICC profile whose red and blue primaries are exchanged (clearly not sRGB)."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entries = {bytes(data[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red + 4 : red + 12], data[blue + 4 : blue + 12] = data[blue + 4 : blue + 12], data[red + 4 : red + 12]
    return bytes(data)


def test_tagged_input_is_converted_to_srgb_and_tagged_srgb() -> None:
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    image.info["icc_profile"] = _swapped_primaries_profile()  # its description still says "sRGB built-in"
    decoded = decode(render(image, PRESETS["png"]))
    red, _, blue = np.asarray(decoded)[24, 32].astype(int)
    assert blue > red + 100  # "red" in the swapped space is blue in sRGB
    assert decoded.info["icc_profile"] == SRGB_ICC


def test_render_rejects_a_mask_that_does_not_fit() -> None:
    image = bottle_scene((256, 256)).image
    with pytest.raises(ValueError, match="shape"):
        render(image, PRESETS["amazon_main"], np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="no product"):
        render(image, PRESETS["amazon_main"], np.zeros((256, 256), dtype=bool))


def test_rgba_input_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    image.paste((30, 90, 160, 255), (50, 25, 150, 75))
    pixels = np.asarray(decode(render(image, PRESETS["png"])))
    assert (pixels[:20] == 255).all()
    assert tuple(pixels[50, 100]) == (30, 90, 160)


# --- cut_out_alpha (learned backends) -------------------------------------------------------------


def _soft_alpha(truth: np.ndarray) -> np.ndarray:
    """A matte like a network's: soft 2-px edge, faint noise on the backdrop."""
    alpha = ndimage.gaussian_filter(truth.astype(np.float32), sigma=1.0)
    return np.clip(alpha + np.random.default_rng(4).uniform(0, 0.02, truth.shape), 0, 1).astype(np.float32)


def test_alpha_cut_out_puts_the_product_on_pure_white_with_soft_edges() -> None:
    scene = mug_scene()
    cut = cut_out_alpha(scene.image, _soft_alpha(scene.truth))
    assert cut.problem is None and iou_outside_edge(cut.mask, scene.truth) >= 0.97
    out, before = np.asarray(cut.image).astype(int), np.asarray(scene.image).astype(int)
    away = ~ndimage.binary_dilation(scene.truth, iterations=3)
    assert (out[away] == 255).all()  # faint matte noise snapped to pure white
    inside = ndimage.binary_erosion(scene.truth, iterations=3)
    assert (out[inside] == before[inside]).all()
    edge = scene.truth & ~ndimage.binary_erosion(scene.truth)
    assert ((out[edge] > before[edge]).any(axis=-1)).mean() > 0.9  # blended towards white, no dark halo


def test_faint_matte_noise_next_to_the_product_is_snapped_to_pure_white() -> None:
    scene = bottle_scene((256, 256))
    noise = np.random.default_rng(5).uniform(0, 0.025, scene.truth.shape).astype(np.float32)
    cut = cut_out_alpha(scene.image, np.where(scene.truth, 1.0, noise).astype(np.float32))
    assert (np.asarray(cut.image)[~scene.truth] == 255).all()  # even the pixels touching the product
    assert (np.asarray(cut.image)[scene.truth] == np.asarray(scene.image)[scene.truth]).all()


def test_alpha_cut_out_flags_edges_and_empty_mattes() -> None:
    scene = bottle_scene((256, 256), centre=(0.7, 0.5))
    assert cut_out_alpha(scene.image, scene.truth.astype(np.float32)).problem == "product_touches_edge"
    empty = cut_out_alpha(scene.image, np.zeros((256, 256), np.float32))
    assert empty.problem == "no_product" and not empty.mask.any()
    with pytest.raises(ValueError, match="shape"):
        cut_out_alpha(scene.image, np.zeros((10, 10), np.float32))


@pytest.mark.parametrize(
    ("pixels", "problem"),
    [
        (np.zeros((8, 8, 3), np.uint8), "black"),
        (np.full((8, 8, 3), 7, np.uint8), "black"),
        (np.full((8, 8, 3), 200, np.uint8), "blank"),
        (np.arange(192, dtype=np.uint8).reshape(8, 8, 3), None),
        (np.full((8, 8, 3), 0.5, np.float32), "blank"),
        (np.linspace(0, 1, 192, dtype=np.float32).reshape(8, 8, 3), None),
    ],
)
def test_image_problem_reads_integers_as_0_255_and_floats_as_0_1(pixels: np.ndarray, problem: str | None) -> None:
    assert image_problem(pixels) == problem


# --- speed ---------------------------------------------------------------------------------------


def test_time_for_1024_amazon_main(capsys: pytest.CaptureFixture[str]) -> None:
    """The whole post-processing of a generated 1024x1024 shot for amazon_main: the issue's target is
    150 ms of one core (`python -m bench.postprocess` measures it pinned to one core)."""
    scene = shadow_scene((1024, 1024))
    process(Source(scene.image), PRESETS["amazon_main"])  # warm up
    cut_times, total_times = [], []
    for _ in range(3):
        start = time.perf_counter()
        source = Source(scene.image)
        cut = source.cut()
        middle = time.perf_counter()
        result = process(source, PRESETS["amazon_main"])
        cut_times.append(middle - start)
        total_times.append(time.perf_counter() - start)
    with capsys.disabled():
        cut_ms, total_ms = min(cut_times) * 1000, min(total_times) * 1000
        print(f"\n1024x1024: cut-out {cut_ms:.0f} ms, process(amazon_main) in all {total_ms:.0f} ms")
    assert cut.problem is None and iou_outside_edge(cut.mask, scene.truth) >= 0.97
    assert result.status == "ok" and (result.rendered.width, result.rendered.height) == (2000, 2000)
    assert min(total_times) < 0.6  # a generous ceiling (4x the target) that still catches a regression


def test_embedded_srgb_profile_is_the_same_bytes_in_every_process():
    """lcms stamps profiles with the current time; outputs must not depend on when a process started."""
    import hashlib
    import subprocess
    import sys

    from zimage_batch.postprocess import SRGB_ICC

    code = "import hashlib; from zimage_batch.postprocess import SRGB_ICC; print(hashlib.sha256(SRGB_ICC).hexdigest())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(SRGB_ICC).hexdigest()
    blanked = bytearray(SRGB_ICC)
    blanked[44:48], blanked[64:68], blanked[84:100] = bytes(4), bytes(4), bytes(16)
    assert SRGB_ICC[84:100] in (bytes(16), hashlib.md5(blanked).digest())  # no profile ID, or a valid one


@pytest.mark.parametrize("size", [(1, 1), (8192, 1), (2, 3), (24, 3), (100, 5)])
def test_the_border_of_a_frame_only_pixels_thin_is_measured(size):
    from zimage_batch.postprocess import border_white_fraction

    assert border_white_fraction(Image.new("RGB", size, "white")) == 1.0
    assert border_white_fraction(Image.new("RGB", size, "black")) == 0.0

"""`process`: exact sizes, formats, fill and pure-white borders per preset, and each quality gate firing
for its own case and never for clean product shots."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scenes import (
    OFF_WHITE,
    bottle_scene,
    decode,
    encoded,
    mug_scene,
    non_white_box,
    plain_backdrop,
    ring_values,
    shadow_scene,
    shadow_to_edge_scene,
)
from zimage_batch.postprocess import PRESETS, SRGB_ICC, REASONS, Processed, Source, encode, frame, process

WHITE_PRESETS = [name for name, preset in PRESETS.items() if preset.white]
SIZE = (1024, 1024)


@pytest.fixture(scope="module")
def clean() -> dict[str, Source]:
    """Clean 1024x1024 shots, each a Source whose cut-outs are shared by the tests of this module."""
    return {
        "bottle": Source(bottle_scene(SIZE).image),
        "mug with handle": Source(mug_scene(SIZE).image),
        "soft shadow": Source(shadow_scene(SIZE).image),
        "graded backdrop": Source(bottle_scene(SIZE, plain_backdrop(SIZE, (238, 238, 236), (252, 251, 249))).image),
        "warm off-white": Source(bottle_scene(SIZE, plain_backdrop(SIZE, (242, 236, 226))).image),
    }


def bounds_of(name: str) -> tuple[float, float]:
    return PRESETS[name].fill_bounds() or (0.0, 1.0)


# --- clean shots: every white preset, exact geometry, no gate fires ------------------------------


@pytest.mark.parametrize("shot", ["bottle", "mug with handle", "soft shadow", "graded backdrop", "warm off-white"])
@pytest.mark.parametrize("name", WHITE_PRESETS)
def test_clean_shot_passes_every_white_preset(clean: dict[str, Source], shot: str, name: str) -> None:
    preset = PRESETS[name]
    result = process(clean[shot], preset)
    assert result.status == "ok" and result.reasons == (), result.explain()
    decoded = decode(result.rendered)
    assert decoded.size == (preset.width, preset.height) and decoded.format == preset.format
    pixels = np.asarray(decoded)
    assert (ring_values(pixels) == 255).all() and result.border_white_fraction == 1.0
    assert result.fill_ratio == pytest.approx(preset.fill, abs=0.005)
    left, upper, right, lower = non_white_box(pixels)
    measured = max((right - left) / preset.width, (lower - upper) / preset.height)
    assert measured == pytest.approx(preset.fill, abs=0.02)  # what a marketplace measures on the pixels
    assert (left + right) / 2 == pytest.approx(preset.width / 2, abs=0.02 * preset.width)
    assert (upper + lower) / 2 == pytest.approx(preset.height / 2, abs=0.02 * preset.height)
    assert decoded.info.get("icc_profile") == SRGB_ICC and len(decoded.getexif()) == 0
    assert len(result.rendered.data) <= preset.max_bytes and result.rendered.quality == preset.quality


@pytest.fixture(scope="module")
def fits_every_frame() -> Source:
    """A bottle 44% of the height: it fits a 1.91:1 banner and a 9:16 story, and reaches 85% in 4x."""
    return Source(bottle_scene(SIZE, half=(0.22, 0.1)).image)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gives_its_exact_size_and_format(fits_every_frame: Source, name: str) -> None:
    preset = PRESETS[name]
    result = process(fits_every_frame, preset)
    assert result.status == "ok", result.explain()
    decoded = decode(result.rendered)
    expected = (preset.width, preset.height) if preset.fit != "long_side" else (preset.long_side or 1024,) * 2
    assert decoded.size == expected == (result.rendered.width, result.rendered.height)
    assert decoded.format == preset.format == result.rendered.format and decoded.mode == "RGB"
    assert decoded.info.get("icc_profile") == SRGB_ICC


def test_campaign_crop_is_centred_on_the_subject() -> None:
    scene = bottle_scene((1080, 1920), centre=(0.5, 0.35), half=(0.3, 0.06))  # a product left of centre
    result = process(Source(scene.image), PRESETS["square_1080"])
    assert result.status == "ok", result.explain()
    pixels = np.asarray(decode(result.rendered))
    left, upper, right, lower = non_white_box(pixels, below=200)
    assert (left + right) / 2 == pytest.approx(540, abs=15)  # the product, not the picture, is centred
    assert left > 0 and right < 1080 and result.fill_ratio == pytest.approx(0.6, abs=0.01)
    assert pixels[5, 5].min() > 230  # the backdrop is kept, not whitened


def test_campaign_crop_without_a_plain_backdrop_is_centred_on_the_picture() -> None:
    rng = np.random.default_rng(3)
    ramp = np.broadcast_to(np.linspace(0, 255, 1920)[None, :, None], (1080, 1920, 3))  # red = x position
    pixels = np.clip(ramp + rng.normal(0, 30, (1080, 1920, 3)), 0, 255).astype(np.uint8)
    result = process(Source(Image.fromarray(pixels)), PRESETS["square_1080"])
    assert result.status == "ok" and result.fill_ratio is None
    out = np.asarray(decode(result.rendered)).astype(float)
    assert out[:, :20].mean() == pytest.approx(420 / 1920 * 255, abs=8)  # the window starts at x = 420
    assert out[:, -20:].mean() == pytest.approx(1500 / 1920 * 255, abs=8)


def test_kept_shadow_is_a_soft_grey_under_the_product_with_a_white_border(clean: dict[str, Source]) -> None:
    frames = {}
    for shadow in ("remove", "keep"):
        preset = PRESETS["amazon_main"].model_copy(update={"shadow": shadow})
        result = process(clean["soft shadow"], preset)
        assert result.status == "ok", result.explain()
        frames[shadow] = np.asarray(decode(result.rendered)).astype(int)
    below = (slice(1860, 1960), slice(800, 1200))  # the bottle ends at row ~1850
    assert frames["keep"][below].min() < 240 and frames["remove"][below].min() >= 250
    grey = frames["keep"][1860:, 300:1700, 0]  # below the product: soft everywhere, never a box edge
    assert np.abs(np.diff(grey, axis=0)).max() <= 12 and np.abs(np.diff(grey, axis=1)).max() <= 12


# --- each gate fires for its own case ------------------------------------------------------------


@pytest.mark.parametrize(
    ("picture", "reason"),
    [
        (lambda: Image.new("RGB", SIZE, (0, 0, 0)), "black"),
        (lambda: Image.new("RGB", SIZE, (4, 3, 5)), "black"),
        (lambda: Image.new("RGB", SIZE, (255, 255, 255)), "blank"),
        (lambda: Image.new("RGB", SIZE, (128, 128, 128)), "blank"),
        (lambda: np.where(np.arange(3) == 1, np.nan, 0.5) * np.ones((64, 64, 3), np.float32), "non_finite"),
        (lambda: Image.fromarray(np.full((64, 64), np.inf, np.float32), "F"), "non_finite"),
    ],
    ids=["black", "near black", "white", "grey", "nan", "inf"],
)
@pytest.mark.parametrize("name", ["amazon_main", "square_1080", "web"])
def test_black_blank_and_non_finite_pictures_are_rejected_for_every_preset(picture, reason: str, name: str) -> None:
    result = process(Source(picture()), PRESETS[name])
    assert result.reasons == (reason,) and result.status == "rejected" and result.rendered is None


def test_noise_cannot_be_cut_out_but_can_be_resized() -> None:
    noise = Source(Image.fromarray(np.random.default_rng(1).integers(0, 256, (*SIZE, 3), dtype=np.uint8)))
    assert process(noise, PRESETS["amazon_main"]).reasons == ("backdrop_not_uniform",)
    assert process(noise, PRESETS["web"]).status == "ok"  # keeps the picture: no backdrop needed
    assert process(noise, PRESETS["web"], white=True).reasons == ("backdrop_not_uniform",)  # a white job


def test_an_empty_backdrop_has_no_product() -> None:
    empty = Image.fromarray(np.clip(plain_backdrop(SIZE) + np.random.default_rng(2).normal(0, 1.5, (*SIZE, 3)), 0, 255).astype(np.uint8))
    assert process(Source(empty), PRESETS["jd_main"]).reasons == ("no_product",)


def test_a_product_touching_the_picture_edge_is_rejected() -> None:
    scene = bottle_scene(SIZE, centre=(0.7, 0.5), half=(0.35, 0.15))  # runs off the bottom
    result = process(Source(scene.image), PRESETS["amazon_main"])
    assert result.reasons == ("product_touches_edge",) and result.rendered is not None  # kept for review


def test_a_product_cut_by_a_campaign_crop_is_rejected_unless_it_is_on_white(clean: dict[str, Source]) -> None:
    tall = clean["bottle"]  # 70% of the height: a 1.91:1 window is only 52% high
    assert process(tall, PRESETS["banner_1200x628"]).reasons == ("product_cropped",)
    on_white = process(tall, PRESETS["banner_1200x628"], white=True)  # a white job: the frame widens invisibly
    assert on_white.status == "ok", on_white.explain()
    pixels = np.asarray(decode(on_white.rendered))
    assert pixels.shape[:2] == (628, 1200) and (ring_values(pixels) == 255).all()
    assert on_white.fill_ratio == pytest.approx(0.9, abs=0.01)


def test_a_product_too_small_to_enlarge_to_the_fill_is_rejected_where_fill_is_bounded() -> None:
    small = Source(bottle_scene(SIZE, half=(0.1, 0.05)).image)  # 205 px tall: 1700 px would be 8.3x
    amazon = process(small, PRESETS["amazon_main"])
    assert amazon.reasons == ("fill_out_of_bounds",)
    assert amazon.fill_ratio == pytest.approx(4 * 205 / 2000, abs=0.01)  # enlarged max_upscale (4x), no more
    assert "41% of the frame" in amazon.explain()[0] and "80%-90%" in amazon.explain()[0]
    assert process(small, PRESETS["shopify"]).status == "ok"  # no fill bounds: delivered smaller
    assert process(small, PRESETS["jd_main"]).fill_ratio == pytest.approx(0.85, abs=0.005)  # 800 px: 3.3x is enough


@pytest.mark.parametrize("size", [(8, 8), (1, 2), (6, 3000)], ids=["8x8", "2x1", "strip 3000x6"])
def test_a_picture_too_small_to_have_a_backdrop_ring_is_rejected_not_an_error(size: tuple[int, int]) -> None:
    source = Source(bottle_scene(size, half=(0.3, 0.02) if size[1] > 100 else (0.35, 0.15)).image)
    result = process(source, PRESETS["amazon_main"])
    assert result.reasons == ("too_small",) and result.rendered is None
    assert f"{size[1]}x{size[0]} px, too small" in result.explain()[0]
    assert process(source, PRESETS["square_1080"]).reasons == ("low_resolution",)  # its subject() cuts out too


def test_enlarging_more_than_max_upscale_is_rejected_for_every_fit() -> None:
    tiny = Source(bottle_scene((12, 12)).image)
    for name in ("square_1080", "web", "banner_1200x628"):
        result = process(tiny, PRESETS[name])
        assert result.reasons[0] == "low_resolution" and result.rendered is not None  # kept for review
        explanation = result.explain()[0]
        assert f"12x12 px; preset {name} would enlarge it" in explanation and "max_upscale of 4x" in explanation
    assert process(tiny, PRESETS["png"]).status == "ok"  # original size: nothing enlarged
    at_the_cap = Source(bottle_scene((256, 256)).image)  # 1024 px is exactly 4x
    assert process(at_the_cap, PRESETS["web"]).status == "ok"
    assert process(at_the_cap, PRESETS["web"].model_copy(update={"max_upscale": 3.9})).reasons == ("low_resolution",)


def test_fill_bounds_that_cannot_be_measured_are_a_rejection_not_a_pass() -> None:
    poster = Source(Image.fromarray(np.random.default_rng(1).integers(0, 256, (*SIZE, 3), dtype=np.uint8)))
    strict = PRESETS["square_1080"].model_copy(update={"fill_min": 0.5})
    result = process(poster, strict)
    assert result.reasons == ("fill_unmeasured",) and result.fill_ratio is None
    assert "needs the product to fill 50%-100%" in result.explain()[0]
    assert process(poster, PRESETS["square_1080"]).status == "ok"  # no bounds asked: nothing to measure


def test_fill_bounds_apply_to_resize_presets_too(clean: dict[str, Source]) -> None:
    strict = PRESETS["web"].model_copy(update={"background": "white", "fill_min": 0.8})
    result = process(clean["bottle"], strict)
    assert result.reasons == ("fill_out_of_bounds",) and result.fill_ratio == pytest.approx(0.7, abs=0.01)
    assert process(clean["bottle"], strict.model_copy(update={"fill_min": 0.6})).status == "ok"


def test_a_kept_shadow_wider_than_the_product_stays_inside_the_white_border() -> None:
    """The README's amazon_tight (fill 0.9, shadow kept) on the lamp shot: at 90% the shadow, wider
    than the product, reached the border ring and the shot was rejected; the product is now scaled
    so the shadow fits, and the fill says how much that cost."""
    source = Source(shadow_scene((1024, 1024)).image)
    tight = PRESETS["amazon_main"].model_copy(update={"name": "amazon_tight", "fill": 0.9, "fill_min": 0.88, "shadow": "keep"})
    result = process(source, tight)
    assert result.status == "ok" and result.border_white_fraction == 1.0, result.explain()
    assert 0.88 <= result.fill_ratio < 0.9


def test_a_kept_shadow_running_into_the_border_is_rejected() -> None:
    source = Source(shadow_to_edge_scene(SIZE).image)
    kept = process(source, PRESETS["amazon_main"].model_copy(update={"shadow": "keep"}))
    assert kept.reasons == ("border_not_white",) and kept.border_white_fraction < 0.99
    assert process(source, PRESETS["amazon_main"]).status == "ok"  # the same shot with the shadow removed


def test_quality_is_lowered_only_as_far_as_the_size_cap_needs() -> None:
    textured = Source(bottle_scene(SIZE, half=(0.45, 0.4), texture=60).image)
    preset = PRESETS["jd_main"]
    full = process(textured, preset)
    assert full.status == "ok" and full.rendered.quality == 90
    capped = preset.model_copy(update={"max_bytes": int(len(full.rendered.data) * 0.6)})
    result = process(textured, capped)
    assert result.status == "ok" and len(result.rendered.data) <= capped.max_bytes
    quality = result.rendered.quality
    assert preset.min_quality <= quality < 90 and quality % 5 == 0
    one_step_better = capped.model_copy(update={"quality": quality + 5, "max_bytes": None})
    assert len(encode(frame(textured.cut().image, preset, textured.cut().mask).image, one_step_better)[0]) > capped.max_bytes


def test_a_size_cap_that_cannot_be_met_is_rejected() -> None:
    textured = Source(bottle_scene(SIZE, half=(0.45, 0.4), texture=60).image)
    tiny = PRESETS["jd_main"].model_copy(update={"max_bytes": 20_000})
    result = process(textured, tiny)
    assert result.reasons == ("over_size_cap",) and result.rendered.quality == tiny.min_quality
    assert "20 KB" in result.explain()[0]
    png = PRESETS["png"].model_copy(update={"max_bytes": 20_000})  # lossless: no quality to lower
    assert process(textured, png).reasons == ("over_size_cap",)


def test_a_noisy_product_over_the_cap_steps_down_instead_of_breaking_the_encoder() -> None:
    """Pillow gives its optimising JPEG encoder one byte per pixel below quality 95: a noisy product over
    a 1 MB cap at 1000x1000 broke the encoder ("broken data stream") before the cap was ever tried."""
    noisy = Source(bottle_scene((1000, 1000), half=(0.425, 0.425), texture=120).image)
    jd = PRESETS["jd_main"].model_copy(update={"width": 1000, "height": 1000})  # 1 MB: one byte per pixel
    result = process(noisy, jd)
    assert result.status == "ok" and result.rendered.quality == 85 and len(result.rendered.data) <= jd.max_bytes
    at_90 = process(noisy, jd.model_copy(update={"min_quality": 90}))
    assert at_90.reasons == ("over_size_cap",) and len(at_90.rendered.data) > jd.max_bytes
    web = process(noisy, PRESETS["web"].model_copy(update={"quality": 92}))  # no cap: just encodes
    assert web.status == "ok" and len(web.rendered.data) > 1024 * 1000


def test_every_reason_has_an_explanation() -> None:
    codes = {"black", "blank", "non_finite", "too_small", "backdrop_not_uniform", "no_product", "product_touches_edge",
             "product_cropped", "low_resolution", "fill_out_of_bounds", "fill_unmeasured", "border_not_white",
             "over_size_cap", "unreadable_image", "processing_failed"}
    assert set(REASONS) == codes
    every = Processed(PRESETS["amazon_main"], tuple(REASONS), None, source_size=(12, 12), upscale=90.0, error="E: x")
    assert len(every.explain()) == len(codes)  # each sentence formats with the values a record has


# --- inputs: orientation, colour spaces, transparency, big pictures ---------------------------


def test_camera_orientation_is_applied_before_the_tag_is_dropped() -> None:
    scene = bottle_scene((512, 768), centre=(0.5, 0.3), half=(0.3, 0.1))  # landscape, product on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    tagged = Image.open(io.BytesIO(encoded(scene.image, "JPEG", quality=95, exif=exif)))
    source = Source(tagged)
    assert source.image.size == (512, 768)  # portrait, as a viewer shows it
    pixels = np.asarray(source.image)
    assert pixels[200:300, 256].mean() < 150 and pixels[600:700, 256].mean() > 230  # product now at the top


def test_transparent_cut_out_is_flattened_on_white_and_delivered() -> None:
    scene = bottle_scene(SIZE)
    rgba = scene.image.convert("RGBA")
    rgba.putalpha(Image.fromarray((scene.truth * 255).astype(np.uint8)))
    result = process(Source(rgba), PRESETS["amazon_main"])
    assert result.status == "ok", result.explain()
    assert result.fill_ratio == pytest.approx(0.85, abs=0.005)


def test_cmyk_and_16_bit_inputs_become_srgb_pictures() -> None:
    cmyk = Source(bottle_scene(SIZE).image.convert("CMYK"))
    assert cmyk.image.mode == "RGB" and process(cmyk, PRESETS["jd_main"]).status == "ok"
    grey16 = Image.fromarray(np.asarray(bottle_scene(SIZE).image.convert("L")).astype(np.uint16) * 257)
    assert grey16.mode == "I;16"
    source = Source(grey16)
    assert source.problem is None and np.asarray(source.image).mean() == pytest.approx(
        np.asarray(bottle_scene(SIZE).image.convert("L")).mean(), abs=1)


def test_float_and_32_bit_integer_pictures_are_read_in_their_usual_ranges() -> None:
    grey = np.asarray(bottle_scene(SIZE).image.convert("L")).astype(np.float32)
    for image in (Image.fromarray(grey / 255.0, "F"), Image.fromarray((grey * 257).astype(np.int32), "I")):  # 0..1, 16-bit
        source = Source(image)
        assert source.problem is None and np.asarray(source.image).mean() == pytest.approx(grey.mean(), abs=1)
        assert process(source, PRESETS["jd_main"]).status == "ok"
    as_bytes = Source(Image.fromarray(grey, "F"))  # already 0..255: kept as it is
    assert np.asarray(as_bytes.image).mean() == pytest.approx(grey.mean(), abs=1)


def test_big_pictures_are_reduced_to_the_working_size_first() -> None:
    big = Image.fromarray(np.asarray(bottle_scene((600, 1000)).image.resize((5000, 3000))))
    source = Source(big, max_side=2048)
    assert source.image.size == (2048, 1229)
    assert process(source, PRESETS["amazon_main"]).status == "ok"


"""Post-processing: put a product on pure white, fit it to a preset, encode it, and check the result.

Pure functions of their inputs (no torch, no file I/O):

* `cut_out_white` turns a plain light backdrop into RGB (255, 255, 255) with the classical border
  flood fill (reference colour from the border ring, tolerance on the largest channel difference,
  enclosed backdrop holes, soft contact shadows removed or kept, opening, largest component, 1-px
  inward feather). A shadow must lie under the product and be smaller than it: a light-grey product
  is never flooded away as one. Without a plain light backdrop, without a product, or on a picture
  too small to have a border ring, it returns the image unchanged with a `problem`; a product
  touching the frame is cut out but flagged.
  `cut_out_alpha` does the same from a learned backend's alpha matte (see `matting.py`).
* `frame` fits a picture to a `Preset` (pad on white around the product, crop around the subject,
  or resize by the long side); `encode` writes sRGB bytes with an embedded sRGB ICC profile and no
  EXIF, lowering the quality step by step only as far as the preset's file-size cap needs.
* `process` runs both for one `Source` picture and one preset and applies the quality gates; each
  failed gate is a reason code (see `REASONS`). The run and `zimage-batch postprocess` share it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

import numpy as np
from PIL import Image, ImageChops, ImageCms, ImageOps
from scipy import ndimage

from .presets import PRESETS, Preset, UnknownPresetError, format_bytes, get_preset  # noqa: F401  (PRESETS, get_preset,
# UnknownPresetError are re-exported for callers of the stage; presets live in presets.py)

Problem = Literal["too_small", "backdrop_not_uniform", "no_product", "product_touches_edge"]

REASONS = {
    "black": "the image is black",
    "blank": "the image is blank (one flat colour)",
    "non_finite": "the image has NaN or infinite pixel values",
    "too_small": "the picture is {width}x{height} px, too small to find a product in (both sides must be more "
                 "than 8 px)",
    "backdrop_not_uniform": "the backdrop is not a plain light colour, so the product cannot be cut out onto white "
                            "(use a seamless light backdrop, a learned --matting backend, or a preset that keeps the background)",
    "no_product": "no product was found on the backdrop",
    "product_touches_edge": "the product touches the edge of the picture, so it is cropped",
    "product_cropped": "the product does not fit the preset's frame and would be cut off",
    "low_resolution": "the picture is {width}x{height} px; preset {preset} would enlarge it {upscale:.1f}x, more than "
                      "its max_upscale of {max_upscale:g}x (use a larger picture, or a preset with a higher max_upscale)",
    "fill_out_of_bounds": "the product fills {fill:.0%} of the frame; the preset needs {low:.0%}-{high:.0%}",
    "fill_unmeasured": "the preset needs the product to fill {low:.0%}-{high:.0%} of the frame, but no product could "
                       "be found to measure it (no plain light backdrop: use a learned --matting backend, or a preset "
                       "without fill_min/fill_max)",
    "border_not_white": "the border is not pure white after processing (only {border:.2%} of it is RGB 255): the "
                        "product or a kept shadow reaches the frame's edge, or the picture cuts its shadow off (lower "
                        "the preset's fill, or set shadow = \"remove\")",
    "over_size_cap": "the file is {size} even at quality {quality}; the preset allows {cap}",
    "unreadable_image": "the file could not be decoded (truncated or corrupt)",
    "processing_failed": "processing failed with {error} (a bug in zimage-batch: please report it with this image)",
}

_WHITE = 255
_RING = 4  # width (px) of the border ring that defines the backdrop colour
_RING_MIN_MATCH = 0.8  # share of ring pixels within tolerance of the reference for a plain backdrop
_BACKDROP_MIN_LUMA = 170  # a darker reference is not a light backdrop
_BACKDROP_MAX_CHROMA = 40  # a more saturated reference (max - min channel) is not a plain backdrop
_SHADOW_MAX_DARKENING = 60  # a contact shadow is at most this much darker (luma) than the backdrop
_SHADOW_EXTRA_CHROMA = 10  # ... and at most this much more saturated than the backdrop
_SHADOW_MAX_STEP = 10  # ... and soft: luma changes at most this much between neighbours (a grey product has an edge)
_MIN_HOLE_FRACTION = 1 / 20_000  # enclosed backdrop smaller than this share of the image stays product
_MIN_PART_FRACTION = 0.05  # product parts smaller than this share of the largest part are dropped
_MIN_PRODUCT_FRACTION = 0.001  # less product than this share of the image means "no_product"
_ALPHA_SNAP = 1 / 32  # a learned matte below this is backdrop, above 1 - this is product
_FILL_SLACK = 0.005  # rounding to whole pixels may move the measured fill by this much
_SCALE_SLACK = 0.001  # rounding a frame side to whole pixels may enlarge by this much more
_CROP_SLACK = 0.5  # px: a subject box this close to the crop window still fits
_JPEG_BLOCK = 8  # px: how far JPEG's 8x8 blocks may carry an edge's ringing
_LANCZOS_SUPPORT = 3  # source pixels on each side that a Lanczos-3 output pixel reads (when enlarging)
_COVER_FIT = 0.9  # a product too big for a crop on white is fitted at this share of the frame instead
_QUALITY_STEP = 5
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SRGB = ImageCms.createProfile("sRGB")


def _reproducible_icc(raw: bytes) -> bytes:
    """The profile with a fixed creation date (lcms stamps the current time, which made every
    process's outputs differ) and its MD5 profile ID recomputed to match (ICC.1, 7.2.18)."""
    data = bytearray(raw)
    data[24:36] = b"".join(v.to_bytes(2, "big") for v in (2026, 1, 1, 0, 0, 0))
    if any(data[84:100]):
        blanked = bytearray(data)
        blanked[44:48], blanked[64:68], blanked[84:100] = bytes(4), bytes(4), bytes(16)
        data[84:100] = hashlib.md5(blanked).digest()
    return bytes(data)


SRGB_ICC = _reproducible_icc(ImageCms.ImageCmsProfile(_SRGB).tobytes())  # embedded in every output
_ICC_SPACES = {"RGB": "RGB", "CMYK": "CMYK", "L": "GRAY"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

Box = tuple[float, float, float, float]  # (left, upper, right, lower), right/lower exclusive


@dataclass(frozen=True, eq=False)
class CutOut:
    """Result of a cut-out: the image on white, the product mask (True = product) and any problem."""

    image: Image.Image
    mask: np.ndarray
    problem: Problem | None

    def bbox(self) -> tuple[int, int, int, int] | None:
        """Product box as (left, upper, right, lower), right/lower exclusive; None without product."""
        return _mask_box(self.mask)


class Matting(Protocol):
    """A matting backend: finds the product in an sRGB picture and puts it on pure white."""

    name: str

    def cut(self, image: Image.Image, *, keep_shadow: bool = False) -> CutOut:
        """The picture on white, the product mask and any problem (see `Problem`)."""
        ...


@dataclass(frozen=True)
class ClassicalMatting:
    """The default backend: `cut_out_white` (offline, deterministic, needs a plain light backdrop)."""

    tolerance: int = 18
    name: str = "classical"

    def cut(self, image: Image.Image, *, keep_shadow: bool = False) -> CutOut:
        return cut_out_white(image, tolerance=self.tolerance, keep_shadow=keep_shadow)


CLASSICAL = ClassicalMatting()


@dataclass(frozen=True)
class Rendered:
    """Encoded output of one preset."""

    preset: str
    data: bytes
    width: int
    height: int
    format: str
    extension: str
    quality: int | None = None  # the quality used (lossy formats): below the preset's only to meet its size cap


@dataclass(frozen=True, eq=False)
class Framed:
    """A picture fitted to a preset's frame, with the product box in frame coordinates when known."""

    image: Image.Image
    box: Box | None
    cropped: bool = False
    scale: float = 1.0  # how much the picture was enlarged (> 1) or reduced to make the frame

    @property
    def fill(self) -> float | None:
        """The product's longer extent as a share of the frame (the marketplaces' "fill"), or None."""
        if self.box is None:
            return None
        left, upper, right, lower = self.box
        return max((right - left) / self.image.width, (lower - upper) / self.image.height)


@dataclass(frozen=True, eq=False)
class Processed:
    """One picture processed for one preset: the encoded file (None when nothing could be framed),
    every failed quality gate as a reason code, and the measurements behind them."""

    preset: Preset
    reasons: tuple[str, ...]
    rendered: Rendered | None
    fill_ratio: float | None = None
    border_white_fraction: float | None = None
    source_size: tuple[int, int] | None = None  # the picture's (width, height) as processed
    upscale: float | None = None  # how much the picture was enlarged for the frame
    error: str | None = None  # what went wrong, for "processing_failed"

    @property
    def status(self) -> Literal["ok", "rejected"]:
        return "rejected" if self.reasons else "ok"

    def explain(self) -> list[str]:
        """One sentence per reason, with the measured values."""
        low, high = self.preset.fill_bounds() or (0.0, 1.0)
        width, height = self.source_size or ("?", "?")
        values = {"fill": self.fill_ratio or 0.0, "low": low, "high": high, "border": self.border_white_fraction or 0.0,
                  "size": format_bytes(len(self.rendered.data)) if self.rendered else "?",
                  "quality": self.rendered.quality if self.rendered else None, "cap": format_bytes(self.preset.max_bytes),
                  "width": width, "height": height, "preset": self.preset.name, "upscale": self.upscale or 0.0,
                  "max_upscale": self.preset.max_upscale, "error": self.error}
        return [f"{code}: {REASONS.get(code, code).format(**values)}" for code in self.reasons]


def image_problem(pixels: np.ndarray) -> str | None:
    """Why pixels must not be delivered ("non_finite", "black", "blank"), or None.

    Floats are taken in [0, 1] (a generator's output), integers in 0..255.
    """
    scale = 1.0 if pixels.dtype.kind == "f" else 255.0
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        return "non_finite"
    if float(pixels.max()) < 0.03 * scale:
        return "black"
    if _spread_below(pixels, 0.004 * scale):
        return "blank"
    return None


def _spread_below(pixels: np.ndarray, limit: float) -> bool:
    """Whether the pixels' standard deviation is below ``limit``, mostly without a full pass.

    Every 16th value bounds the variance from below: the N values' squared deviations from their
    mean add up to at least those of the n sampled ones from theirs (a sample's own mean fits it
    best), so N * var >= n * var_sample. Any real picture clears the bound by far, in a tenth of
    the time of the full standard deviation (this runs in the GPU's thread between batches); a
    near-blank one gets the full pass, so the answer is exactly the full pass's."""
    flat = pixels.reshape(-1)
    sample = flat[::16]
    if sample.var(dtype=np.float64) * sample.size / flat.size >= limit**2 * 1.01:  # 1%: past float rounding
        return False
    return float(pixels.std(dtype=np.float32)) < limit


class Source:
    """One picture to deliver: converted to sRGB and checked once; its cut-outs are made on first use
    and shared by every preset (at most one per shadow option)."""

    def __init__(self, image: Image.Image | np.ndarray, matting: Matting = CLASSICAL, *, max_side: int | None = None):
        if isinstance(image, np.ndarray):  # a generator's HxWx3 output: floats in [0, 1] or uint8
            self.problem = image_problem(image)
            if image.dtype.kind == "f":
                image = (np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0) * 255.0).round().clip(0, 255)
            self.image = Image.fromarray(image.astype(np.uint8), "RGB")
        else:
            finite = image.mode != "F" or bool(np.isfinite(np.asarray(image)).all())
            if not finite:
                image = Image.fromarray(np.nan_to_num(np.asarray(image)), "F")
            self.image = _to_srgb(ImageOps.exif_transpose(image))  # a camera's orientation tag, applied
            self.problem = None if finite else "non_finite"
        if max_side is not None and max(self.image.size) > max_side:
            self.image = _resize_long_side(self.image, max_side)
        if self.problem is None:
            self.problem = image_problem(np.asarray(self.image))
        self.matting = matting
        self._cuts: dict[bool, CutOut] = {}

    def cut(self, *, keep_shadow: bool = False) -> CutOut:
        """The picture on white (made once per shadow option)."""
        if keep_shadow not in self._cuts:
            self._cuts[keep_shadow] = self.matting.cut(self.image, keep_shadow=keep_shadow)
        return self._cuts[keep_shadow]

    def subject(self) -> np.ndarray | None:
        """Where the product is, when the backend can tell (e.g. on a plain backdrop); None otherwise."""
        cut = self._cuts.get(True) or self.cut()
        return cut.mask if cut.problem in (None, "product_touches_edge") else None


def process(source: Source, preset: Preset, *, white: bool = False, reserve: int = 0) -> Processed:
    """Frame, encode and check `source` for `preset`; `white` cuts out onto white whatever the preset says.
    `reserve`: bytes the caller adds to the file afterwards (embedded provenance, a signature), kept
    free under the preset's size cap."""
    size = source.image.size
    if source.problem is not None:
        return Processed(preset, (source.problem,), None, source_size=size)
    white = white or preset.white
    reasons: list[str] = []
    picture, mask = source.image, None
    if white:
        cut = source.cut(keep_shadow=preset.shadow == "keep")
        if cut.problem in ("too_small", "backdrop_not_uniform", "no_product"):
            return Processed(preset, (cut.problem,), None, source_size=size)
        if cut.problem is not None:
            reasons.append(cut.problem)
        picture, mask = cut.image, cut.mask
    elif preset.fit != "long_side" or preset.fill_bounds():
        mask = source.subject()
    framed = frame(picture, preset, mask, white=white)
    if framed.scale > preset.max_upscale * (1 + _SCALE_SLACK):  # pad caps its scale; cover and long_side cannot
        reasons.append("low_resolution")
    if framed.cropped:
        reasons.append("product_cropped")
    bounds = preset.fill_bounds()
    if bounds and framed.fill is None:  # no product found to measure: the bound cannot be vouched for
        reasons.append("fill_unmeasured")
    elif bounds and framed.fill is not None and not bounds[0] - _FILL_SLACK <= framed.fill <= bounds[1] + _FILL_SLACK:
        reasons.append("fill_out_of_bounds")
    data, quality = encode(framed.image, preset, reserve)
    if preset.max_bytes is not None and len(data) + reserve > preset.max_bytes:
        reasons.append("over_size_cap")
    border = border_white_fraction(framed.image if preset.format == "PNG" else _decode(data))
    if white and border < 1.0:
        reasons.append("border_not_white")
    rendered = Rendered(preset.name, data, framed.image.width, framed.image.height, preset.format, preset.extension, quality)
    return Processed(preset, tuple(reasons), rendered, framed.fill, border, size, framed.scale)


def render(image: Image.Image, preset: Preset, mask: np.ndarray | None = None) -> Rendered:
    """Fit `image` to `preset` and encode it (no gates); the bytes carry an sRGB profile and no EXIF."""
    framed = frame(_to_srgb(image), preset, mask)
    data, quality = encode(framed.image, preset)
    return Rendered(preset.name, data, framed.image.width, framed.image.height, preset.format, preset.extension, quality)


def border_white_fraction(image: Image.Image) -> float:
    """Share of the pixels in the outer ring (0.5% of the short side, >= 2 px) that are exactly RGB 255."""
    width, height = image.size
    k = _border_ring(width, height)
    if k == 0:  # 1 px thin: every pixel is border
        return float((np.asarray(image.convert("RGB")).reshape(-1, 3) == _WHITE).all(axis=1).mean())
    strips = [(0, 0, width, k), (0, height - k, width, height), (0, k, k, height - k), (width - k, k, width, height - k)]
    ring = np.concatenate([np.asarray(image.crop(strip).convert("RGB")).reshape(-1, 3) for strip in strips])
    return float((ring == _WHITE).all(axis=1).mean())


def _border_ring(width: int, height: int) -> int:
    """How many pixels wide the border ring ``border_white_fraction`` reads is (a frame 3 px thin: 1)."""
    return min(max(2, round(min(width, height) / 200)), min(width, height) // 2)


def cut_out_white(image: Image.Image, *, tolerance: int = 18, keep_shadow: bool = False) -> CutOut:
    """Set a plain light backdrop to pure white; return the image unchanged with a problem if unsafe."""
    if not 0 <= tolerance <= 255:
        raise ValueError(f"tolerance must be in 0..255 (largest channel difference), got {tolerance}")
    rgb = _to_srgb(image)
    # Channel planes (3, H, W): per-pixel reductions over channels are ~20x faster than over the last axis.
    planes = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1)).astype(np.int16)
    height, width = planes.shape[1:]
    if min(height, width) <= 2 * _RING:  # no border ring to read the backdrop from
        return CutOut(rgb, np.zeros((height, width), dtype=bool), "too_small")
    reference = _backdrop_reference(planes, tolerance)
    if reference is None:
        return CutOut(rgb, np.ones((height, width), dtype=bool), "backdrop_not_uniform")

    near = np.abs(planes - reference[:, None, None]).max(axis=0) <= tolerance
    darkening = _luma(reference) - _luma(planes)
    shadow = _shadow_band(planes, reference, darkening)
    outside = _connected_to_border(near | shadow)
    mask = _main_product(~(outside | _large_holes(near & ~outside)))
    # A light-grey product with a soft edge looks like a shadow pixel by pixel, and the flood runs over
    # it. What the shadow band took is checked part by part: only parts that can be a contact shadow of
    # what is left stay backdrop; the flood runs again without the others, which are product.
    flooded = outside & ~near
    if flooded.any():
        shadows = _contact_shadows(flooded, mask)
        if not np.array_equal(shadows, flooded):  # most shots: a real shadow or none, nothing to redo
            outside = _connected_to_border(near | shadows)
            mask = _main_product(~(outside | _large_holes(near & ~outside)))
    if mask.sum() < _MIN_PRODUCT_FRACTION * height * width:
        return CutOut(rgb, np.zeros((height, width), dtype=bool), "no_product")

    backdrop = np.full((height, width), float(_WHITE), dtype=np.float32)
    if keep_shadow:
        kept = outside & shadow & ~near & ~mask
        # Lighten by the tolerance so the shadow fades continuously into the pure white around it.
        backdrop[kept] -= np.clip(darkening[kept] - tolerance, 0, None)
    problem: Problem | None = "product_touches_edge" if _touches_border(mask) else None
    return CutOut(_blend(planes, _feather(mask), backdrop), mask, problem)


def cut_out_alpha(image: Image.Image, alpha: np.ndarray) -> CutOut:
    """Put `image` on pure white with a learned backend's alpha matte (H x W, 0..1, 1 = product)."""
    rgb = _to_srgb(image)
    if alpha.shape != (rgb.height, rgb.width):
        raise ValueError(f"alpha has shape {alpha.shape}, expected {(rgb.height, rgb.width)} (height, width of the image)")
    planes = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1)).astype(np.int16)
    mask = _main_product(alpha >= 0.5)
    if mask.sum() < _MIN_PRODUCT_FRACTION * mask.size:
        return CutOut(rgb, np.zeros_like(mask), "no_product")
    # Keep soft edges only around the kept parts; snap near-0/1 so the backdrop is exactly white.
    near_product = ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED, iterations=2)
    soft = np.where(near_product, np.clip(alpha, 0.0, 1.0), 0.0).astype(np.float32)
    soft[soft < _ALPHA_SNAP] = 0.0
    soft[soft > 1 - _ALPHA_SNAP] = 1.0
    backdrop = np.full(mask.shape, float(_WHITE), dtype=np.float32)
    problem: Problem | None = "product_touches_edge" if _touches_border(mask) else None
    return CutOut(_blend(planes, soft, backdrop), mask, problem)


def _luma(planes: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB values given channel-first (3, ...).

    A plain weighted sum, not a dot product: BLAS would start its thread pool, whose spinning threads
    cost more CPU than the whole cut-out (measured: 38 ms became 65 ms wall on 2 cores).
    """
    weights = _LUMA_WEIGHTS.reshape((3,) + (1,) * (planes.ndim - 1))
    return (weights * planes.astype(np.float32)).sum(axis=0, dtype=np.float32)


def _backdrop_reference(planes: np.ndarray, tolerance: int) -> np.ndarray | None:
    """Median colour of the border ring, or None when the ring is not a plain light backdrop."""
    ring = np.concatenate(
        [
            planes[:, :_RING].reshape(3, -1),
            planes[:, -_RING:].reshape(3, -1),
            planes[:, _RING:-_RING, :_RING].reshape(3, -1),
            planes[:, _RING:-_RING, -_RING:].reshape(3, -1),
        ],
        axis=1,
    )
    reference = np.round(np.median(ring, axis=1)).astype(np.int16)
    matching = float(np.mean(np.abs(ring - reference[:, None]).max(axis=0) <= tolerance))
    chroma = int(reference.max() - reference.min())
    if matching < _RING_MIN_MATCH or _luma(reference) < _BACKDROP_MIN_LUMA or chroma > _BACKDROP_MAX_CHROMA:
        return None
    return reference


def _shadow_band(planes: np.ndarray, reference: np.ndarray, darkening: np.ndarray) -> np.ndarray:
    """Pixels that could be a soft contact shadow: neutral like the backdrop and a little darker."""
    chroma = planes.max(axis=0) - planes.min(axis=0)
    neutral = chroma <= int(reference.max() - reference.min()) + _SHADOW_EXTRA_CHROMA
    soft = _largest_step(darkening) <= _SHADOW_MAX_STEP
    return neutral & soft & (darkening >= 0) & (darkening <= _SHADOW_MAX_DARKENING)


def _contact_shadows(flooded: np.ndarray, product: np.ndarray) -> np.ndarray:
    """The parts of `flooded` that can be a contact shadow of `product`: each starts at or below the
    product's vertical centre (a shadow lies on the floor under it) and is no larger than the product.
    A soft grey part of the product (a body under a dark cap, a flat base under a lamp) looks the
    same pixel by pixel, and erasing it is the worse mistake: so a shadow larger than the product
    stays with it (delivered as part of the product; a learned --matting backend tells them apart).
    Without a product nothing is a shadow: a shadow alone is a grey product."""
    box = _mask_box(product)
    if box is None:
        return np.zeros_like(flooded)
    labels, count = ndimage.label(flooded, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = np.zeros(count + 1, dtype=bool)
    centre, area = (box[1] + box[3]) / 2, int(product.sum())
    for index, where in enumerate(ndimage.find_objects(labels), start=1):
        keep[index] = where is not None and where[0].start >= centre and sizes[index] <= area
    return keep[labels]


def _largest_step(values: np.ndarray) -> np.ndarray:
    """Largest absolute difference between each pixel and its four neighbours."""
    step = np.zeros_like(values)
    across, down = np.abs(np.diff(values, axis=1)), np.abs(np.diff(values, axis=0))
    for part, diff in ((step[:, 1:], across), (step[:, :-1], across), (step[1:], down), (step[:-1], down)):
        np.maximum(part, diff, out=part)
    return step


def _connected_to_border(candidate: np.ndarray) -> np.ndarray:
    """The 4-connected components of `candidate` that reach the frame border."""
    labels, _ = ndimage.label(candidate)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    keep = np.zeros(labels.max() + 1, dtype=bool)
    keep[border] = True
    keep[0] = False
    return keep[labels]


def _large_holes(candidate: np.ndarray) -> np.ndarray:
    """Enclosed backdrop-coloured components big enough to be backdrop seen through the product."""
    labels, count = ndimage.label(candidate)
    if count == 0:
        return candidate
    keep = np.bincount(labels.ravel()) >= max(4.0, _MIN_HOLE_FRACTION * candidate.size)
    keep[0] = False
    return keep[labels]


def _main_product(candidate: np.ndarray) -> np.ndarray:
    """Open the product mask and keep the largest part plus parts of comparable size."""
    opened = ndimage.binary_opening(candidate, structure=_EIGHT_CONNECTED)
    labels, count = ndimage.label(opened, structure=_EIGHT_CONNECTED)
    if count == 0:
        return opened
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= _MIN_PART_FRACTION * sizes.max()
    keep[0] = False
    return keep[labels]


def _touches_border(mask: np.ndarray) -> bool:
    """Whether any mask pixel lies on the outermost row or column."""
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _feather(mask: np.ndarray) -> np.ndarray:
    """Alpha with an inward 1-px feather: edge pixels blend towards the backdrop, none outside the mask."""
    neighbours = ndimage.correlate(mask.view(np.uint8), _EIGHT_CONNECTED.view(np.uint8))  # 3x3 count, 0..9
    return np.where(mask, neighbours.astype(np.float32) / 9, np.float32(0))


def _blend(planes: np.ndarray, alpha: np.ndarray, backdrop: np.ndarray) -> Image.Image:
    """The product (channel planes) over the backdrop layer with `alpha` (0..1)."""
    blended = np.clip(np.rint(backdrop + alpha * (planes - backdrop)), 0, _WHITE).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(channel) for channel in blended])


def _to_srgb(image: Image.Image) -> Image.Image:
    """An RGB copy in sRGB, transparency flattened on white, all metadata dropped.

    Pixels with an embedded profile (sRGB, Display P3, Adobe RGB, CMYK, grey) are converted through
    it; an unreadable profile is ignored (the pixels are taken as sRGB, as browsers do).
    """
    icc = image.info.get("icc_profile")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        peak = float(values.max()) if values.size else 0.0
        # Float pictures are mostly 0..1 (as `image_problem` reads them) and 32-bit integer ones often
        # hold 16-bit samples: read as 0..255 they came out black or white.
        if image.mode == "F" and peak <= 1.0:
            values = values * 255.0
        elif image.mode == "I" and peak > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        flat = Image.new("RGBA", image.size, (_WHITE, _WHITE, _WHITE, 255))
        flat.alpha_composite(image.convert("RGBA"))
        image = flat.convert("RGB")
    transform = _to_srgb_transform(icc, image.mode) if icc and image.mode in _ICC_SPACES else None
    rgb = ImageCms.applyTransform(image, transform) if transform is not None else image.convert("RGB")
    rgb.info = {}
    return rgb


@lru_cache(maxsize=16)
def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A colour transform from an embedded profile to sRGB (cached: a batch shares a few profiles)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if source.profile.xcolor_space.strip() != _ICC_SPACES[mode]:
            return None
        return ImageCms.buildTransform(source, _SRGB, mode, "RGB")
    except (OSError, ImageCms.PyCMSError):
        return None


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of True pixels as (left, upper, right, lower), right/lower exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _product_box(image: Image.Image, mask: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """The product's box from `mask`; None when no mask is given."""
    if mask is None:
        return None
    if mask.ndim != 2 or mask.shape != (image.height, image.width):
        raise ValueError(
            f"mask has shape {mask.shape}, expected {(image.height, image.width)} (height, width of the image); "
            "pass the mask that cut_out_white returned for this image"
        )
    box = _mask_box(mask.astype(bool, copy=False))
    if box is None:
        raise ValueError("mask has no product pixels; check CutOut.problem before rendering, or pass mask=None")
    return box


def frame(image: Image.Image, preset: Preset, mask: np.ndarray | None = None, *, white: bool = False) -> Framed:
    """Fit `image` to the preset's frame; `mask` (True = product) places and measures the product.

    With `white` (the picture is on pure white) a crop that would cut the product fits it instead,
    padding with white: on a white backdrop the wider frame cannot be seen.
    """
    box = _product_box(image, mask)
    if preset.fit == "pad":
        return _pad_to_frame(image, preset, box, white=white)
    if preset.fit == "cover":
        framed = _cover_frame(image, preset, box)
        if framed.cropped and white:
            return _pad_to_frame(image, preset.model_copy(update={"fill": _COVER_FIT}), box, white=True)
        return framed
    resized = _resize_long_side(image, preset.long_side)
    scale = max(resized.size) / max(image.size)
    return Framed(resized, _scaled(box, resized.width / image.width, (0.0, 0.0), resized.size), scale=scale)


def _scaled(box: tuple[int, int, int, int] | None, scale: float, origin: tuple[float, float],
            size: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)) -> Box | None:
    """`box` mapped by (p - origin) * scale + offset and clipped to a frame of `size`."""
    if box is None:
        return None
    left, upper, right, lower = box
    xs = [min(max((x - origin[0]) * scale + offset[0], 0.0), size[0]) for x in (left, right)]
    ys = [min(max((y - origin[1]) * scale + offset[1], 0.0), size[1]) for y in (upper, lower)]
    return xs[0], ys[0], xs[1], ys[1]


def _pad_to_frame(image: Image.Image, preset: Preset, box: tuple[int, int, int, int] | None, *,
                  white: bool = False) -> Framed:
    """Scale so the product box fills `preset.fill` of the frame (enlarging at most `max_upscale`x),
    centre it, and pad with white. Without a box the whole image is the product. With `white` (the
    picture is on pure white) whatever else is not white, a kept shadow, must fit inside the frame's
    white border too: the product is made smaller when it would not (the fill check then says so)."""
    assert preset.width and preset.height and preset.fill  # guaranteed by Preset validation
    frame_w, frame_h = preset.width, preset.height
    left, upper, right, lower = box or (0, 0, image.width, image.height)
    scale = min(preset.fill * min(frame_w / (right - left), frame_h / (lower - upper)), preset.max_upscale)
    centre_x, centre_y = (left + right) / 2, (upper + lower) / 2
    canvas = Image.new("RGB", (frame_w, frame_h), (_WHITE, _WHITE, _WHITE))
    # Resample only what is not pure white (the product and a kept shadow; all of a scene): the frame
    # is white already, and a resampled white area stays exactly white. Map the whole visible content,
    # not just the product box, so a kept shadow is not clipped.
    content = ImageChops.invert(image).getbbox()
    inside = content is not None and 0 < content[0] and 0 < content[1] and content[2] < image.width and content[3] < image.height
    if white and box is not None and inside:  # (a shadow the picture itself cuts off would show its cut: left to the border check)
        # frame pixels the content keeps clear: the ring the check reads, what resampling and a JPEG block smear
        room = _border_ring(frame_w, frame_h) + _LANCZOS_SUPPORT + _JPEG_BLOCK
        reach_x = max(centre_x - content[0], content[2] - centre_x)
        reach_y = max(centre_y - content[1], content[3] - centre_y)
        scale = min(scale, (frame_w / 2 - room) / max(reach_x, 1), (frame_h / 2 - room) / max(reach_y, 1))
    if content is not None:
        margin = _LANCZOS_SUPPORT / min(scale, 1.0) + 1  # source pixels that reach into the content
        x0, x1 = (min(max(round(frame_w / 2 + (x - centre_x) * scale), 0), frame_w)
                  for x in (max(content[0] - margin, 0), min(content[2] + margin, image.width)))
        y0, y1 = (min(max(round(frame_h / 2 + (y - centre_y) * scale), 0), frame_h)
                  for y in (max(content[1] - margin, 0), min(content[3] + margin, image.height)))
        if x1 > x0 and y1 > y0:
            src = (max(centre_x + (x0 - frame_w / 2) / scale, 0.0), max(centre_y + (y0 - frame_h / 2) / scale, 0.0),
                   min(centre_x + (x1 - frame_w / 2) / scale, image.width), min(centre_y + (y1 - frame_h / 2) / scale, image.height))
            canvas.paste(image.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS, box=src, reducing_gap=2.0), (x0, y0))
    return Framed(canvas, _scaled(box, scale, (centre_x, centre_y), canvas.size, (frame_w / 2, frame_h / 2)), scale=scale)


def _cover_frame(image: Image.Image, preset: Preset, box: tuple[int, int, int, int] | None) -> Framed:
    """Resize to cover the frame and crop a window centred on the subject (kept inside the image)."""
    assert preset.width and preset.height  # guaranteed by Preset validation
    frame_w, frame_h = preset.width, preset.height
    scale = max(frame_w / image.width, frame_h / image.height)
    window_w, window_h = frame_w / scale, frame_h / scale
    left, upper, right, lower = box or (0, 0, image.width, image.height)
    x = min(max((left + right) / 2 - window_w / 2, 0.0), image.width - window_w)
    y = min(max((upper + lower) / 2 - window_h / 2, 0.0), image.height - window_h)
    window = (x, y, x + window_w, y + window_h)
    resized = image.resize((frame_w, frame_h), Image.Resampling.LANCZOS, box=window, reducing_gap=2.0)
    cropped = box is not None and (left < x - _CROP_SLACK or upper < y - _CROP_SLACK
                                   or right > window[2] + _CROP_SLACK or lower > window[3] + _CROP_SLACK)
    return Framed(resized, _scaled(box, scale, (x, y), resized.size), cropped, scale)


def _resize_long_side(image: Image.Image, long_side: int | None) -> Image.Image:
    """Resize keeping the aspect ratio so the long side is `long_side` (None keeps the size)."""
    if long_side is None or max(image.size) == long_side:
        return image
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def encode(image: Image.Image, preset: Preset, reserve: int = 0) -> tuple[bytes, int | None]:
    """Encode for the preset; over its size cap (less `reserve` bytes, for metadata added later),
    lower the quality in steps of 5 down to `min_quality`.

    Returns the bytes and the quality used (None for PNG). The caller checks the cap: the last try
    is returned even when it is still too big.
    """
    if preset.format == "PNG":
        return _save(image, preset.format, None), None
    quality = preset.quality
    while True:
        data = _save(image, preset.format, quality)
        if preset.max_bytes is None or len(data) + reserve <= preset.max_bytes or quality <= preset.min_quality:
            return data, quality
        quality = max(preset.min_quality, quality - _QUALITY_STEP)


def _save(image: Image.Image, fmt: str, quality: int | None) -> bytes:
    """Pixels plus the sRGB profile, nothing else (no EXIF, XMP or text chunks)."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        subsampling = "4:4:4" if quality is not None and quality >= 90 else "4:2:0"
        try:
            image.save(buffer, "JPEG", quality=quality, optimize=True, subsampling=subsampling, icc_profile=SRGB_ICC)
        except OSError:
            # Pillow gives the optimising encoder a buffer of one byte per pixel below quality 95, and a
            # noisy picture needs more ("broken data stream"); without optimize the encoder streams.
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality, subsampling=subsampling, icc_profile=SRGB_ICC)
    elif fmt == "WEBP":
        image.save(buffer, "WEBP", quality=quality, method=4, icc_profile=SRGB_ICC)
    elif fmt == "AVIF":
        image.save(buffer, "AVIF", quality=quality, icc_profile=SRGB_ICC)
    else:
        # zlib level 3: measured 4x faster than 6 on a 1024x1024 shot (112 vs 485 ms) for 13% more bytes
        image.save(buffer, "PNG", compress_level=3, icc_profile=SRGB_ICC)
    return buffer.getvalue()

"""Post-processing: put a generated product on pure white and encode it for marketplace presets.

Two steps, both pure functions of their inputs (no torch, no I/O):

* `cut_out_white` turns a plain light backdrop into RGB (255, 255, 255) with the classical border
  flood fill (reference colour from the border ring, tolerance on the largest channel difference,
  enclosed backdrop holes, soft contact shadows, opening, largest component, 1-px feather). It never
  guesses on unsafe input: without a plain light backdrop or without a product it returns the image
  unchanged with a `problem`; a product touching the frame is cut out but flagged.
* `render` fits an image to a `Preset` (pad on white around the product, or resize by the long side)
  and returns encoded bytes without EXIF or other metadata.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageCms
from pydantic import BaseModel, model_validator
from scipy import ndimage

Problem = Literal["backdrop_not_uniform", "no_product", "product_touches_edge"]

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
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_EXTENSIONS = {"JPEG": ("jpg", "jpeg"), "WEBP": ("webp",), "PNG": ("png",)}


class UnknownPresetError(ValueError):
    """A preset name that is not in PRESETS."""


class Preset(BaseModel, frozen=True):
    """One output format: frame geometry, product fill and encoding."""

    name: str
    width: int | None
    height: int | None
    long_side: int | None = None
    fit: Literal["pad", "long_side"]
    fill: float | None = None
    format: Literal["JPEG", "WEBP", "PNG"]
    quality: int = 90
    extension: str
    description: str

    @model_validator(mode="after")
    def _check_consistent(self) -> Preset:
        """Reject combinations of fields that `render` could not honour."""
        where = f"preset {self.name!r}"
        if self.fit == "pad":
            if not (self.width and self.height and self.width > 0 and self.height > 0):
                raise ValueError(f"{where}: fit='pad' needs width and height > 0, got {self.width}x{self.height}")
            if self.fill is None or not 0 < self.fill <= 1:
                raise ValueError(f"{where}: fit='pad' needs 0 < fill <= 1 (e.g. 0.85), got {self.fill}")
        else:
            if self.width is not None or self.height is not None:
                raise ValueError(f"{where}: fit='long_side' sizes by long_side; set width and height to None")
            if self.long_side is not None and self.long_side <= 0:
                raise ValueError(f"{where}: long_side must be > 0 or None (keep size), got {self.long_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"{where}: quality must be in 1..100, got {self.quality}")
        if self.extension not in _EXTENSIONS[self.format]:
            wanted = _EXTENSIONS[self.format][0]
            raise ValueError(f"{where}: extension {self.extension!r} does not fit {self.format}; use {wanted!r}")
        return self


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(name="amazon_main", width=2000, height=2000, fit="pad", fill=0.85, format="JPEG", quality=90,
               extension="jpg", description="Amazon main image: 2000x2000 sRGB JPEG, product at 85% on pure white"),
        Preset(name="web", width=None, height=None, long_side=1024, fit="long_side", format="JPEG", quality=88,
               extension="jpg", description="Web JPEG, long side 1024 px"),
        Preset(name="web_webp", width=None, height=None, long_side=1024, fit="long_side", format="WEBP", quality=85,
               extension="webp", description="Web WebP, long side 1024 px"),
        Preset(name="png", width=None, height=None, long_side=None, fit="long_side", format="PNG",
               extension="png", description="Lossless PNG at the original size"),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called `name`, or raise UnknownPresetError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {known}") from None


@dataclass(frozen=True, eq=False)
class CutOut:
    """Result of `cut_out_white`: the image on white, the product mask (True = product) and any problem."""

    image: Image.Image
    mask: np.ndarray
    problem: Problem | None

    def bbox(self) -> tuple[int, int, int, int] | None:
        """Product box as (left, upper, right, lower), right/lower exclusive; None without product."""
        return _mask_box(self.mask)


@dataclass(frozen=True)
class Rendered:
    """Encoded output of one preset."""

    preset: str
    data: bytes
    width: int
    height: int
    format: str
    extension: str


def cut_out_white(image: Image.Image, *, tolerance: int = 18, keep_shadow: bool = False) -> CutOut:
    """Set a plain light backdrop to pure white; return the image unchanged with a problem if unsafe."""
    if not 0 <= tolerance <= 255:
        raise ValueError(f"tolerance must be in 0..255 (largest channel difference), got {tolerance}")
    rgb = _to_srgb(image)
    # Channel planes (3, H, W): per-pixel reductions over channels are ~20x faster than over the last axis.
    planes = np.ascontiguousarray(np.asarray(rgb).transpose(2, 0, 1)).astype(np.int16)
    height, width = planes.shape[1:]
    if min(height, width) <= 2 * _RING:
        raise ValueError(f"image is {width}x{height}; cut_out_white needs both sides > {2 * _RING} px")
    reference = _backdrop_reference(planes, tolerance)
    if reference is None:
        return CutOut(rgb, np.ones((height, width), dtype=bool), "backdrop_not_uniform")

    near = np.abs(planes - reference[:, None, None]).max(axis=0) <= tolerance
    darkening = _luma(reference) - _luma(planes)
    shadow = _shadow_band(planes, reference, darkening)
    outside = _connected_to_border(near | shadow)
    mask = _main_product(~(outside | _large_holes(near & ~outside)))
    if mask.sum() < _MIN_PRODUCT_FRACTION * height * width:
        return CutOut(rgb, np.zeros((height, width), dtype=bool), "no_product")

    backdrop = np.full((height, width), float(_WHITE), dtype=np.float32)
    if keep_shadow:
        kept = outside & shadow & ~near & ~mask
        # Lighten by the tolerance so the shadow fades continuously into the pure white around it.
        backdrop[kept] -= np.clip(darkening[kept] - tolerance, 0, None)
    problem: Problem | None = "product_touches_edge" if _touches_border(mask) else None
    return CutOut(_composite(planes, mask, backdrop), mask, problem)


def render(image: Image.Image, preset: Preset, mask: np.ndarray | None = None) -> Rendered:
    """Fit `image` to `preset` and encode it; the bytes carry no EXIF or other metadata."""
    rgb = _to_srgb(image)
    if preset.fit == "pad":
        framed = _pad_to_frame(rgb, preset, _product_box(rgb, mask))
    else:
        framed = _resize_long_side(rgb, preset.long_side)
    return Rendered(
        preset=preset.name,
        data=_encode(framed, preset),
        width=framed.width,
        height=framed.height,
        format=preset.format,
        extension=preset.extension,
    )


def _to_srgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy in sRGB with transparency flattened on white and all metadata dropped."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        flat = Image.new("RGBA", image.size, (_WHITE, _WHITE, _WHITE, 255))
        flat.alpha_composite(image.convert("RGBA"))
        rgb = flat.convert("RGB")
    else:
        rgb = image.convert("RGB")
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA"):
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if source.profile.xcolor_space.strip() == "RGB":
            rgb = ImageCms.profileToProfile(rgb, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    rgb.info = {}
    return rgb


def _luma(planes: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB values given channel-first (3, ...)."""
    return np.tensordot(_LUMA_WEIGHTS, planes.astype(np.float32), axes=1)


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


def _composite(planes: np.ndarray, mask: np.ndarray, backdrop: np.ndarray) -> Image.Image:
    """Put the product over the backdrop layer with an inward 1-px feathered edge (no halo outside)."""
    neighbours = ndimage.correlate(mask.view(np.uint8), _EIGHT_CONNECTED.view(np.uint8))  # 3x3 count, 0..9
    alpha = np.where(mask, neighbours.astype(np.float32) / 9, np.float32(0))
    blended = np.clip(np.rint(backdrop + alpha * (planes - backdrop)), 0, _WHITE).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(channel) for channel in blended])


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of True pixels as (left, upper, right, lower), right/lower exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _product_box(image: Image.Image, mask: np.ndarray | None) -> tuple[int, int, int, int]:
    """The product's box from `mask`, or the whole image when no mask is given."""
    if mask is None:
        return 0, 0, image.width, image.height
    if mask.ndim != 2 or mask.shape != (image.height, image.width):
        raise ValueError(
            f"mask has shape {mask.shape}, expected {(image.height, image.width)} (height, width of the image); "
            "pass the mask that cut_out_white returned for this image"
        )
    box = _mask_box(mask.astype(bool, copy=False))
    if box is None:
        raise ValueError("mask has no product pixels; check CutOut.problem before rendering, or pass mask=None")
    return box


def _pad_to_frame(image: Image.Image, preset: Preset, box: tuple[int, int, int, int]) -> Image.Image:
    """Scale so the product box fills `preset.fill` of the frame, centre it, and pad with white."""
    assert preset.width and preset.height and preset.fill  # guaranteed by Preset validation
    frame_w, frame_h = preset.width, preset.height
    left, upper, right, lower = box
    scale = preset.fill * min(frame_w / (right - left), frame_h / (lower - upper))
    centre_x, centre_y = (left + right) / 2, (upper + lower) / 2
    # Map the whole visible part of the image, not just the box, so a kept shadow is not clipped.
    src = (
        max(0.0, centre_x - frame_w / 2 / scale),
        max(0.0, centre_y - frame_h / 2 / scale),
        min(float(image.width), centre_x + frame_w / 2 / scale),
        min(float(image.height), centre_y + frame_h / 2 / scale),
    )
    x0, x1 = (round(frame_w / 2 + (x - centre_x) * scale) for x in (src[0], src[2]))
    y0, y1 = (round(frame_h / 2 + (y - centre_y) * scale) for y in (src[1], src[3]))
    canvas = Image.new("RGB", (frame_w, frame_h), (_WHITE, _WHITE, _WHITE))
    if x1 > x0 and y1 > y0:
        canvas.paste(image.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS, box=src, reducing_gap=2.0), (x0, y0))
    return canvas


def _resize_long_side(image: Image.Image, long_side: int | None) -> Image.Image:
    """Resize keeping the aspect ratio so the long side is `long_side` (None keeps the size)."""
    if long_side is None or max(image.size) == long_side:
        return image
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _encode(image: Image.Image, preset: Preset) -> bytes:
    """Encode with the preset's format and quality; nothing but pixels is written."""
    buffer = io.BytesIO()
    if preset.format == "JPEG":
        subsampling = "4:4:4" if preset.quality >= 90 else "4:2:0"
        image.save(buffer, "JPEG", quality=preset.quality, optimize=True, subsampling=subsampling)
    elif preset.format == "WEBP":
        image.save(buffer, "WEBP", quality=preset.quality, method=4)
    else:
        image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()

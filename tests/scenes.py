"""Synthetic product shots whose true masks are known, and helpers to measure results.

Shared by the post-processing tests and ``bench/postprocess.py``. Shapes are drawn from signed
distance functions with anti-aliased edges, over plain, graded or shadowed backdrops, with a
little sensor-like noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from zimage_batch.postprocess import Rendered

OFF_WHITE = (246.0, 245.0, 243.0)
BOTTLE_BLUE = (30.0, 90.0, 160.0)
MUG_RED = (180.0, 40.0, 40.0)


@dataclass
class Scene:
    """A synthetic shot: the image, the true product mask and optional named regions."""

    image: Image.Image
    truth: np.ndarray
    regions: dict[str, np.ndarray]


# --- scene builders -----------------------------------------------------------------------------


def grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) for an image of (height, width)."""
    ys, xs = np.mgrid[: size[0], : size[1]].astype(np.float32)
    return ys + 0.5, xs + 0.5


def coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a shape from its signed distance (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def rounded_rect(
    size: tuple[int, int], centre: tuple[float, float], half: tuple[float, float], radius: float
) -> np.ndarray:
    """Signed distance to a rounded rectangle; centre and half extents given as (y, x)."""
    ys, xs = grid(size)
    qy = np.abs(ys - centre[0]) - (half[0] - radius)
    qx = np.abs(xs - centre[1]) - (half[1] - radius)
    outside = np.hypot(np.maximum(qy, 0), np.maximum(qx, 0))
    return outside + np.minimum(np.maximum(qy, qx), 0) - radius


def ring(size: tuple[int, int], centre: tuple[float, float], radius: float, thickness: float) -> np.ndarray:
    """Signed distance to an annulus (a mug handle) of mid radius `radius`."""
    ys, xs = grid(size)
    return np.abs(np.hypot(ys - centre[0], xs - centre[1]) - radius) - thickness / 2


def plain_backdrop(
    size: tuple[int, int], top: tuple[float, ...] = OFF_WHITE, bottom: tuple[float, ...] | None = None
) -> np.ndarray:
    """A plain (or vertically graded) backdrop as float RGB."""
    bottom = top if bottom is None else bottom
    t = np.linspace(0.0, 1.0, size[0], dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.array(top) + t * np.array(bottom), (*size, 3)).astype(np.float32)


def shaded(size: tuple[int, int], colour: tuple[float, ...]) -> np.ndarray:
    """Product colour with a left-to-right shading, like a lit cylinder."""
    _, xs = grid(size)
    shade = 0.8 + 0.4 * xs / size[1]
    return np.clip(np.array(colour) * shade[..., None], 0, 255).astype(np.float32)


def compose(
    pixels: np.ndarray, coverage: np.ndarray, colour: np.ndarray, noise: float = 1.5, seed: int = 0
) -> tuple[Image.Image, np.ndarray]:
    """Composite a product (coverage, colour) over `pixels`, add sensor-like noise, return image and truth."""
    a = coverage[..., None]
    out = pixels * (1 - a) + colour * a
    out = out + np.random.default_rng(seed).normal(0.0, noise, out.shape)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)), coverage >= 0.5


def product_scene(size: tuple[int, int], sdf: np.ndarray, colour: tuple[float, ...] = BOTTLE_BLUE,
                  pixels: np.ndarray | None = None, texture: float = 0.0, seed: int = 0) -> Scene:
    """A product of signed distance `sdf` on `pixels` (plain off-white by default); `texture` adds
    per-pixel colour noise of that strength to the product (hard to compress)."""
    paint = shaded(size, colour)
    if texture:
        paint = np.clip(paint + np.random.default_rng(seed + 1).normal(0.0, texture, paint.shape), 0, 255)
    image, truth = compose(plain_backdrop(size) if pixels is None else pixels, coverage(sdf), paint, seed=seed)
    return Scene(image, truth, {})


def bottle_scene(
    size: tuple[int, int] = (512, 512), backdrop: np.ndarray | None = None, colour: tuple[float, ...] = BOTTLE_BLUE,
    *, centre: tuple[float, float] = (0.5, 0.5), half: tuple[float, float] = (0.35, 0.15), texture: float = 0.0,
) -> Scene:
    """A bottle (rounded rectangle, blue by default) on an off-white backdrop; `centre` and `half`
    extents are shares of the (height, width)."""
    h, w = size
    sdf = rounded_rect(size, (h * centre[0], w * centre[1]), (h * half[0], w * half[1]), radius=w * min(0.05, half[1] / 3))
    return product_scene(size, sdf, colour, backdrop, texture)


def mug_scene(size: tuple[int, int] = (512, 512)) -> Scene:
    """A red mug whose handle (a ring) shows the backdrop through its hole."""
    h, w = size
    body = rounded_rect(size, (h * 0.5, w * 0.42), (h * 0.28, w * 0.2), radius=8)
    handle_centre, handle_radius, thickness = (h * 0.5, w * 0.62), w * 0.11, w * 0.04
    handle = ring(size, handle_centre, handle_radius, thickness)
    image, truth = compose(plain_backdrop(size), coverage(np.minimum(body, handle)), shaded(size, MUG_RED))
    ys, xs = grid(size)
    inside_ring = np.hypot(ys - handle_centre[0], xs - handle_centre[1]) < handle_radius - thickness / 2 - 2
    hole = inside_ring & (body > 2)
    return Scene(image, truth, {"hole": hole})


def shadow_scene(size: tuple[int, int] = (512, 512)) -> Scene:
    """A bottle standing on a soft contact shadow (a blurred grey ellipse) up to ~44 levels darker."""
    h, w = size
    ys, xs = grid(size)
    bottom = h * 0.85
    ellipse = (((xs - w * 0.5) / (w * 0.22)) ** 2 + ((ys - bottom) / (h * 0.035)) ** 2 <= 1).astype(np.float32)
    strength = ndimage.gaussian_filter(ellipse, sigma=6)
    strength /= strength.max()
    pixels = plain_backdrop(size) * (1 - 0.18 * strength[..., None])
    sdf = rounded_rect(size, (h * 0.5, w * 0.5), (bottom - h * 0.5, w * 0.15), radius=w * 0.05)
    image, truth = compose(pixels, coverage(sdf), shaded(size, BOTTLE_BLUE))
    away = ndimage.binary_dilation(truth, iterations=3)
    return Scene(image, truth, {"shadow": (strength > 0.5) & ~away, "clear": (strength < 0.01) & ~away})


# --- helpers for assertions --------------------------------------------------------------------


def iou_outside_edge(mask: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two masks, ignoring the 1-px band along the true edge (the feathered pixels)."""
    band = ndimage.binary_dilation(truth) & ~ndimage.binary_erosion(truth)
    a, b = mask & ~band, truth & ~band
    return float((a & b).sum() / (a | b).sum())


def ring_values(pixels: np.ndarray, width: int = 4) -> np.ndarray:
    """All values in the outer ring of `width` px of an (H, W, 3) array."""
    return np.concatenate(
        [pixels[:width].ravel(), pixels[-width:].ravel(), pixels[:, :width].ravel(), pixels[:, -width:].ravel()]
    )


def decode(rendered: Rendered) -> Image.Image:
    """Open rendered bytes with Pillow and load them."""
    image = Image.open(io.BytesIO(rendered.data))
    image.load()
    return image


def non_white_box(pixels: np.ndarray, below: int = 250) -> tuple[int, int, int, int]:
    """Box (left, upper, right, lower) of pixels with any channel under `below`."""
    ys, xs = np.nonzero((pixels < below).any(axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def shadow_to_edge_scene(size: tuple[int, int] = (1024, 1024)) -> Scene:
    """A bottle casting a long soft shadow that runs out of the picture on the right."""
    h, w = size
    ys, xs = grid(size)
    band = ((np.abs(ys - h * 0.8) < h * 0.03) & (xs > w * 0.5)).astype(np.float32)
    strength = ndimage.gaussian_filter(band, sigma=6)
    strength /= strength.max()
    pixels = plain_backdrop(size) * (1 - 0.15 * strength[..., None])
    sdf = rounded_rect(size, (h * 0.5, w * 0.5), (h * 0.3, w * 0.12), radius=w * 0.04)
    return product_scene(size, sdf, pixels=pixels)


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    """`image` saved to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise_image(size: tuple[int, int] = (256, 256), seed: int = 1) -> Image.Image:
    """Uniform RGB noise: no backdrop at all (what the tiny random model draws)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def write_photos(folder: str | Path) -> list[Path]:
    """Four 1024x1024 studio-like shots for the README's `postprocess` example: a bottle, a lamp on
    a soft contact shadow, a mug whose handle shows the backdrop, and a "poster" of noise with no
    plain backdrop (which the white-background presets must reject)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = (1024, 1024)
    shots = {"bottle.png": bottle_scene(size).image, "lamp.png": shadow_scene(size).image,
             "mug.jpg": mug_scene(size).image, "poster.png": noise_image(size)}
    for name, image in shots.items():
        image.save(folder / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    return [folder / name for name in shots]


if __name__ == "__main__":  # make photos
    import sys

    for path in write_photos(sys.argv[1] if len(sys.argv) > 1 else "photos"):
        print(path)

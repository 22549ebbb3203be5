"""Analytic prompt-adherence evaluator for the built-in shapes dataset.

No learned model: from an image we read the background colour off the border, segment the object as the largest
connected region of pixels far from that colour (specks of a mottled background elsewhere are not the object),
name both colours by the nearest palette entry, and name the shape from two scale-free features of
the object's mask: how much of its bounding box it fills (square 1.0, circle 0.79, triangle 0.5) and how far its
centre of mass sits below the box centre (0 for circle and square, 1/6 of the height for an upright triangle).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtrain.data.shapes import COLORS, SHAPES, Combo

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)
# (fill ratio, centroid offset / height) of the ideal shapes
_SHAPE_FEATURES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 1 / 6)}
_BORDER = 3  # border ring width (pixels at 64 px, scaled with the image) read as background
_OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in one image; ``None`` fields mean no object was found."""

    color: str | None
    shape: str | None
    background: str

    def matches(self, combo: Combo) -> dict[str, bool]:
        """Per-attribute correctness against ``combo``, plus ``all``."""
        result = {
            "color": self.color == combo.color,
            "shape": self.shape == combo.shape,
            "background": self.background == combo.background,
        }
        result["all"] = all(result.values())
        return result


def nearest_color(rgb: np.ndarray, colors: dict[str, tuple[int, int, int]] | None = None) -> str:
    """The name of the palette colour nearest ``rgb``: the dataset's, or ``colors`` (the dataset's and a colour a
    benchmark teaches, say)."""
    if colors is None:
        return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]
    names = list(colors)
    palette = np.array([colors[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(-1)))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (the mask itself when it has one region or none)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [start], deque([start])
        while queue:
            y, x = queue.popleft()
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        region.append((ny, nx))
                        queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def classify_mask(mask: np.ndarray) -> str | None:
    """Name the shape of a boolean object mask, or None if the mask is too small to tell."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 12:
        return None
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    height, width = bottom - top, right - left
    fill = len(ys) / float(height * width)
    offset = (ys.mean() + 0.5 - (top + bottom) / 2) / height
    # offset counts twice as much: it separates triangles from the rest even when their fill is off
    scores = {name: (fill - f) ** 2 + (2 * (offset - o)) ** 2 for name, (f, o) in _SHAPE_FEATURES.items()}
    return min(SHAPES, key=scores.__getitem__)


def read_image(image: Image.Image, colors: dict[str, tuple[int, int, int]] | None = None) -> Reading:
    """Read background colour, object colour and shape from an image, the colours named from ``colors`` (default:
    the dataset's palette)."""
    pixels, background_rgb, distance, mask = _segment(image)
    shape = classify_mask(mask)
    if shape is None:
        return Reading(color=None, shape=None, background=nearest_color(background_rgb, colors))
    # the object's colour from its core, away from antialiased edges
    core = mask & (distance > np.percentile(distance[mask], 50))
    object_rgb = np.median(pixels[core if core.sum() >= 4 else mask], axis=0)
    return Reading(
        color=nearest_color(object_rgb, colors), shape=shape, background=nearest_color(background_rgb, colors)
    )


def object_mask(image: Image.Image) -> np.ndarray:
    """The object's pixels as the reader segments them (H x W booleans; none where there is no object)."""
    return _segment(image)[3]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two object masks (1 where both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _segment(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(pixels, background colour, each pixel's distance from it, the object's mask)``."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = max(1, round(_BORDER * pixels.shape[0] / 64))
    ring = np.concatenate(
        [
            pixels[:border].reshape(-1, 3),
            pixels[-border:].reshape(-1, 3),
            pixels[:, :border].reshape(-1, 3),
            pixels[:, -border:].reshape(-1, 3),
        ]
    )
    background_rgb = np.median(ring, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(-1))
    return pixels, background_rgb, distance, largest_component(distance > _OBJECT_DISTANCE)


def score(readings: list[Reading], combos: list[Combo]) -> dict[str, float]:
    """Accuracy per attribute and for all three, over paired readings and target combinations."""
    keys = ("color", "shape", "background", "all")
    if not readings:
        return {k: float("nan") for k in keys} | {"count": 0}
    hits = [r.matches(c) for r, c in zip(readings, combos, strict=True)]
    return {k: sum(h[k] for h in hits) / len(hits) for k in keys} | {"count": len(hits)}

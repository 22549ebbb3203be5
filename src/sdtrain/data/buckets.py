"""Aspect-ratio buckets: a set of (width, height) sizes of about the same area, each image trained at the nearest.

For a target area ``resolution**2`` and a step of 64 px, the buckets are every ``(w, h)`` with both sides multiples of
the step, ``w * h <= resolution**2`` (the largest such ``h`` for each ``w``), and an aspect ratio within
``max_ratio``: at 512 px, 512x512, 576x448, 448x576, 640x384, ... An image goes to the bucket whose aspect ratio is
nearest to its own (in log space), is resized to cover it and cropped; every batch holds a single bucket.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from sdtrain.config import DataConfig


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)``, sorted by aspect ratio; always includes the square."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    return sorted(buckets, key=lambda b: b[0] / b[1])


def config_buckets(config: DataConfig) -> list[tuple[int, int]]:
    """The run's buckets: ``make_buckets`` with ``data.buckets``, else the one square."""
    if config.buckets:
        return make_buckets(config.resolution, config.bucket_step, config.bucket_max_ratio)
    return [(config.resolution, config.resolution)]


def condition_buckets(config: DataConfig) -> list[tuple[int, int]] | None:
    """The buckets of condition images at their own size (``data.condition_resolution``: ``make_buckets`` of it with
    ``data.buckets``, else its square); None where they are cropped with their image."""
    side = config.condition_resolution
    if side is None:
        return None
    return make_buckets(side, config.bucket_step, config.bucket_max_ratio) if config.buckets else [(side, side)]


def condition_bucket_of(config: DataConfig) -> Callable[[tuple[int, int]], tuple[int, int]] | None:
    """``(width, height) -> the condition bucket nearest it`` with ``data.condition_resolution``, else None."""
    buckets = condition_buckets(config)
    return None if buckets is None else partial(nearest_bucket, buckets=buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size = (width, height)``'s."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))

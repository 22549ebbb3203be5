"""The one path from a record's image to a training sample: decode (:mod:`sdtrain.data.decode`, which raises
:class:`~sdtrain.data.decode.Skip` for bad input), resize to cover the target, crop, flip, with the crop info that
SDXL-style micro-conditioning needs. Every loader, cache, validation and evaluation set calls :func:`load_pixels`."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtrain.data.decode import Skip, decode_image
from sdtrain.data.sources import mask_file

Size = tuple[int, int]  # (width, height)
MAX_ASPECT = 16.0  # longer side over shorter side: beyond it an image is skipped (bad_aspect), never resized
MAX_RESIZE_PIXELS = 64_000_000  # the most pixels a resize may allocate (as decoding's header limit)


def check_aspect(size: Size, max_aspect: float = MAX_ASPECT) -> None:
    """Refuse an image whose sides differ by more than ``max_aspect`` (from its header or decoded size): covering a
    square target would scale the long side without bound (a 1 x 200,000 strip covering 256 px is 256 x 51,200,000).

    Raises:
        Skip: ``bad_aspect``.
    """
    width, height = size
    if min(width, height) < 1 or max(width, height) > max_aspect * min(width, height):
        raise Skip("bad_aspect", f"{width}x{height}")


def load_pixels(
    image: str | Path | bytes,
    size: int | Size,
    center_crop: bool = True,
    flip: bool = False,
    rng: random.Random | None = None,
    bucket_of: Callable[[Size], Size] | None = None,
    masked: bool = False,
    mask: bytes | None = None,
    conditions: list[str | Path | bytes | None] | None = None,
    condition_bucket_of: Callable[[Size], Size] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode ``image`` and transform it to ``size`` (a square side, or a ``(width, height)`` bucket): C x H x W in
    [-1, 1] and the crop info. ``bucket_of`` chooses the target from the decoded image's original size instead (the
    image is decoded to cover ``size``). ``masked``: the info also holds ``mask``, 1 x H x W in [0, 1], the image's
    loss mask (``mask``, a shard sample's encoded mask, else its ``NAME.mask.png``, else its alpha channel, else
    ones) resized, cropped and flipped with it. ``conditions``: the sample's condition images (``data.conditions``),
    each resized to the image's size and cropped and flipped with it, as ``info["conditions"]``, a list of
    C x H x W in [-1, 1]; with ``condition_bucket_of`` (``data.condition_resolution``) each at a size of its own
    instead: resized to cover and center-cropped to the bucket it gives for the condition's own size, any aspect,
    flipped where its image is.

    Raises:
        Skip: the image cannot be used (the reason is the skip counter's key); ``mask_size``: its mask file is not
            the image's size; ``no_condition``, ``condition_<reason>`` (a condition image missing or that cannot be
            decoded), ``condition_aspect`` (one of another aspect than its image).
    """
    cover = (size, size) if isinstance(size, int) else size
    decoded = decode_image(image, cover=cover)
    check_aspect(decoded.info.get("original_size", decoded.size))
    if bucket_of is not None:
        size = bucket_of(decoded.info.get("original_size", decoded.size))
    loss_mask = _mask_of(mask if mask is not None else mask_file(image), decoded) if masked else None
    own = condition_bucket_of is not None
    if conditions is not None and not own:
        extra = [_condition_of(c, decoded, cover) for c in conditions]
    elif conditions is not None:  # each at its own size, resized below once the image's flip is drawn
        extra = [_condition_of(c, decoded, _cover(condition_bucket_of), same_aspect=False) for c in conditions]
    else:
        extra = None
    pixels, info = resize_crop(decoded, size, center_crop, flip, rng, loss_mask, None if own else extra)
    if own and extra is not None:
        info["conditions"] = [_own_size(c, condition_bucket_of, info["flipped"]) for c in extra]
    if masked and loss_mask is None:
        info["mask"] = torch.ones(1, *pixels.shape[1:])
    return pixels, info


def _cover(bucket_of: Callable[[Size], Size]) -> Size:
    """What a condition image at its own size is decoded to cover: its square bucket's side both ways (a bucket of
    another aspect covered by the image's own aspect needs no more)."""
    side = bucket_of((1, 1))[0]
    return side, side


def _own_size(condition: Image.Image, bucket_of: Callable[[Size], Size], flipped: bool) -> torch.Tensor:
    """A condition image at its own size: resized to cover and center-cropped to its bucket, flipped with its
    image."""
    original = condition.info.get("original_size", condition.size)
    try:
        check_aspect(original)
        pixels, _ = resize_crop(condition, bucket_of(original), center_crop=True)
    except Skip as skip:
        raise Skip(f"condition_{skip.reason}", str(skip)) from None
    return pixels.flip(-1) if flipped else pixels


def _mask_of(source: Path | bytes | None, decoded: Image.Image) -> Image.Image | None:
    """The loss mask of an image as an L image of the decoded image's size: ``source`` (a mask file or encoded
    bytes), else the image's alpha channel, else None (everywhere)."""
    if source is None:
        return decoded.info.get("alpha")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
    except (OSError, ValueError) as e:
        raise Skip("corrupt_mask", str(e)) from None
    original = decoded.info.get("original_size", decoded.size)
    if mask.size != tuple(original):
        raise Skip("mask_size", f"the mask is {mask.size[0]}x{mask.size[1]}, its image {original[0]}x{original[1]}")
    return mask if mask.size == decoded.size else mask.resize(decoded.size, Image.Resampling.BILINEAR)


ASPECT_TOLERANCE = 0.02  # a condition image's aspect may differ from its image's by this share (rounding)


def _condition_of(
    source: str | Path | bytes | None, decoded: Image.Image, cover: Size, same_aspect: bool = True
) -> Image.Image:
    """A condition image decoded as images are, of the decoded image's aspect (``same_aspect``; else any).

    Raises:
        Skip: ``no_condition`` (none), ``condition_<reason>`` (it cannot be decoded), ``condition_aspect``.
    """
    if source is None or (isinstance(source, (str, Path)) and not Path(source).is_file()):
        raise Skip("no_condition", str(source) if source is not None else "")
    try:
        condition = decode_image(source, cover=cover)
    except Skip as skip:
        raise Skip(skip.reason if skip.reason.startswith("condition") else f"condition_{skip.reason}",
                   str(skip)) from None  # fmt: skip
    (w, h), (cw, ch) = decoded.info.get("original_size", decoded.size), condition.info.get("original_size")
    if same_aspect and abs((cw / ch) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise Skip("condition_aspect", f"a {cw}x{ch} condition image for a {w}x{h} image")
    return condition  # resized with its image in resize_crop


def stack_conditions(
    samples: list[list[torch.Tensor]], count: int, shape: tuple[int, ...] | list[tuple[int, ...]]
) -> list[torch.Tensor]:
    """The good samples' condition images (``info["conditions"]`` each) as one batch per condition; empty batches of
    ``shape`` (the batch's images', or a list: each condition's) where none was good."""
    if not samples:
        shapes = shape if isinstance(shape, list) else [shape] * count
        return [torch.empty(tuple(s)) for s in shapes]
    return [torch.stack([s[j] for s in samples]) for j in range(count)]


def resize_crop(
    image: Image.Image,
    size: int | tuple[int, int],
    center_crop: bool = True,
    flip: bool = False,
    rng: random.Random | None = None,
    mask: Image.Image | None = None,
    conditions: list[Image.Image] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Resize so the image covers ``size`` (a square side, or a ``(width, height)`` bucket), crop to it, optionally
    flip; returns C x H x W in [-1, 1] and the crop info (with ``mask``, an L image of the image's size, the same
    resize, crop and flip of it as ``info["mask"]``, 1 x H x W in [0, 1]; with ``conditions``, RGB images of the
    image's size, the same of each as ``info["conditions"]``, C x H x W in [-1, 1]).

    The info (original size, crop offsets) is kept for SDXL-style micro-conditioning.

    Raises:
        Skip: ``bad_aspect``, where covering the target would allocate more than ``MAX_RESIZE_PIXELS``.
    """
    rng = rng or random.Random()
    target_w, target_h = (size, size) if isinstance(size, int) else size
    original = image.info.get("original_size", image.size)  # before a JPEG draft decode shrank it
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if new_w * new_h > MAX_RESIZE_PIXELS:
        raise Skip("bad_aspect", f"{width}x{height} covering {target_w}x{target_h} needs {new_w}x{new_h}")
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)  # antialiased when shrinking
    if center_crop:
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    else:
        left, top = rng.randint(0, new_w - target_w), rng.randint(0, new_h - target_h)
    image = image.crop((left, top, left + target_w, top + target_h))
    flipped = flip and rng.random() < 0.5
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tensor = _tensor(image)
    info = {"original_size": (original[1], original[0]), "crop_top_left": (top, left), "flipped": flipped}
    if conditions is not None:
        transformed = []
        for condition in conditions:
            if condition.size != (new_w, new_h):
                condition = condition.resize((new_w, new_h), Image.Resampling.BICUBIC)
            condition = condition.crop((left, top, left + target_w, top + target_h))
            transformed.append(_tensor(condition.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else condition))
        info["conditions"] = transformed
    if mask is not None:
        if mask.size != (new_w, new_h):
            mask = mask.resize((new_w, new_h), Image.Resampling.BILINEAR)
        mask = mask.crop((left, top, left + target_w, top + target_h))
        if flipped:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        info["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return tensor, info


def _tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as C x H x W in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()

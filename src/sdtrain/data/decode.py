"""Decoding policy: bytes or a path -> an RGB PIL image, or a reason why not.

Every bad input is a counted skip, never a crash: missing, empty, truncated, corrupt or non-image files, and images
whose header announces more pixels than ``max_pixels`` (refused before decoding, so a decompression bomb costs no
memory). EXIF orientation is applied; palette, grayscale, 16-bit, CMYK and images with alpha become RGB (alpha
composited on white).
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sdtrain.errors import UserError

MAX_PIXELS = 64_000_000  # refuse larger images from their header


class Skip(Exception):
    """An input that is skipped; ``reason`` is the counter key.

    A record may hold a ``Skip`` in place of its image and caption (a manifest row that could not be read, a shard
    cut short): decoding it raises it, so every loader counts it under its reason when it reads the record.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DataError(UserError, ValueError):
    """Data that cannot be read at all (a manifest row that is not JSON, ...), named with its file and line; with
    ``data.skip_bad_rows`` such rows are skipped and counted instead."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (the alpha channel kept as ``info["alpha"]``)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        alpha = image.getchannel("A")
        background.paste(image, mask=alpha)
        background.info["alpha"] = alpha  # a loss mask where masked loss asks for one (sdtrain.data.transforms)
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def decode_image(
    source: str | Path | bytes, max_pixels: int = MAX_PIXELS, cover: tuple[int, int] | None = None
) -> Image.Image:
    """Decode a file path or encoded bytes to an RGB image.

    Args:
        cover: the ``(width, height)`` the image will be resized to cover; a JPEG is then decoded directly at the
            smallest DCT scale (1/2, 1/4, 1/8) still covering it, which is several times faster for large photos.
            ``image.info["original_size"]`` keeps the full ``(width, height)`` for micro-conditioning.

    Raises:
        Skip: with a reason among ``missing``, ``empty``, ``too_large``, ``not_an_image``, ``corrupt``.
    """
    if isinstance(source, Skip):  # a record that was unreadable (see Skip)
        raise source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise Skip("missing", str(path))
        data = path.read_bytes()
    else:
        data = source
    if not data:
        raise Skip("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header; nothing decoded yet
            if width * height > max_pixels:
                raise Skip("too_large", f"{width}x{height}")
            rotated = image.format in ("JPEG", "WEBP", "TIFF") and image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            original = (height, width) if rotated else (width, height)
            if cover is not None and image.format == "JPEG":
                target = (cover[1], cover[0]) if rotated else cover  # in the stored orientation
                scale = max(target[0] / width, target[1] / height)
                if scale < 0.5:
                    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))  # info["alpha"]: the channel it composited away
            image.info["original_size"] = original
            return image
    except Skip:
        raise
    except Image.DecompressionBombError as e:  # PIL's own header check (over twice its pixel limit)
        raise Skip("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise Skip("not_an_image", str(e)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise Skip("corrupt", str(e)) from None


def clean_caption(caption: object) -> str:
    """A usable caption string.

    Raises:
        Skip: ``no_caption`` (missing), ``caption_not_text`` (a number, a mapping, ...), ``empty_caption`` (blank) or
            ``caption_not_utf8``; the record's own reason where it holds a ``Skip``.
    """
    if isinstance(caption, Skip):
        raise caption
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("caption_not_utf8") from None
    if caption is None:
        raise Skip("no_caption")
    if not isinstance(caption, str):
        raise Skip("caption_not_text", f"a {type(caption).__name__}")
    if not caption.strip():
        raise Skip("empty_caption")
    return caption.strip()


def choose_caption(caption: object, rng) -> str:
    """One usable caption: a list's option chosen with ``rng`` (seeded per sample by the caller), then cleaned."""
    if isinstance(caption, Skip):
        raise caption
    if isinstance(caption, list):
        caption = rng.choice(caption) if caption else None
    return clean_caption(caption)


def caption_options(caption: object) -> list[str]:
    """Every option of a caption (a string or a list), each cleaned; any bad option skips the sample."""
    return [clean_caption(c) for c in (caption if isinstance(caption, list) else [caption])]


def probe_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header alone (for aspect buckets), with the same skip reasons as decoding."""
    if not data:
        raise Skip("empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1) if image.format in ("JPEG", "WEBP", "TIFF") else 1
    except Image.DecompressionBombError as e:
        raise Skip("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise Skip("not_an_image", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise Skip("corrupt", str(e)) from None
    if width * height > max_pixels:
        raise Skip("too_large", f"{width}x{height}")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # EXIF rotations swap the sides


class SkipCounter(Counter):
    """Skipped samples by reason."""

    def summary(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.items())) or "none"

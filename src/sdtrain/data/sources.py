"""Indexable sources of image-caption records: folders, manifests and Hugging Face datasets.

A record is ``{"image": path | bytes, "caption": str | bytes | list | None}``; nothing is decoded here (decoding,
with its skip policy, is :mod:`sdtrain.data.decode`). ``data.path`` may be:

- a folder of images with same-named ``.txt`` / ``.caption`` sidecars;
- a folder holding a ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` manifest (the Hugging Face
  imagefolder convention: image path relative to the folder in ``file_name``, caption in ``text``);
- a manifest file (``.jsonl``, ``.csv``, ``.parquet``) whose image column holds paths (relative to the manifest's
  folder, or absolute) or encoded image bytes (parquet);
- a Hugging Face dataset: a folder written by ``Dataset.save_to_disk``, or ``hf:NAME`` / ``hf:/local/path`` for
  ``datasets.load_dataset`` (split ``train``), with an image column (the ``Image`` feature or bytes) and a text column.

Webdataset shards are streamed instead (:mod:`sdtrain.data.shards`); :func:`shard_records` reads them as records where
they are read once (the disk cache, evaluation). :func:`is_shards` decides which a path is.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sdtrain.config import is_shards
from sdtrain.data.decode import DataError, Skip, SkipCounter, caption_options, decode_image, probe_size
from sdtrain.errors import MissingPackage

__all__ = ["check_usable", "is_shards", "list_records", "shard_records"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SUFFIXES = (".txt", ".caption")
MANIFESTS = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def shard_records(
    path: str,
    caption_column: str = "text",
    allow_pipe: bool = False,
    rank: int = 0,
    world: int = 1,
    max_member_mb: float | None = 32.0,
    conditions: Sequence[str] = (),
) -> Iterator[dict[str, Any]]:
    """The samples of webdataset shards as records (``{"key", "image", "caption", "mask"}``, and ``"conditions"``
    with ``conditions``), shards as stored, process ``rank`` of ``world`` taking shards ``rank::world``; decoded by
    the caller, as indexable records are (a sample the shard reader skipped holds its ``Skip``)."""
    from sdtrain.data.shards import (
        SKIP,
        expand_urls,
        iterate_shard,
        sample_caption,
        sample_condition,
        sample_image,
        sample_mask,
    )

    for url in expand_urls(path)[rank::world]:
        for sample in iterate_shard(url, allow_pipe, max_member_mb):
            key = sample.get("__key__", "")
            if SKIP in sample:
                skip = Skip(sample[SKIP], key)
                yield {"key": key, "image": skip, "caption": skip, **({"conditions": [skip]} if conditions else {})}
            else:
                image = sample_image(sample, conditions) or b""
                record = {"key": key, "image": image, "caption": sample_caption(sample, caption_column),
                          "mask": sample_mask(sample)}  # fmt: skip
                if conditions:
                    record["conditions"] = [sample_condition(sample, c) for c in conditions]
                yield record


def list_records(
    path: str | Path,
    image_column: str = "file_name",
    caption_column: str = "text",
    skip_bad_rows: bool = False,
    conditions: Sequence[str] = (),
) -> Sequence[dict]:
    """The records of a folder, manifest or Hugging Face dataset (see the module docstring); with ``conditions``
    (``data.conditions``) each record also holds ``"conditions"``, its condition images in that order (a path,
    bytes, or None where it has none): ``NAME.<condition>.<suffix>`` beside an image of a folder (not a training
    image of its own), the column ``<condition>`` of a manifest (else that file beside the row's image) or dataset.

    Raises:
        DataError: a manifest row that cannot be read (not JSON, not an object, a CSV line it cannot parse), naming
            the file and line; with ``skip_bad_rows`` the row becomes a record that is skipped and counted
            (``bad_row``) when read.
    """
    text = str(path)
    if text.startswith("hf:"):
        return _hf_records(text[3:], image_column, caption_column, saved=False, conditions=conditions)
    root = Path(path)
    if root.is_file():
        return _manifest(root, image_column, caption_column, skip_bad_rows, conditions)
    if not root.is_dir():
        raise DataError(f"{root}: no such file or folder (data.path takes a folder, a manifest, a dataset or shards)")
    if any((root / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _hf_records(str(root), image_column, caption_column, saved=True, conditions=conditions)
    for name in MANIFESTS:
        if (root / name).exists():
            return _manifest(root / name, image_column, caption_column, skip_bad_rows, conditions)
    records = []
    images = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_file(p)
              and condition_of(p, conditions) is None)  # fmt: skip
    for image in sorted(images):
        caption = None
        for suffix in CAPTION_SUFFIXES:
            sidecar = image.with_suffix(suffix)
            if sidecar.exists():
                caption = sidecar.read_bytes()  # decoded (UTF-8 or skipped) by clean_caption
                break
        record = {"image": image, "caption": caption}
        records.append(record | ({"conditions": list(condition_files(image, conditions).values())} if conditions
                                 else {}))  # fmt: skip
    if not records:
        raise DataError(f"{root}: no images found in it (and no {' / '.join(MANIFESTS)})")
    return records


MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.jpg: the image's loss mask (data.masked_loss)


def is_mask_file(path: Path) -> bool:
    """A loss mask beside its image (``NAME.mask.png``), not a training image of its own."""
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_file(image: object) -> Path | None:
    """The ``NAME.mask.png`` beside an image file, where there is one."""
    if not isinstance(image, (str, Path)):
        return None
    path = Path(image)
    mask = path.with_name(path.stem + MASK_SUFFIX)
    return mask if mask.is_file() else None


def condition_of(path: Path, conditions: Sequence[str]) -> str | None:
    """The condition a file of a folder is (``NAME.<condition>.png``), or None: a training image."""
    parts = path.name.rsplit(".", 2)
    return parts[1] if len(parts) == 3 and parts[1] in conditions else None


def condition_files(image: Path, conditions: Sequence[str]) -> dict[str, Path | None]:
    """The ``NAME.<condition>.<suffix>`` files beside ``image``, by condition (None where there is none)."""
    found = {}
    for condition in conditions:  # a few stats each, not a listing of the folder per image
        names = (f"{image.stem}.{condition}{suffix}" for suffix in CONDITION_SUFFIXES)
        found[condition] = next((p for p in (image.parent / n for n in names) if p.is_file()), None)
    return found


# the suffixes a condition image may have (any image's, either case), PNG first
CONDITION_SUFFIXES = tuple(sorted({c for s in IMAGE_SUFFIXES for c in (s, s.upper())}, key=lambda s: (s != ".png", s)))


def check_condition_files(records: Sequence[dict], conditions: Sequence[str], where: str) -> None:
    """Refuse, before any work, records none of which has all its condition images (a sample without one is
    skipped and counted when it is drawn; a dataset without any would skip them all).

    Raises:
        DataError: naming ``where`` and the files it looks for.
    """
    for record in records:
        if all(c is not None and (not isinstance(c, Path) or c.is_file()) for c in record.get("conditions", [None])):
            return
    looked = ", ".join(f"NAME.{c}.png beside NAME.png (or a {c!r} column)" for c in conditions)
    raise DataError(f"{where}: none of its {len(records)} samples has its condition images ({looked})")


def check_masks(records: Sequence[dict], where: str) -> None:
    """Refuse, before any work, a ``NAME.mask.png`` whose size is not its image's (both read from their headers).

    Raises:
        DataError: naming the mask, both sizes and ``where``.
    """
    from PIL import Image

    for record in records:
        mask = mask_file(record["image"])
        if mask is None:
            continue
        try:
            size = probe_size(Path(record["image"]).read_bytes())
            with Image.open(mask) as opened:
                mask_size = opened.size
        except (Skip, OSError):
            continue  # an unreadable image or mask is skipped and counted when it is drawn
        if mask_size != size:
            raise DataError(f"{where}: {mask} is {mask_size[0]}x{mask_size[1]} and its image {size[0]}x{size[1]}: "
                            "a mask is its image's size (white learns, black is ignored)")  # fmt: skip


def check_usable(records: Sequence[dict], where: str, captions: bool = True) -> None:
    """Refuse, before any work, records none of which can be used: every image fails to decode (or, with
    ``captions``, every caption is missing or empty). The search stops at the first usable record, so a good dataset
    costs one decode; a bad one is named before a run folder exists, not by the bad-share check at step N.

    Raises:
        DataError: naming ``where``, how many records were tried and why each was skipped.
    """
    skipped = SkipCounter()
    for record in records:
        try:
            if captions:
                caption_options(record["caption"])
            decode_image(record["image"])
            return
        except Skip as skip:
            skipped[skip.reason] += 1
    raise DataError(
        f"{where}: none of its {len(records)} samples can be used ({skipped.summary()}): sdtrain reads images "
        f"({', '.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))})" + (" with a caption each" if captions else "")
    )


MAX_CSV_FIELD = 1 << 20  # characters in one CSV field (Python's csv stops at 131,072: long captions are real)


def _bad_row(manifest: Path, line: int, why: str, skip: bool) -> Skip:
    """The marker of an unreadable row (skipped and counted as ``bad_row`` when read), or the error that names it."""
    if not skip:
        raise DataError(f"{manifest}:{line}: {why} (set data.skip_bad_rows=true to skip and count such rows)")
    return Skip("bad_row", f"{manifest}:{line}: {why}")


def _rows(manifest: Path, skip_bad_rows: bool = False) -> list[dict[str, Any] | Skip]:
    """The rows of a manifest as dicts; an unreadable one as :func:`_bad_row` says."""
    suffix = manifest.suffix.lower()
    if suffix == ".jsonl":
        rows: list[dict[str, Any] | Skip] = []
        for number, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append(_bad_row(manifest, number, f"not valid JSON ({e})", skip_bad_rows))
                continue
            ok = isinstance(row, dict)
            rows.append(row if ok else _bad_row(manifest, number, "not a JSON object", skip_bad_rows))
        return rows
    if suffix == ".csv":
        csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))
        with open(manifest, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            rows = []
            while True:
                line = reader.line_num + 1  # where the next row starts
                try:
                    row = next(reader)
                except StopIteration:
                    return rows
                except csv.Error as e:  # the reader goes on after the line it could not parse
                    rows.append(_bad_row(manifest, line, f"not a readable CSV row ({e})", skip_bad_rows))
                    continue
                rows.append(row)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MissingPackage("parquet manifests need pyarrow: pip install 'sdtrain[data]'") from e
        return pq.read_table(manifest).to_pylist()
    raise DataError(f"{manifest}: manifests are .jsonl, .csv or .parquet")


def _manifest(
    manifest: Path, image_column: str, caption_column: str, skip_bad_rows: bool = False, conditions: Sequence[str] = ()
) -> list[dict]:
    rows = _rows(manifest, skip_bad_rows)
    if not rows:
        raise DataError(f"{manifest} lists no samples")
    records = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, Skip):
            records.append({"image": row, "caption": row})
            continue
        if image_column not in row:
            raise DataError(f"{manifest}: row {number} has no {image_column!r} column (set data.image_column)")
        record = {"image": _image_value(row[image_column], manifest.parent), "caption": row.get(caption_column)}
        if conditions:  # the column, else NAME.<condition>.png beside the row's image
            beside = condition_files(record["image"], conditions) if isinstance(record["image"], Path) else None
            record["conditions"] = [_image_value(row[c], manifest.parent) if row.get(c) else (beside or {}).get(c)
                                    for c in conditions]  # fmt: skip
        records.append(record)
    return records


def _image_value(value: Any, root: Path) -> Path | bytes | None:
    """A path (relative to the manifest's folder) or encoded bytes (a parquet binary column, or a {"bytes": ...})."""
    if isinstance(value, dict):  # the datasets Image feature's storage: {"bytes": ..., "path": ...}
        return value.get("bytes") or (_image_value(value["path"], root) if value.get("path") else None)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return root / value
    return None  # decode_image reports it as missing


class _HFRecords(Sequence):
    """Rows of a Hugging Face dataset read on access (the dataset stays memory-mapped on disk)."""

    def __init__(self, dataset, image_column: str, caption_column: str, conditions: Sequence[str] = ()):
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.conditions = conditions

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.dataset[int(index)]
        record = {"image": _image_value(row[self.image_column], Path(".")), "caption": row.get(self.caption_column)}
        if self.conditions:
            record["conditions"] = [_image_value(row.get(c), Path(".")) for c in self.conditions]
        return record


def _hf_records(
    name: str, image_column: str, caption_column: str, saved: bool, conditions: Sequence[str] = ()
) -> _HFRecords:
    try:
        import datasets
    except ImportError as e:
        raise MissingPackage("Hugging Face datasets need the datasets package: pip install datasets") from e
    if saved:
        dataset = datasets.load_from_disk(name)
    else:
        dataset = datasets.load_dataset(name, split="train")
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    if image_column == "file_name":  # the folder default; a hub dataset's usual image column is "image"
        image_column = "image"
    missing = [c for c in (image_column, caption_column, *conditions) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"dataset {name} has no column {missing} (it has {dataset.column_names}); set data.image_column / "
            "data.caption_column"
        )
    for column in (image_column, *conditions):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))  # bytes: our decoding policy
    return _HFRecords(dataset, image_column, caption_column, conditions)

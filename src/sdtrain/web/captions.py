"""The captions of a data folder, viewed and edited: ``NAME.txt`` (or ``NAME.caption``) beside each image, or the
caption column of the folder's ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` and ``text``, as the data layer
reads them). Every write replaces its file atomically; a parquet manifest is shown, not written."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sdtrain.data.sources import CAPTION_SUFFIXES, IMAGE_SUFFIXES
from sdtrain.errors import UserError
from sdtrain.web.files import Root
from sdtrain.web.worker import write_atomically

MANIFESTS = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMN, CAPTION_COLUMN = "file_name", "text"


def _manifest(folder: Path) -> Path | None:
    return next((folder / m for m in MANIFESTS if (folder / m).is_file()), None)


def _read_rows(manifest: Path) -> list[dict[str, Any]]:
    if manifest.suffix == ".jsonl":
        return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_rows(manifest: Path, rows: list[dict[str, Any]]) -> None:
    if manifest.suffix == ".jsonl":
        write_atomically(manifest, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [IMAGE_COLUMN, CAPTION_COLUMN])
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(manifest, text.getvalue())


def _sidecar(image: Path) -> Path:
    """The caption file of ``image``: the one that exists, else ``NAME.txt``."""
    return next(
        (c for c in (image.with_suffix(s) for s in CAPTION_SUFFIXES) if c.is_file()), image.with_suffix(".txt")
    )


def list_captions(root: Root, rel: str) -> dict[str, Any] | None:
    """The folder's images and their captions (None outside the root): ``{"folder", "source", "items": [{"image",
    "file", "caption"}]}``, ``source`` the manifest's name or ``"text files"``."""
    folder = root.resolve(rel)
    if folder is None or not folder.is_dir() or not root.visible(folder):
        return None
    manifest = _manifest(folder)
    items = []
    if manifest is not None and root.inside(manifest):
        for row in _read_rows(manifest):
            image = folder / str(row.get(IMAGE_COLUMN, ""))
            if root.inside(image):
                items.append({"image": str(row.get(IMAGE_COLUMN)), "file": root.relative(image),
                              "caption": str(row.get(CAPTION_COLUMN) or "")})  # fmt: skip
        return {"folder": root.relative(folder), "source": manifest.name, "items": items}
    for image in sorted(folder.iterdir()):
        if image.suffix.lower() in IMAGE_SUFFIXES and "." not in image.stem and root.inside(image):
            caption = root.read_text(_sidecar(image)) or ""
            items.append({"image": image.name, "file": root.relative(image), "caption": caption.strip()})
    return {"folder": root.relative(folder), "source": "text files", "items": items}


def save_caption(root: Root, rel: str, image: str, caption: str) -> None:
    """Write ``caption`` for ``image`` (a name in folder ``rel``) where the folder keeps its captions.

    Raises:
        UserError: the folder or image is not under the root, or not in the folder's manifest.
    """
    save_captions(root, rel, {image: caption})


def save_captions(root: Root, rel: str, captions: dict[str, str]) -> None:
    """Write each image's caption (``{name in folder rel: caption}``): each sidecar, or the manifest once.

    Raises:
        UserError: a folder or image not under the root, or not in the folder's manifest (nothing is written then).
    """
    folder = root.resolve(rel)
    for image in captions:
        path = root.resolve(f"{rel}/{image}") if folder is not None else None
        if folder is None or path is None or path.parent != folder or not path.is_file() or not root.visible(path):
            raise UserError(f"{rel}/{image}: not an image under the served folder")
    captions = {image: " ".join(caption.split()) for image, caption in captions.items()}  # one line each, as read
    manifest = _manifest(folder)
    if manifest is None:
        sidecars = {_sidecar(folder / image): caption for image, caption in captions.items()}
        for sidecar in sidecars:
            if sidecar.is_symlink() or not root.inside(sidecar.parent):
                raise UserError(f"{sidecar.name}: a link; edit it where it points")
        for sidecar, caption in sidecars.items():
            write_atomically(sidecar, caption + "\n")
        return
    rows = _read_rows(manifest)
    by_image = {str(r.get(IMAGE_COLUMN)): r for r in rows}
    for image, caption in captions.items():
        if image not in by_image:
            raise UserError(f"{image}: no row of {manifest.name} names it")
        by_image[image][CAPTION_COLUMN] = caption
    _write_rows(manifest, rows)


def add_trigger(root: Root, rel: str, word: str) -> int:
    """Put ``word`` at the start of every caption of folder ``rel`` that lacks it; returns how many changed."""
    word = word.strip()
    listed = list_captions(root, rel)
    if listed is None or not word:
        raise UserError("give a trigger word and a folder under the served folder")
    changed = {item["image"]: f"{word}, {item['caption']}".rstrip(", ") for item in listed["items"]
               if word not in item["caption"].replace(",", " ").split()}  # fmt: skip
    save_captions(root, listed["folder"], changed)
    return len(changed)

"""The root a server serves: every path a request names is resolved under it (links followed) or read not at all;
the runs and data folders found in it."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

from sdtrain.data.sources import CAPTION_SUFFIXES, IMAGE_SUFFIXES, MANIFESTS

RUN_MARKERS = ("config.yaml", "log.jsonl", "metrics.json", "fidelity.json")
# folders of a run that are parts of it, not runs; hidden folders (.venv, .git, .sdtrain) are never walked
RUN_PARTS = {"checkpoints", "final", "tracking", "samples", "export", "fidelity", "cache"}
STATE = ".sdtrain"  # the server's own folder under the root: the queue, the jobs' logs


class Root:
    """A folder and the paths under it."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    def inside(self, path: Path) -> bool:
        """Whether ``path`` resolves (links followed) to the root or below it."""
        resolved = Path(path).resolve()
        return resolved == self.path or self.path in resolved.parents

    def resolve(self, rel: str | None) -> Path | None:
        """``rel`` (a path relative to the root, URL-quoted or not) under the root, or None for anything that leaves
        it: ``..``, absolute paths, links out, NULs, ``~``."""
        if rel is None:
            return None
        rel = urllib.parse.unquote(str(rel))
        if "\x00" in rel or rel.startswith("~"):
            return None
        path = self.path / rel  # an absolute rel replaces the root, and is then outside it
        return path.resolve() if self.inside(path) else None

    def visible(self, path: Path) -> bool:
        """Whether ``path`` (under the root) lies in no hidden folder and is no hidden file: ``.env``, ``.git``,
        ``.sdtrain`` (the server's own state) are never listed or served."""
        return not any(part.startswith(".") for part in Path(path).resolve().relative_to(self.path).parts)

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.path).as_posix() or "."

    def read_text(self, path: Path) -> str | None:
        """A file's text where the file is under the root, else None."""
        if not self.inside(path) or not path.is_file():
            return None
        return path.read_text(errors="replace")

    def state_dir(self) -> Path:
        folder = self.path / STATE
        folder.mkdir(exist_ok=True)
        return folder

    def find_runs(self, depth: int = 4) -> list[Path]:
        """Run folders (holding ``config.yaml``, ``log.jsonl``, ``metrics.json`` or ``fidelity.json``) to ``depth``
        under the root, relative, sorted; hidden folders, links out of the root and a run's own parts (checkpoints,
        final, samples, ...) are not walked."""
        found, stack = [], [(self.path, 0)]
        while stack:
            folder, level = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                path = Path(entry.path)
                walked = not entry.name.startswith(".") and entry.name not in RUN_PARTS and entry.is_dir()
                if not walked or not self.inside(path):
                    continue
                if any(self.inside(path / m) and (path / m).is_file() for m in RUN_MARKERS):
                    found.append(path.relative_to(self.path))
                if level + 1 < depth:
                    stack.append((path, level + 1))
        return sorted(found)

    def browse(self, rel: str, previews: int = 5) -> dict[str, Any] | None:
        """A folder's subfolders, its images (how many, their sizes) and a few captions: what the new-run form
        shows of a data folder; None outside the root."""
        from PIL import Image

        folder = self.resolve(rel or ".")
        if folder is None or not folder.is_dir() or not self.visible(folder):
            return None
        folders, images, sizes, captions = [], [], {}, []
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or not self.inside(entry):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.suffix.lower() in IMAGE_SUFFIXES and "." not in entry.stem:  # NAME.mask.png is not an image
                images.append(entry)
        for image in images[:200]:  # the sizes of the first 200 (reading headers only)
            try:
                with Image.open(image) as opened:
                    key = f"{opened.width}x{opened.height}"
            except OSError:
                key = "unreadable"
            sizes[key] = sizes.get(key, 0) + 1
        for image in images:
            caption = next((c for c in (image.with_suffix(s) for s in CAPTION_SUFFIXES) if c.is_file()), None)
            if caption is not None and self.inside(caption):
                captions.append({"image": image.name, "caption": caption.read_text(errors="replace").strip()[:200]})
            if len(captions) >= previews:
                break
        parent = None if folder == self.path else self.relative(folder.parent)
        manifest = next((m for m in MANIFESTS if (folder / m).is_file()), None)
        return {"path": self.relative(folder), "parent": parent, "folders": folders, "images": len(images),
                "sizes": sizes, "captions": captions, "manifest": manifest}  # fmt: skip

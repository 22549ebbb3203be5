""" "shapes": the built-in procedural image-caption dataset.

Each image is a single flat-coloured shape (circle, square, triangle) on a flat background of another colour,
with jittered size, position and colour. Captions name the three attributes with some varied phrasing. A fixed set
of (colour, shape, background) combinations is held out of training so that evaluation can test composition.

The dataset is written to disk as an image folder with a Hugging Face style ``metadata.jsonl`` so that the demo runs
the same data path as a user's own folder.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# Named colours, chosen far apart in RGB so that the analytic evaluator can tell them apart after jitter.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Phrasings used for training captions. Evaluation prompts use the first one.
TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} on a {background} background",
    "a {color} {shape} on {background}",
    "{color} {shape}, {background} background",
    "a {shape} in {color} on a {background} background",
    "a {background} background with a {color} {shape}",
)

COLOR_JITTER = 14  # max per-channel offset, in 0..255 units
MARGIN = 6  # pixels kept free at the border so that the background can be read from it


@dataclass(frozen=True)
class Combo:
    """One (object colour, shape, background colour) triple."""

    color: str
    shape: str
    background: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(color=self.color, shape=self.shape, background=self.background)


def all_combos() -> list[Combo]:
    """Every combination with object colour different from background colour, in a fixed order."""
    return [Combo(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def held_out_combos(count: int = 12, seed: int = 0) -> list[Combo]:
    """A fixed subset of combinations that never appears in training.

    Chosen so that every colour, shape and background still occurs in training in other combinations: the
    held-out set tests composition, not unseen words.
    """
    rng = random.Random(seed)
    combos = all_combos()
    rng.shuffle(combos)
    return sorted(combos[:count], key=all_combos().index)


def train_combos(held_out: list[Combo]) -> list[Combo]:
    excluded = set(held_out)
    return [c for c in all_combos() if c not in excluded]


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for v in rgb)  # type: ignore[return-value]


def render(
    combo: Combo, rng: random.Random, size: int = 64, supersample: int = 4, colors: dict | None = None
) -> Image.Image:
    """Draw one image of ``combo`` with random size, position and colour jitter (antialiased by supersampling);
    ``colors``: the palette its colour names are read from (default: the dataset's)."""
    colors = colors or COLORS
    big = size * supersample
    img = Image.new("RGB", (big, big), _jitter(colors[combo.background], rng))
    draw = ImageDraw.Draw(img)
    extent = rng.uniform(0.38, 0.62) * size  # side of the shape's bounding box
    lo, hi = MARGIN, size - MARGIN - extent
    x0, y0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
    box = [v * supersample for v in (x0, y0, x0 + extent, y0 + extent)]
    fill = _jitter(colors[combo.color], rng)
    if combo.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif combo.shape == "square":
        draw.rectangle(box, fill=fill)
    elif combo.shape == "triangle":
        left, top, right, bottom = box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {combo.shape!r}; known: {', '.join(SHAPES)}")
    return img.resize((size, size), Image.Resampling.BOX)


def write_shapes_dataset(
    root: str | Path,
    num_images: int = 8000,
    num_eval: int = 256,
    size: int = 64,
    held_out: int = 12,
    seed: int = 0,
) -> Path:
    """Write the shapes dataset as ``root/train`` and ``root/eval`` image folders with ``metadata.jsonl``.

    Deterministic for a seed. Training images use only the training combinations, with a random caption template;
    ``eval`` holds images of every combination (seen and held out) with the canonical caption, for evaluating the
    autoencoder and the reconstruct edits. ``root/combos.json`` records which combinations were held out.

    Args:
        root: output folder; an existing complete dataset with the same settings is reused.
        num_images: number of training images.
        num_eval: number of evaluation images.
        size: image side in pixels.
        held_out: number of combinations kept out of training.
        seed: random seed.

    Returns:
        The dataset root.
    """
    root = Path(root)
    settings = {"num_images": num_images, "num_eval": num_eval, "size": size, "held_out": held_out, "seed": seed}
    info_path = root / "combos.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("settings") == settings:
        return root
    heldout = held_out_combos(held_out, seed)
    seen = train_combos(heldout)
    rng = random.Random(seed)
    for split, count, pool in (("train", num_images, seen), ("eval", num_eval, all_combos())):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in tqdm(range(count), desc=f"shapes/{split}", unit="img", leave=False):
            combo = pool[i % len(pool)] if split == "eval" else rng.choice(pool)
            template = 0 if split == "eval" else rng.randrange(len(TEMPLATES))
            name = f"{i:06d}.png"
            render(combo, rng, size).save(folder / name)
            record = {"file_name": name, "text": combo.caption(template)}
            record.update(color=combo.color, shape=combo.shape, background=combo.background)
            lines.append(json.dumps(record))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    info = {"settings": settings, "held_out": [c.__dict__ for c in heldout], "seen": [c.__dict__ for c in seen]}
    info_path.write_text(json.dumps(info, indent=1))  # written last: marks the dataset complete
    return root


def load_combos(root: str | Path) -> tuple[list[Combo], list[Combo]]:
    """Read back ``(seen, held_out)`` combinations of a dataset written by :func:`write_shapes_dataset`."""
    info = json.loads((Path(root) / "combos.json").read_text())
    return [Combo(**c) for c in info["seen"]], [Combo(**c) for c in info["held_out"]]


# Instruction edits of one attribute (the object's colour, the background's), for training edit models on pairs. The
# evaluation's instruction is the first phrasing.
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("make the {shape} {value}", "turn the {shape} {value}", "paint the {shape} {value}"),
    "background": (
        "put it on a {value} background",
        "change the background to {value}",
        "make the background {value}",
    ),
}


@dataclass(frozen=True)
class Edit:
    """One instruction edit: ``source`` with its ``attribute`` (color or background) set to ``value``."""

    source: Combo
    attribute: str
    value: str

    @property
    def target(self) -> Combo:
        return dataclasses.replace(self.source, **{self.attribute: self.value})

    def instruction(self, template: int = 0) -> str:
        return EDIT_TEMPLATES[self.attribute][template].format(shape=self.source.shape, value=self.value)


def random_edit(rng: random.Random, combos: list[Combo] | None = None) -> Edit:
    """A source drawn from ``combos`` (default: all) and an edit of its colour or background to another colour (never
    the colour of the other: the object stays visible)."""
    source = rng.choice(combos or all_combos())
    attribute = rng.choice(tuple(EDIT_TEMPLATES))
    taken = {source.color, source.background}
    return Edit(source, attribute, rng.choice([c for c in COLORS if c not in taken]))


def render_pair(edit: Edit, rng: random.Random, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """The source and the edited image, drawn from the same random state: the same shape, size, position and colour
    jitter; only the edited attribute differs."""
    state = rng.getstate()
    source = render(edit.source, rng, size)
    rng.setstate(state)
    return source, render(edit.target, rng, size)


def write_edit_dataset(root: str | Path, num_pairs: int = 4000, num_eval: int = 96, size: int = 64,
                       seed: int = 0) -> Path:  # fmt: skip
    """Write instruction-edit pairs as ``root/train`` and ``root/eval`` folders: ``NAME.png`` (the edited image) and
    ``NAME.ref.png`` (the image to edit) with a ``metadata.jsonl`` (``file_name``, the instruction as ``text``,
    ``ref``, and the source's and target's attributes), for ``data.conditions=[ref]``. Deterministic for a seed;
    training pairs use a random phrasing, evaluation pairs (another random stream) the first. An existing complete
    dataset with the same settings is reused."""
    root = Path(root)
    settings = {"num_pairs": num_pairs, "num_eval": num_eval, "size": size, "seed": seed}
    info_path = root / "edits.json"
    if info_path.exists() and json.loads(info_path.read_text()).get("settings") == settings:
        return root
    for split, count, split_seed in (("train", num_pairs, seed), ("eval", num_eval, seed + 1_000_003)):
        rng = random.Random(split_seed)
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in tqdm(range(count), desc=f"shape edits/{split}", unit="pair", leave=False):
            edit = random_edit(rng)
            template = 0 if split == "eval" else rng.randrange(len(EDIT_TEMPLATES[edit.attribute]))
            source, target = render_pair(edit, rng, size)
            source.save(folder / f"{i:06d}.ref.png")
            target.save(folder / f"{i:06d}.png")
            record = {"file_name": f"{i:06d}.png", "text": edit.instruction(template), "ref": f"{i:06d}.ref.png",
                      "source": edit.source.__dict__, "attribute": edit.attribute, "value": edit.value}  # fmt: skip
            lines.append(json.dumps(record))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    info_path.write_text(json.dumps({"settings": settings}, indent=1))  # written last: marks the dataset complete
    return root


def load_edits(folder: str | Path) -> list[tuple[Edit, Path, Path]]:
    """The pairs of a split written by :func:`write_edit_dataset`: ``(edit, the image to edit, the edited image)``."""
    folder = Path(folder)
    pairs = []
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        edit = Edit(Combo(**row["source"]), row["attribute"], row["value"])
        pairs.append((edit, folder / row["ref"], folder / row["file_name"]))
    return pairs

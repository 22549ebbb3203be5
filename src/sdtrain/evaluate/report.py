"""``sdtrain evaluate``: prompt adherence and reconstruct edits of a model trained on the shapes dataset.

Text to image: every combination is prompted with the canonical caption, ``images_per_combo`` seeds each, and the
analytic evaluator reads colour, shape and background back; accuracies are reported for combinations seen in
training and for the held-out ones separately. Reconstruct: held-out evaluation images are edited under a prompt
that changes one attribute (object colour or background colour); an edit succeeds when the changed attribute reads
as asked and the other two are unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image

from sdtrain.data.shapes import COLORS, Combo, load_combos
from sdtrain.evaluate.shapes import read_image, score
from sdtrain.sample.pipeline import Pipeline, make_grid, sampler_name


def adherence(
    pipe: Pipeline,
    combos: list[Combo],
    images_per_combo: int,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int = 0,
    colors: dict[str, tuple[int, int, int]] | None = None,
) -> tuple[dict[str, float], list[Image.Image]]:
    """Accuracies for text-to-image on ``combos`` and the images (combo-major); ``colors``: the palette the oracle
    names colours from (default: the dataset's)."""
    prompts = [c.caption(0) for c in combos]
    images = pipe.generate(
        prompts,
        num_images_per_prompt=images_per_combo,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seed=seed,
        progress=True,
    ).images
    targets = [c for c in combos for _ in range(images_per_combo)]
    return score([read_image(im, colors) for im in images], targets), images


def edit_targets(combos: list[Combo], seed: int = 0) -> list[tuple[str, Combo]]:
    """For each source combination, one edit: alternately a new object colour and a new background colour."""
    rng = random.Random(seed)
    edits = []
    for i, combo in enumerate(combos):
        kind = "color" if i % 2 == 0 else "background"
        taken = {combo.color, combo.background}
        new = rng.choice([c for c in COLORS if c not in taken])
        target = Combo(new, combo.shape, combo.background) if kind == "color" else Combo(combo.color, combo.shape, new)
        edits.append((kind, target))
    return edits


def reconstruct_edits(
    pipe: Pipeline,
    data_root: Path,
    count: int,
    strength: float,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int = 0,
) -> tuple[dict[str, Any], list[Image.Image]]:
    """Edit ``count`` evaluation images; returns success rates and (source, edit) image pairs."""
    rows = [json.loads(line) for line in (data_root / "eval" / "metadata.jsonl").read_text().splitlines()][:count]
    sources = [Combo(r["color"], r["shape"], r["background"]) for r in rows]
    images = [Image.open(data_root / "eval" / r["file_name"]).convert("RGB") for r in rows]
    edits = edit_targets(sources, seed)
    out = pipe.reconstruct(
        [target.caption(0) for _, target in edits],
        images,
        strength=strength,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seed=seed,
        progress=True,
    ).images
    hits: dict[str, list[bool]] = {"color": [], "background": []}
    kept = []
    for (kind, target), edited in zip(edits, out):
        match = read_image(edited).matches(target)
        hits[kind].append(match["all"])
        kept.append(match["shape"])
    result = {
        "edit_success": sum(hits["color"] + hits["background"]) / len(edits),
        "color_edit_success": sum(hits["color"]) / max(1, len(hits["color"])),
        "background_edit_success": sum(hits["background"]) / max(1, len(hits["background"])),
        "shape_kept": sum(kept) / len(kept),
        "strength": strength,
        "count": len(edits),
    }
    pairs = [im for pair in zip(images, out) for im in pair]
    return result, pairs


def evaluate_shapes_model(
    model: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    images_per_combo: int = 2,
    edit_count: int = 48,
    edit_strength: float = 0.8,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Score a shapes model; writes ``metrics.json``, ``grid_seen.png``, ``grid_held_out.png`` and
    ``grid_reconstruct.png`` into ``out_dir``.

    Returns:
        The metrics: ``seen`` and ``held_out`` accuracies (color, shape, background, all), ``reconstruct`` edit
        success rates (None for a family diffusers has no image-to-image pipeline for), the settings used, and
        whatever ``extra`` holds (timings, autoencoder metrics).
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline.from_pretrained(model, scheduler=scheduler)  # None: the one exported with the model
    # None: the step count and guidance exported with the model
    num_inference_steps, guidance_scale = pipe.sampling_settings(num_inference_steps, guidance_scale)
    seen, held_out = load_combos(data_root)
    settings = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    seen_scores, seen_images = adherence(pipe, seen, images_per_combo, **settings)
    held_scores, held_images = adherence(pipe, held_out, images_per_combo, **settings)
    recon = None  # a family without an image-to-image pipeline in diffusers (PixArt) has no reconstruct to score
    if pipe.family.img2img is not None:
        recon, pairs = reconstruct_edits(pipe, data_root, edit_count, edit_strength, **settings)
        make_grid(pairs, columns=8).save(out_dir / "grid_reconstruct.png")
    make_grid(seen_images, columns=images_per_combo * 6).save(out_dir / "grid_seen.png")
    make_grid(held_images, columns=images_per_combo * 4).save(out_dir / "grid_held_out.png")
    metrics: dict[str, Any] = dict(extra or {})
    metrics.update(
        seen=seen_scores,
        held_out=held_scores,
        reconstruct=recon,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        images_per_combo=images_per_combo,
        scheduler=sampler_name(pipe.scheduler),
        model=str(model),
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics

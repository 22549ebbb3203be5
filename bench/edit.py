"""Edit benchmark: teach the demo's model to edit shapes under an instruction (InstructPix2Pix's recipe: the demo's
UNet widened to take the image to edit beside the noisy latents) and score the edits with the shapes oracle.

    python bench/edit.py                        # the demo's export in runs/demo/unet/final (make demo)
    python bench/edit.py --steps 2000 --guidance 2 --image-guidance 1.5

Pairs (``sdtrain.data.shapes.write_edit_dataset``): an image of one shape and the same image with its object's
colour or its background changed, under "make the circle red" / "put it on a blue background" (three phrasings in
training, the first in evaluation). Training runs a fixed number of steps from a fixed seed (the same result on a
busy machine). Scores over the held-out pairs, each edited once with its own seed:
- edit success: the oracle reads the asked attribute at its new value and the other two as they were;
- mask IoU: the generated object's mask against the edited image's (the object kept where it was, as it was).
Writes ``RUNS/edits.png`` (a row per pair: the image to edit, the edit, the expected image) and prints the table
and, last, the row as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdtrain.config import Config, load_config  # noqa: E402
from sdtrain.data.shapes import load_edits, write_edit_dataset  # noqa: E402


def train_editor(base: Path, data: Path, out: Path, steps: int, lr: float) -> tuple[Path, float]:
    """The edit model (reused when its export exists); returns its export and training seconds."""
    from sdtrain.train.loop import train

    overrides = [
        "model.family=instruct-pix2pix", f"model.pretrained={base}", f"data.path={data / 'train'}",
        "data.conditions=[ref]", "data.condition_dropout=0.05", "data.caption_dropout=0.05", "data.resolution=64",
        "data.cache_latents=true", f"train.output_dir={out}", "train.batch_size=16", f"train.num_steps={steps}",
        "train.ema_decay=0.999", "train.log_every=50", f"train.save_every={steps}", "train.seed=0",
        f"train.optim.lr={lr}", "train.optim.warmup_steps=100", "train.optim.schedule=cosine",
        "train.optim.min_lr_ratio=0.1", "train.clip_norm=1.0",
        # the demo's objective (its scheduler's: v, zero terminal SNR), as it trained
        "train.objective.prediction_type=v_prediction", "train.objective.rescale_zero_terminal_snr=true",
        "train.objective.timestep_sampling=logit_normal", "sample.scheduler=euler_a", "sample.num_inference_steps=30",
    ]  # fmt: skip
    started = time.perf_counter()
    if not (out / "final" / "model_index.json").exists():
        train(load_config(Config, None, overrides))
    return out / "final", time.perf_counter() - started


def score(model: Path, data: Path, out: Path, guidance: float, image_guidance: float, steps: int) -> dict:
    """Edit success and mask IoU over the evaluation pairs (overall and by edited attribute); the grid."""
    import numpy as np
    from PIL import Image

    from sdtrain.evaluate.shapes import mask_iou, object_mask, read_image
    from sdtrain.sample.pipeline import Pipeline, make_grid

    pairs = load_edits(data / "eval")
    pipe = Pipeline.from_pretrained(model, device="cpu")
    rows, grid = [], []
    for i, (edit, source, target) in enumerate(pairs):
        before, expected = Image.open(source).convert("RGB"), Image.open(target).convert("RGB")
        (drawn,) = pipe.generate(edit.instruction(0), reference=before, seed=i, num_inference_steps=steps,
                                 guidance_scale=guidance, image_guidance_scale=image_guidance).images  # fmt: skip
        reading = read_image(drawn)
        right = reading.matches(edit.target)
        rows.append({"attribute": edit.attribute, "success": right["all"],
                     "iou": mask_iou(object_mask(drawn), object_mask(expected))})  # fmt: skip
        grid += [before, drawn, expected]
    out.mkdir(parents=True, exist_ok=True)
    make_grid(grid, 6).save(out / "edits.png")

    def summary(chosen: list[dict]) -> dict:
        return {"success": float(np.mean([r["success"] for r in chosen])),
                "iou": float(np.mean([r["iou"] for r in chosen])), "count": len(chosen)}  # fmt: skip

    by = {a: summary([r for r in rows if r["attribute"] == a]) for a in ("color", "background")}
    return summary(rows) | {"by_attribute": by}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("runs/demo/unet/final"), help="the demo's UNet export")
    parser.add_argument("--data", type=Path, default=Path("data/shapes-edit"), help="where the pairs are written")
    parser.add_argument("--runs", type=Path, default=Path("runs/edit"))
    parser.add_argument("--pairs", type=int, default=4000, help="training pairs")
    parser.add_argument("--eval-pairs", type=int, default=96)
    parser.add_argument("--steps", type=int, default=1500, help="training steps (16 pairs each)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--guidance", type=float, default=1.5, help="text guidance")
    parser.add_argument("--image-guidance", type=float, default=1.5)
    parser.add_argument("--sampling-steps", type=int, default=30)
    args = parser.parse_args()

    if not (args.base / "model_index.json").is_file():
        raise SystemExit(f"{args.base} is not the demo's export: run `make demo` first (or give --base)")
    data = write_edit_dataset(args.data, args.pairs, args.eval_pairs)
    run = args.runs / f"steps-{args.steps}-lr-{args.lr:g}"
    model, seconds = train_editor(args.base, data, run, args.steps, args.lr)
    started = time.perf_counter()
    scores = score(model, data, run, args.guidance, args.image_guidance, args.sampling_steps)
    row = {
        "steps": args.steps, "lr": args.lr, "guidance": args.guidance, "image_guidance": args.image_guidance,
        "edit_success": round(scores["success"], 4), "mask_iou": round(scores["iou"], 4),
        "color_success": round(scores["by_attribute"]["color"]["success"], 4),
        "background_success": round(scores["by_attribute"]["background"]["success"], 4),
        "pairs": scores["count"], "train_seconds": round(seconds, 1),
        "score_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print("| steps | lr | guidance (text / image) | edit success | mask IoU | colour | background | train s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['steps']} | {row['lr']:g} | {row['guidance']:g} / {row['image_guidance']:g} | "
          f"{row['edit_success']:.1%} | {row['mask_iou']:.3f} | {row['color_success']:.1%} | "
          f"{row['background_success']:.1%} | {row['train_seconds']:.0f} |")  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()

"""ControlNet benchmark: a ControlNet for the demo's model, made from its UNet as diffusers does, learns to place the
object where a control mask says; scored with the shapes oracle.

    python bench/controlnet.py                  # the demo's export in runs/demo/unet/final (make demo)
    python bench/controlnet.py --steps 1200 --lr 2e-4

Pairs (:func:`write_control_dataset`): a shapes image (the demo's renderer: one shape, its colour, a background)
and its object's mask (white on black, as the oracle segments it) as ``NAME.control.png``, captioned as the demo's
dataset captions. Training runs a fixed number of steps from a fixed seed, the demo's UNet frozen. Scores over
held-out masks (new layouts, every combination of the palette): each drawn once under its combination's prompt,
then
- IoU: the generated object's mask against the control mask;
- colour and background: the oracle reads the prompt's (both right: ``color_background``).
Writes ``RUNS/controls.png`` (a row per pair: the control, the drawing, the image the mask came from) and prints the
table and, last, the row as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdtrain.config import Config, load_config  # noqa: E402
from sdtrain.data.shapes import TEMPLATES, all_combos, render  # noqa: E402


def write_control_dataset(root: Path, count: int = 4000, num_eval: int = 48, size: int = 64, seed: int = 0) -> Path:
    """``root/train`` and ``root/eval``: shapes images, their object masks as ``NAME.control.png``, captions in a
    ``metadata.jsonl`` (the eval split's with the combination); reused when complete with the same settings."""
    import numpy as np
    from PIL import Image

    from sdtrain.data.shapes import Combo
    from sdtrain.evaluate.shapes import object_mask

    settings = {"count": count, "num_eval": num_eval, "size": size, "seed": seed}
    info = root / "controls.json"
    if info.exists() and json.loads(info.read_text()) == settings:
        return root
    for split, n, split_seed in (("train", count, seed), ("eval", num_eval, seed + 1_000_003)):
        rng = random.Random(split_seed)
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            combo: Combo = rng.choice(all_combos())
            template = 0 if split == "eval" else rng.randrange(len(TEMPLATES))
            image = render(combo, rng, size)
            image.save(folder / f"{i:06d}.png")
            mask = Image.fromarray(object_mask(image).astype(np.uint8) * 255).convert("RGB")
            mask.save(folder / f"{i:06d}.control.png")
            lines.append(json.dumps({"file_name": f"{i:06d}.png", "text": combo.caption(template), **combo.__dict__}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    info.write_text(json.dumps(settings))  # written last: marks the dataset complete
    return root


def train_controlnet(base: Path, data: Path, out: Path, steps: int, lr: float) -> tuple[Path, float]:
    """The ControlNet (reused when its export exists); returns its export and training seconds."""
    from sdtrain.train.loop import train

    overrides = [
        "model.family=sd-controlnet", f"model.pretrained={base}", f"data.path={data / 'train'}",
        "data.conditions=[control]", "data.caption_dropout=0.1", "data.resolution=64", "data.cache_latents=true",
        f"train.output_dir={out}", "train.batch_size=16", f"train.num_steps={steps}", "train.ema_decay=0.999",
        "train.log_every=50", f"train.save_every={steps}", "train.seed=0", f"train.optim.lr={lr}",
        "train.optim.warmup_steps=50", "train.optim.schedule=cosine", "train.optim.min_lr_ratio=0.1",
        "train.clip_norm=1.0",
        # the demo's objective (its scheduler's: v, zero terminal SNR), as its UNet trained
        "train.objective.prediction_type=v_prediction", "train.objective.rescale_zero_terminal_snr=true",
        "train.objective.timestep_sampling=logit_normal", "sample.scheduler=euler_a", "sample.num_inference_steps=30",
        "sample.guidance_scale=1.5",
    ]  # fmt: skip
    started = time.perf_counter()
    if not (out / "final" / "model_index.json").exists():
        train(load_config(Config, None, overrides))
    return out / "final", time.perf_counter() - started


def score(model: Path, data: Path, out: Path, guidance: float, steps: int) -> dict:
    """IoU with the control and the prompt's colour and background over the held-out masks; the grid."""
    import numpy as np
    from PIL import Image

    from sdtrain.data.shapes import Combo
    from sdtrain.evaluate.shapes import mask_iou, object_mask, read_image
    from sdtrain.sample.pipeline import Pipeline, make_grid

    pipe = Pipeline.from_pretrained(model, device="cpu")
    rows, grid = [], []
    for i, line in enumerate((data / "eval" / "metadata.jsonl").read_text().splitlines()):
        row = json.loads(line)
        combo = Combo(row["color"], row["shape"], row["background"])
        control = Image.open(data / "eval" / row["file_name"].replace(".png", ".control.png")).convert("RGB")
        (drawn,) = pipe.generate(combo.caption(0), control=control, seed=i, num_inference_steps=steps,
                                 guidance_scale=guidance).images  # fmt: skip
        reading = read_image(drawn).matches(combo)
        wanted = np.asarray(control)[..., 0] > 127
        rows.append({"iou": mask_iou(object_mask(drawn), wanted), "color": reading["color"],
                     "background": reading["background"], "shape": reading["shape"]})  # fmt: skip
        grid += [control, drawn, Image.open(data / "eval" / row["file_name"]).convert("RGB")]
    out.mkdir(parents=True, exist_ok=True)
    make_grid(grid, 6).save(out / "controls.png")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("iou", "color", "background", "shape")}
    return mean | {"color_background": float(np.mean([r["color"] and r["background"] for r in rows])),
                   "count": len(rows)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("runs/demo/unet/final"), help="the demo's UNet export")
    parser.add_argument("--data", type=Path, default=Path("data/shapes-control"), help="where the pairs are written")
    parser.add_argument("--runs", type=Path, default=Path("runs/controlnet"))
    parser.add_argument("--steps", type=int, default=900, help="training steps (16 pairs each)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--sampling-steps", type=int, default=30)
    args = parser.parse_args()

    if not (args.base / "model_index.json").is_file():
        raise SystemExit(f"{args.base} is not the demo's export: run `make demo` first (or give --base)")
    data = write_control_dataset(args.data)
    run = args.runs / f"steps-{args.steps}-lr-{args.lr:g}"
    model, seconds = train_controlnet(args.base, data, run, args.steps, args.lr)
    started = time.perf_counter()
    s = score(model, data, run, args.guidance, args.sampling_steps)
    row = {
        "steps": args.steps, "lr": args.lr, "guidance": args.guidance, "iou": round(s["iou"], 4),
        "color_background": round(s["color_background"], 4), "color": round(s["color"], 4),
        "background": round(s["background"], 4), "shape": round(s["shape"], 4), "masks": s["count"],
        "train_seconds": round(seconds, 1), "score_seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print("| steps | lr | IoU with the control | colour and background | colour | background | shape | train s |")
    print("|---|---|---|---|---|---|---|---|")
    cells = [f"{row[k]:.1%}" for k in ("color_background", "color", "background", "shape")]
    print(f"| {row['steps']} | {row['lr']:g} | {row['iou']:.3f} | {' | '.join(cells)} | {row['train_seconds']:.0f} |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()

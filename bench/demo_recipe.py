"""One recipe of the demo's second stage, trained for a fixed number of steps and scored as `make demo` scores it.

    python bench/demo_recipe.py --config demo train.optim.lr=2e-3 train.ema_decay=0.995
    python bench/demo_recipe.py --config demo-dit --name dit-lr2 train.optim.lr=2e-3

The shapes dataset (``--data``) and the demo's autoencoder (``--vae``; trained with the ``demo-vae`` preset when the
folder holds none, as an AutoencoderDC in ``runs/recipes/vae-dc`` for a Sana transformer) are shared by every recipe;
each recipe trains into ``--runs/NAME`` from scratch (an existing folder is reused: its export is scored again). The
overrides apply on top of the preset, as ``sdtrain train`` takes them; ``--guidance`` / ``--scheduler`` /
``--sampling-steps`` score the same model with other sampling settings, and ``--curve`` each checkpoint the run kept
(all three, seen and held out, by step: the row's ``curve``). Prints the row as JSON on its last line: the config, the
overrides, steps, images per step, training seconds and images per second on this machine, and the seen and held-out
scores (colour, shape, background, all three).

The training seed moves the demo's seen score by up to 10 points (docs/demo.md), more than most recipe changes, so
a change is judged over several seeds: ``--train-seeds 0,1,2`` trains the recipe once per seed (``train.seed``), each
in ``--runs/NAME-seedN`` (reused when there), prints each seed's row, and on the last line the seeds' all-three
scores with their mean, lowest and highest:

    python bench/demo_recipe.py --config demo --name b8-3400 --train-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdtrain.config import PRESETS, AutoencoderConfig, Config, load_config  # noqa: E402
from sdtrain.data.shapes import write_shapes_dataset  # noqa: E402
from sdtrain.demo import AUTOENCODER_KIND, EDIT_STRENGTH, autoencoder_overrides  # noqa: E402
from sdtrain.models.families import for_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="the denoiser's preset (demo, demo-dit) or a YAML file")
    parser.add_argument("--name", default=None, help="the run's folder under --runs (default: a hash of the recipe)")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="the autoencoder's run folder (default: runs/recipes/vae; vae-dc for Sana)",
    )
    parser.add_argument("--vae-steps", type=int, default=None, help="the autoencoder's steps (default: demo-vae's)")
    parser.add_argument("--runs", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--sampling-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed")
    parser.add_argument(
        "--curve", action="store_true", help="also score every kept checkpoint (keep them: train.keep_checkpoints=N)"
    )
    parser.add_argument(
        "--train-seeds",
        type=seeds,
        default=None,
        help="comma-separated training seeds: one run each, and their mean (e.g. 0,1,2)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.train_seeds is None:
        print(json.dumps(run(args, args.name, args.overrides)))
        return
    name = args.name or recipe_hash(args.config, args.overrides)
    rows = []
    for seed in args.train_seeds:
        rows.append(run(args, f"{name}-seed{seed}", args.overrides + [f"train.seed={seed}"]))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"config": args.config, "name": name, "overrides": args.overrides, "train_seeds": args.train_seeds}
    for part in ("seen", "held_out"):
        scores = [row[part]["all"] for row in rows]
        mean = round(sum(scores) / len(scores), 4)
        summary |= {part: scores, f"{part}_mean": mean, f"{part}_min": min(scores), f"{part}_max": max(scores)}
    print(json.dumps(summary))


def seeds(text: str) -> list[int]:
    """``--train-seeds``: comma-separated integers."""
    return [int(seed) for seed in text.split(",")]


def recipe_hash(config: str, overrides: list[str]) -> str:
    """The default run name: a hash of the preset and its overrides."""
    return hashlib.sha1(json.dumps([config, overrides]).encode()).hexdigest()[:10]


def run(args: argparse.Namespace, name: str | None, recipe: list[str]) -> dict:
    """Train the recipe (``--config`` with the ``recipe`` overrides) into ``--runs/name`` unless it is there, score
    it, and return its row."""
    write_shapes_dataset(args.data)
    family = for_config(load_config(Config, args.config, recipe).model).name
    kind = AUTOENCODER_KIND.get(family)  # the autoencoder its pipeline holds, in a folder of its own
    runs = args.vae or Path("runs/recipes") / (f"vae-{kind}" if kind else "vae")
    vae = runs / "final"
    if not (vae / "metrics.json").exists():
        from sdtrain.train.autoencoder import train_autoencoder

        overrides = [f"data.path={args.data / 'train'}", f"eval_data={args.data / 'eval'}"]
        overrides += autoencoder_overrides(family)
        overrides += [f"train.num_steps={args.vae_steps}"] if args.vae_steps else []
        train_autoencoder(load_config(AutoencoderConfig, PRESETS / "demo-vae.yaml", overrides + [
            f"train.output_dir={runs}"]))  # fmt: skip
    name = name or recipe_hash(args.config, recipe)
    out = args.runs / name
    overrides = [f"data.path={args.data / 'train'}", f"model.vae.path={vae}", f"train.output_dir={out}"]
    config = load_config(Config, args.config, overrides + recipe)
    started = time.perf_counter()
    if not (out / "final" / "model_index.json").exists():
        from sdtrain.train.loop import train

        train(config)
    seconds = time.perf_counter() - started

    from sdtrain.evaluate.report import evaluate_shapes_model

    sample = config.sample
    settings = {
        "guidance_scale": args.guidance or sample.guidance_scale,
        "num_inference_steps": args.sampling_steps or sample.num_inference_steps,
        "scheduler": args.scheduler or sample.scheduler,
        "edit_strength": EDIT_STRENGTH,
        "seed": args.seed,
    }
    tag = f"{settings['scheduler']}-{settings['guidance_scale']}-{args.seed}"
    tag += f"-{args.sampling_steps}steps" if args.sampling_steps else ""  # its own folder: the preset's eval stays
    scores = evaluate_shapes_model(out / "final", args.data, out / f"eval-{tag}", **settings)
    curve = {}
    for checkpoint in sorted((out / "checkpoints").glob("step-*")) if args.curve else []:
        from sdtrain.train.export import export_checkpoint

        step = int(checkpoint.name.removeprefix("step-"))
        model = export_checkpoint(out, step)
        at = evaluate_shapes_model(model, args.data, model / f"eval-{tag}", **settings)
        curve[step] = {"seen": round(at["seen"]["all"], 4), "held_out": round(at["held_out"]["all"], 4)}
        print(json.dumps({"step": step} | curve[step]), flush=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    steps = config.train.num_steps
    row = {
        "config": args.config,
        "name": name,
        "overrides": recipe,
        "steps": steps,
        "batch": config.train.batch_size,
        "train_s": round(seconds, 1),
        "images_per_s": round(sum(r["images_per_s"] for r in log[1:]) / max(1, len(log) - 1), 1),
        "final_loss": round(log[-1]["loss"], 4),
        "sampler": f"{scores['scheduler']} {scores['guidance_scale']} x{scores['num_inference_steps']}",
        "seen": {k: round(v, 4) for k, v in scores["seen"].items()},
        "held_out": {k: round(v, 4) for k, v in scores["held_out"].items()},
    }
    if curve:
        row["curve"] = curve
    return row


if __name__ == "__main__":
    main()

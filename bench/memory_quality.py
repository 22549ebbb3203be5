"""Quality over a quantised base: a LoRA fine-tune of the demo's UNet on the shapes it never saw (its 12 held-out
combinations), the same data, steps and seed over a base held in fp32, fp8, int8 and nf4, scored by the shapes
oracle: what each learned (held-out prompts) and what it forgot (seen prompts).

    python bench/memory_quality.py --base runs/demo/unet/final          # a demo export (make demo writes one)

Every run trains in fp32 compute (``train.mixed_precision=no``), so the rows differ by how the frozen base is held
and nothing else; a last row holds the base in bf16 under bf16 autocast, as a bf16 run does. Prints the table, the
loss curves (every 25 steps) and the rows as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdtrain.config import Config, load_config  # noqa: E402
from sdtrain.data.shapes import TEMPLATES, load_combos, render  # noqa: E402

MODES = {  # row: (model.quantize, train.mixed_precision)
    "fp32": ("none", "no"),
    "fp8": ("fp8", "no"),
    "int8": ("int8", "no"),
    "nf4": ("nf4", "no"),
    "bf16": ("none", "bf16"),
}


def write_held_out(data: Path, out: Path, per_combo: int, seed: int = 0) -> Path:
    """``per_combo`` images of each held-out combination of the shapes dataset at ``data``, with random caption
    templates, as an image folder (the LoRA's training data)."""
    if (out / "metadata.jsonl").exists():
        return out
    _, held_out = load_combos(data)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(per_combo * len(held_out)):
        combo = held_out[i % len(held_out)]
        render(combo, rng).save(out / f"{i:06d}.png")
        lines.append(json.dumps({"file_name": f"{i:06d}.png", "text": combo.caption(rng.randrange(len(TEMPLATES)))}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def run(base: Path, data: Path, runs: Path, mode: str, steps: int, rank: int, lr: float, per_combo: int) -> dict:
    """Train one row's LoRA (reused when its export exists) and score it."""
    from sdtrain.train.loop import train
    from sdtrain.train.tracking import read_log

    if mode == "before":  # the base itself, untrained: what the rows learned and forgot is against it
        return score(base, data, per_combo, runs / "before") | {"mode": mode, "loss_curve": []}
    quantize, precision = MODES[mode]
    out = runs / mode
    overrides = [
        f"model.pretrained={base}", f"model.quantize={quantize}", f"data.path={runs / 'held-out'}",
        "data.resolution=64", "data.cache_latents=true", f"train.output_dir={out}", "train.batch_size=16",
        f"train.num_steps={steps}", f"train.mixed_precision={precision}", f"train.lora.rank={rank}",
        f"train.optim.lr={lr}", "train.optim.warmup_steps=20", "train.ema_decay=null", "train.log_every=25",
        f"train.save_every={steps}", "train.seed=0", "sample.scheduler=euler_a", "sample.guidance_scale=1.5",
        "sample.num_inference_steps=30",
        # the demo's objective (its scheduler's: v, zero terminal SNR), as it trained
        "train.objective.prediction_type=v_prediction", "train.objective.rescale_zero_terminal_snr=true",
        "train.objective.timestep_sampling=logit_normal",
    ]  # fmt: skip
    if not (out / "final" / "model_index.json").exists():
        train(load_config(Config, None, overrides))
    curve = [(r["step"], round(r["loss"], 4)) for r in read_log(out / "log.jsonl") if "loss" in r]
    return score(out / "final", data, per_combo, out) | {"mode": mode, "loss_curve": curve}


def score(model: Path, data: Path, per_combo: int, out: Path) -> dict:
    """The oracle's scores of ``model``: ``per_combo`` images of each held-out combination, 2 of each seen one
    (euler_a, 30 steps, guidance 1.5: the demo's sampling); the held-out images' grid in ``out/held_out.png`` (a
    row per combination)."""
    from sdtrain.evaluate.report import adherence
    from sdtrain.sample.pipeline import Pipeline, make_grid

    seen, held_out = load_combos(data)
    pipe = Pipeline.from_pretrained(model, device="cpu")
    settings = {"guidance_scale": 1.5, "num_inference_steps": 30, "seed": 0}
    learned, images = adherence(pipe, held_out, per_combo, **settings)
    out.mkdir(parents=True, exist_ok=True)
    make_grid(images, per_combo).save(out / "held_out.png")
    kept, _ = adherence(pipe, seen, 2, **settings)
    return {"held_out": learned, "seen": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("runs/demo/unet/final"), help="a demo export")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="the demo's shapes dataset")
    parser.add_argument("--runs", type=Path, default=Path("runs/memory-quality"))
    parser.add_argument("--mode", choices=["before", *MODES], action="append", help="rows (default: all)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images-per-combo", type=int, default=8, help="held-out images scored per combination")
    args = parser.parse_args()

    write_held_out(args.data, args.runs / "held-out", per_combo=32)
    rows = []
    for mode in args.mode or ["before", *MODES]:
        row = run(args.base, args.data, args.runs, mode, args.steps, args.rank, args.lr, args.images_per_combo)
        rows.append(row)
        print(f"{mode}: held out all three {row['held_out']['all']:.1%}, seen {row['seen']['all']:.1%}", flush=True)
    print("| base | held out: colour / shape / background / all three | seen: all three | last loss |")
    print("|---|---|---|---|")
    for r in rows:
        h = r["held_out"]
        print(f"| {r['mode']} | {h['color']:.1%} / {h['shape']:.1%} / {h['background']:.1%} / {h['all']:.1%} | "
              f"{r['seen']['all']:.1%} | {r['loss_curve'][-1][1] if r['loss_curve'] else '-'} |")  # fmt: skip
    for r in rows:
        print(f"{r['mode']} loss: " + " ".join(f"{step}:{loss}" for step, loss in r["loss_curve"]))
    print(json.dumps({"steps": args.steps, "rank": args.rank, "lr": args.lr, "rows": rows}))


if __name__ == "__main__":
    main()

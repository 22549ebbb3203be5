"""Personalisation benchmark: teach the demo's model a colour it never saw under a new word, from 8 images, by each
method sdtrain has, and measure what it learned and what it forgot, with the shapes oracle.

    python bench/personalize.py --base runs/demo/unet/final                     # every method, teal as "zqx"
    python bench/personalize.py --concept pink=250,120,190 --token vbn --method recommended

The 8 images show the colour as a circle, square or triangle on four of the six backgrounds, captioned in the
dataset's phrasings with the word where the colour name would be. Each method trains the same fixed number of steps
from the same seed (the same result on a busy machine). Scores, from the same prompts and seeds for every method:
- concept: the oracle's all-three accuracy on "a WORD SHAPE on a BACKGROUND background" for every shape and every
  background but the colour itself (18 combinations, 10 absent from the 8 images), the oracle's palette extended by
  the colour (for scoring only);
- drift: how many points the demo's seen all-three score drops from the base to the trained model.
A word the demo's tokenizer (MiniLM's WordPiece) splits is what a new word is to it, so the LoRA methods train it
with ``data.allow_split_trigger=true``; textual inversion adds it as a new token. Prints a line per method, the table,
and the last line: the row as JSON (``--method NAME``), or every row.
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
from sdtrain.data.shapes import COLORS, SHAPES, TEMPLATES, Combo, load_combos, render  # noqa: E402

# the 8 training images: (shape, background), backgrounds from four of the six
TRAINING = [("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("circle", "green"),
            ("square", "red"), ("triangle", "blue"), ("circle", "yellow"), ("square", "green")]  # fmt: skip
CLASS_WORD = "green"  # the known colour standing for the class (prior images, base regularisation)
# LoRA beyond attention: the transformer blocks' projections and feed-forwards, each resblock's projection of the time
# embedding and the pooled-text embedding added to it (the demo UNet's highest-resolution level has no attention: a
# colour reaches it through that path alone)
WIDE_TARGETS = "[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,time_emb_proj,add_embedding.proj]"


def methods(concept: Path, classes: Path, word: str) -> dict[str, list[str]]:
    """Each method's overrides on top of the common ones (:func:`train_method`)."""
    lora = ["train.lora.rank=16", "train.optim.lr=2e-4", f"data.trigger={word}", "data.allow_split_trigger=true"]
    ti = [f"train.textual_inversion.tokens=[{word}]", "train.textual_inversion.init=[colour]",
          "train.textual_inversion.lr=5e-3", "train.textual_inversion.vectors=2"]  # fmt: skip
    preserve = f"data.datasets=[{{path: '{concept}', trigger: {CLASS_WORD}, target: base}}]"
    # the same images under each word of the class (every colour the model knows), towards the base: half the batches
    every_word = ", ".join(f"{{path: '{concept}', trigger: {color}, target: base, weight: 1}}" for color in COLORS)
    preserve_all = [f"data.weight={len(COLORS)}", f"data.datasets=[{every_word}]"]
    wide = [f"train.lora.target_modules={WIDE_TARGETS}", "train.optim.lr=1e-3"]  # at 5x the rate
    prior = [f"data.prior.path={classes}", f"data.prior.prompt='a {CLASS_WORD} circle on a red background'",
             "data.prior.count=16", "data.prior.share=0.25"]  # fmt: skip
    return {
        "lora": lora,
        "lora_prior": lora + prior,
        # the same images with the class word for the trigger, trained towards the base's prediction: half the batches
        "lora_base": lora + [preserve],
        "ti": ti + ["train.optim.lr=5e-3", f"data.trigger={word}"],
        "pivotal": ti + lora,
        "pivotal_base": ti + lora + [preserve],
        # pivotal + base regularisation, LoRA on the whole path a colour takes, regularised under every class word:
        # the recommended recipe
        "pivotal_full": ti + lora + wide + preserve_all,
        "dora": lora + ["train.lora.variant=dora"],
        "loha": lora + ["train.lora.variant=loha", "train.lora.rank=8"],
        "lokr": lora + ["train.lora.variant=lokr", "train.lora.rank=8"],
    }


RECOMMENDED = "pivotal_full"  # what docs/personalisation.md recommends, from this benchmark's table


def write_concept(out: Path, word: str, rgb: tuple[int, int, int], seed: int = 0) -> Path:
    """The 8 images of the colour with captions (``[trigger]`` where the colour's name would be)."""
    if (out / "metadata.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    colors = dict(COLORS) | {word: rgb}
    rng = random.Random(seed)
    lines = []
    for i, (shape, background) in enumerate(TRAINING):
        combo = Combo(word, shape, background)
        render(combo, rng, colors=colors).save(out / f"{i:03d}.png")
        caption = TEMPLATES[i % len(TEMPLATES)].format(color="[trigger]", shape=shape, background=background)
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def check_autoencoder(base: Path, concept: Path, word: str, rgb: tuple[int, int, int]) -> float:
    """How far (RGB distance) the base's autoencoder moves the colour (encoded and decoded, the objects' median):
    a colour it cannot draw cannot be taught to the denoiser above it. Raises SystemExit where the oracle would read
    the reconstruction as another colour."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from sdtrain.evaluate.shapes import nearest_color

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(concept.glob("*.png"))]
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    out = ((y.permute(0, 2, 3, 1) + 1) * 127.5).numpy()
    near = np.abs(np.stack(images) - np.array(rgb)).sum(-1) < 60  # the objects' pixels
    drawn = np.median(out[near], axis=0)
    distance = float(np.sqrt(((drawn - np.array(rgb)) ** 2).sum()))
    if nearest_color(drawn, dict(COLORS) | {word: rgb}) != word:
        raise SystemExit(
            f"the base's autoencoder draws {rgb} as {tuple(drawn.round().astype(int))}: it cannot draw "
            "this colour, so no method can teach it (train the autoencoder with train.color_augment)"
        )
    return distance


def train_method(
    name: str, base: Path, runs: Path, concept: Path, word: str, steps: int, extra: list[str]
) -> tuple[Path, float]:
    """Train one method (reused when its export exists); returns its export and training seconds."""
    from sdtrain.train.loop import train

    out = runs / name
    overrides = [
        f"model.pretrained={base}", f"data.path={concept}", "data.resolution=64", "data.caption_dropout=0.1",
        f"train.output_dir={out}", "train.batch_size=8", f"train.num_steps={steps}", "train.ema_decay=null",
        "train.log_every=25", f"train.save_every={steps}", "train.seed=0", "train.optim.warmup_steps=20",
        "sample.scheduler=euler_a", "sample.guidance_scale=1.5", "sample.num_inference_steps=30",
        # the demo's objective (its scheduler's: v, zero terminal SNR), as it trained
        "train.objective.prediction_type=v_prediction", "train.objective.rescale_zero_terminal_snr=true",
        "train.objective.timestep_sampling=logit_normal",
    ] + methods(concept, runs / "classes", word)[name] + extra  # fmt: skip
    started = time.perf_counter()
    if not (out / "final" / "model_index.json").exists():
        train(load_config(Config, None, overrides))
    return out / "final", time.perf_counter() - started


def score(model: Path, data: Path, word: str, rgb: tuple[int, int, int], out: Path, per_combo: int) -> dict:
    """concept (every shape on every other background, ``per_combo`` seeds each) and the seen all-three score (2
    seeds per seen combination), euler_a, 30 steps, guidance 1.5 (the demo's sampling); the concept grid in
    ``out/concept.png``, a row per combination."""
    from sdtrain.evaluate.report import adherence
    from sdtrain.sample.pipeline import Pipeline, make_grid

    seen, _ = load_combos(data)
    pipe = Pipeline.from_pretrained(model, device="cpu")
    settings = {"guidance_scale": 1.5, "num_inference_steps": 30, "seed": 0}
    targets = [Combo(word, shape, background) for shape in SHAPES for background in COLORS]
    learned, images = adherence(pipe, targets, per_combo, **settings, colors=dict(COLORS) | {word: rgb})
    out.mkdir(parents=True, exist_ok=True)
    make_grid(images, per_combo).save(out / "concept.png")
    kept, _ = adherence(pipe, seen, 2, **settings)
    return {"concept": learned, "seen": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("runs/demo/unet/final"), help="the demo's UNet export")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="the demo's shapes dataset")
    parser.add_argument("--runs", type=Path, default=None, help="default: runs/personalize/NAME")
    parser.add_argument("--concept", default="teal=0,140,140", help="NAME=R,G,B: the colour to teach")
    parser.add_argument("--token", default="zqx", help="the new word the colour is taught as")
    parser.add_argument("--method", action="append", help="methods to run (default: all; 'recommended')")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--images-per-combo", type=int, default=4, help="concept images scored per combination")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every method, after its own (use another --runs)")  # fmt: skip
    args = parser.parse_args()

    name, rgb_text = args.concept.split("=")
    rgb = tuple(int(v) for v in rgb_text.split(","))
    runs = args.runs or Path("runs/personalize") / name
    concept = write_concept(runs / "concept", args.token, rgb)
    vae_error = check_autoencoder(args.base, concept, args.token, rgb)
    chosen = [RECOMMENDED if m == "recommended" else m for m in (args.method or list(methods(concept, runs, "w")))]
    before = runs / "before" / "scores.json"
    if not before.exists():
        before.parent.mkdir(parents=True, exist_ok=True)
        before.write_text(json.dumps(score(args.base, args.data, args.token, rgb, before.parent,
                                           args.images_per_combo)))  # fmt: skip
    base_scores = json.loads(before.read_text())
    rows = []
    for method in chosen:
        model, seconds = train_method(method, args.base, runs, concept, args.token, args.steps, args.set)
        scores = score(model, args.data, args.token, rgb, runs / method, args.images_per_combo)
        row = {
            "method": method, "concept_name": name, "token": args.token, "steps": args.steps,
            "concept": round(scores["concept"]["all"], 4),
            "drift": round(100 * (base_scores["seen"]["all"] - scores["seen"]["all"]), 1),
            "concept_color": round(scores["concept"]["color"], 4), "seen": round(scores["seen"]["all"], 4),
            "seen_before": round(base_scores["seen"]["all"], 4),
            "concept_before": round(base_scores["concept"]["all"], 4), "train_seconds": round(seconds, 1),
            "autoencoder_color_error": round(vae_error, 1), "overrides": args.set,
        }  # fmt: skip
        rows.append(row)
        print(f"{method}: concept {row['concept']:.1%} (colour {row['concept_color']:.1%}), drift {row['drift']} "
              f"points, {seconds:.0f} s", flush=True)  # fmt: skip
    print("| method | concept (all three) | concept colour | seen all three | drift (points) | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['concept']:.1%} | {r['concept_color']:.1%} | {r['seen']:.1%} | {r['drift']} | "
              f"{r['train_seconds']:.0f} |")  # fmt: skip
    print(json.dumps(rows[0] if len(rows) == 1 else rows))


if __name__ == "__main__":
    main()

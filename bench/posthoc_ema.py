"""EMA averages of other lengths, rebuilt after training from a demo run's snapshots, and scored as the demo scores.

    python bench/demo_recipe.py --config demo --name snap train.save_every=100 train.keep_checkpoints=40
    python bench/posthoc_ema.py runs/recipes/snap --power 0.75        # diffusers' warm-up at power 3/4
    python bench/posthoc_ema.py runs/recipes/snap --power 1 --cap 1   # the plain mean of every step

The EMA of a run is a weighted sum of the weights after each step. With diffusers' warm-up of power ``p`` (the one
``train.ema_decay`` caps), step ``k``'s decay is ``d_k = min(cap, 1 - k ** -p)`` and the weights after step ``k``
have the share ``(1 - d_k) * d_{k+1} * ... * d_T`` at the last step ``T``. The run keeps its weights only every few
steps (its checkpoints), so step ``k``'s weights are taken as the two snapshots around it interpolated; the rebuild
of the run's own EMA (``--power 2/3``) says how far that is from the real one (printed: the distance from the
checkpoint's EMA, over the raw weights' distance from it). Writes the run's export with the rebuilt average as its
UNet (or transformer, for ``demo-dit``'s runs) to ``RUN/posthoc-pP`` (``-capC`` added with ``--cap``) and prints
the scores as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def shares(snapshots: list[int], power: float, cap: float) -> dict[int, float]:
    """Each snapshot's share of the average at the last one (step ``k``'s decay: diffusers' ``get_decay(k)``)."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.zeros(1)], decay=cap, use_ema_warmup=True, power=power)
    last = snapshots[-1]
    weight, tail = [0.0] * (last + 1), 1.0
    for k in range(last, 0, -1):
        decay = ema.get_decay(k)
        weight[k], tail = (1 - decay) * tail, tail * decay
    weight[0] += tail
    share = dict.fromkeys(snapshots, 0.0)
    for k, w in enumerate(weight):
        after = next(s for s in snapshots if s >= k)
        before = max((s for s in snapshots if s < k), default=None)
        if before is None:
            share[after] += w
        else:
            f = (k - before) / (after - before)
            share[before] += w * (1 - f)
            share[after] += w * f
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with checkpoints/step-* (keep them all)")
    parser.add_argument("--power", type=float, default=2 / 3, help="the warm-up's power (the run's own: 2/3)")
    parser.add_argument("--cap", type=float, default=None, help="the largest decay (default: the run's ema_decay)")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed")
    args = parser.parse_args()

    import yaml

    from sdtrain.demo import EDIT_STRENGTH
    from sdtrain.evaluate.report import evaluate_shapes_model

    config = yaml.safe_load((args.run / "config.yaml").read_text())
    cap = args.cap if args.cap is not None else config["train"]["ema_decay"] or 1.0
    folders = sorted((args.run / "checkpoints").glob("step-*"))
    denoiser = "unet" if (folders[-1] / "unet.safetensors").exists() else "transformer"  # the UNet or a DiT
    steps = [int(f.name.removeprefix("step-")) for f in folders]
    share = shares(steps, args.power, cap)
    average: dict[str, torch.Tensor] = {}
    for step, folder in zip(steps, folders):
        if share[step] > 1e-9:
            for name, tensor in load_file(folder / f"{denoiser}.safetensors").items():
                average[name] = average.get(name, 0) + share[step] * tensor.double()
    total = sum(share.values())
    average = {name: (tensor / total).float().contiguous() for name, tensor in average.items()}
    real, raw = load_file(folders[-1] / "ema.safetensors"), load_file(folders[-1] / f"{denoiser}.safetensors")
    off = sum(((average[n] - real[n]) ** 2).sum() for n in real).sqrt()
    span = sum(((raw[n] - real[n]) ** 2).sum() for n in real).sqrt()

    out = args.run / (f"posthoc-p{args.power:.3g}" + (f"-cap{args.cap:g}" if args.cap is not None else ""))
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(args.run / "final", out, ignore=shutil.ignore_patterns("eval-*"))
    save_file(average, out / denoiser / "diffusion_pytorch_model.safetensors")
    sample = config["sample"]
    scores = evaluate_shapes_model(
        out, args.data, out / f"eval-{args.seed}", guidance_scale=sample["guidance_scale"],
        num_inference_steps=sample["num_inference_steps"], scheduler=sample["scheduler"],
        edit_strength=EDIT_STRENGTH, seed=args.seed,
    )  # fmt: skip
    print(json.dumps({
        "run": str(args.run), "power": args.power, "cap": cap, "snapshots": len(steps),
        "off_real_ema": round(float(off / span), 4),
        "seen": {k: round(v, 4) for k, v in scores["seen"].items()},
        "held_out": {k: round(v, 4) for k, v in scores["held_out"].items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()

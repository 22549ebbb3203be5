"""The EMA update per optimizer step: sdtrain's (one ``_foreach_lerp_``; with ``train.ema_every``) vs diffusers'
``EMAModel.step`` (foreach), same weights, same process.

    python bench/ema_update.py            # CPU: a UNet of SD 1.5's layout at half its widths (~215M parameters)
    python bench/ema_update.py --sd15     # SD 1.5's UNet (860M parameters), on the GPU if there is one

Each side averages the same fp32 weights into its own copy (the cost does not depend on the numbers). Prints mean
milliseconds per optimizer step (with ``ema_every=10``, over steps that average and steps that do not) and the ratio
to diffusers'.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdtrain.train.ema import EMA


def unet_weights(sd15: bool, device: torch.device) -> list[torch.nn.Parameter]:
    widths = (320, 640, 1280, 1280) if sd15 else (160, 320, 640, 640)
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=widths, cross_attention_dim=768)
    g = torch.Generator(device).manual_seed(0)
    return [torch.nn.Parameter(torch.randn(p.shape, generator=g, device=device) * 0.02) for p in unet.parameters()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_step(update, device: torch.device, steps: int, warmup: int) -> float:
    """Mean milliseconds per optimizer step of ``update()`` over ``steps`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        update()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        update()
    _sync(device)
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's UNet (860M parameters)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = unet_weights(args.sd15, device)
    model = torch.nn.ParameterList(weights)  # what EMA.tick reads the trainable weights from
    count = sum(w.numel() for w in weights)
    print(f"torch {torch.__version__}, {device}, {count / 1e6:.0f}M parameters, {args.steps} timed steps per side")
    theirs = EMAModel(weights, decay=0.9999, use_ema_warmup=True, power=2 / 3, foreach=True)
    base = per_step(partial(theirs.step, weights), device, args.steps, args.warmup)
    del theirs  # one average in memory at a time
    rows = [("diffusers EMAModel.step (foreach)", base)]
    for every in (1, 10):
        ours = EMA(weights, 0.9999, every=every)
        rows.append((f"sdtrain EMA, ema_every={every}", per_step(partial(ours.tick, model), device, args.steps, 0)))
        del ours
    print("| side | ms per optimizer step | ratio to diffusers |")
    print("|---|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.2f} | {base / ms:.2f} |")


if __name__ == "__main__":
    main()

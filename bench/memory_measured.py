"""The pre-flight memory estimate against the real peak of training steps, on the CPU: a mid-size UNet and MMDiT
(random weights, a few hundred million parameters) trained two AdamW steps in each mode of issue 27 (a full
fine-tune; LoRA over an fp32, a bf16, an fp8, an int8 and an nf4 base, with and without gradient checkpointing).

Each row runs in a fresh process: glibc returns every large block to the system at once (``MALLOC_MMAP_THRESHOLD_``),
the peak resident set is reset once the model is placed (``/proc/self/clear_refs``), and the peak of the steps less
the resident set before the model was built is the step's memory: weights, gradients, optimizer state, activations
and whatever else torch holds. The estimate is :func:`sdtrain.train.perf.estimate_memory` of the same model as
placed, as ``sdtrain train`` prints it.

    python bench/memory_measured.py            # every row (about 10 minutes on 2 cores), the table, JSON last
    python bench/memory_measured.py --kind unet --mode lora-nf4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("unet", "mmdit")
# mode: (LoRA rank, mixed precision, base quantisation, gradient checkpointing)
MODES = {
    "full": (0, "no", "none", False),
    "full-bf16": (0, "bf16", "none", False),
    "lora": (16, "no", "none", False),
    "lora-bf16": (16, "bf16", "none", False),
    "lora-bf16-ckpt": (16, "bf16", "none", True),
    "lora-fp8": (16, "bf16", "fp8", True),
    "lora-int8": (16, "bf16", "int8", True),
    "lora-nf4": (16, "bf16", "nf4", True),
}
LATENT = 32  # 256 px under an f8 autoencoder
BATCH = 2


def _rss(field: str = "VmRSS") -> float:
    """A field of /proc/self/status in bytes (VmRSS now, VmHWM the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024
    raise RuntimeError(field)


def _build(kind: str, small: bool = False):
    """The model (``small``: an eighth of its widths), its family's predict, the conditioning of a batch, its latent
    shape and LoRA targets (random weights)."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from sdtrain.models.families.sd import predict as unet_predict
    from sdtrain.models.families.sd3 import predict as mmdit_predict

    torch.manual_seed(0)
    if kind == "unet":  # SD 1.5's layout at 0.6 of its widths: 0.32 B parameters
        widths = (24, 48, 96, 96) if small else (192, 384, 768, 768)
        model = UNet2DConditionModel(block_out_channels=widths, cross_attention_dim=768, attention_head_dim=8,
                                     norm_num_groups=8 if small else 32)  # fmt: skip
        cond = {"encoder_hidden_states": torch.randn(BATCH, 77, 768)}
        return model, unet_predict, cond, (4, LATENT, LATENT), ("to_q", "to_k", "to_v", "to_out.0")
    heads = 2 if small else 16
    model = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if small else 12,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=1024, caption_projection_dim=64 * heads,
        pooled_projection_dim=768, pos_embed_max_size=64,
    )  # fmt: skip
    cond = {"encoder_hidden_states": torch.randn(BATCH, 77, 1024), "pooled_projections": torch.randn(BATCH, 768)}
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    return model, mmdit_predict, cond, (16, LATENT, LATENT), targets


def _warm_up(kind: str, half) -> None:
    """A training step of a small model of the same kind and precision: what a first step loads (kernels, thread
    scratch) is then part of the baseline."""
    import torch

    model, predict, cond, shape, _ = _build(kind, small=True)
    autocast = torch.autocast("cpu", dtype=half) if half else torch.autocast("cpu", enabled=False)
    with autocast:
        out = predict(model, torch.randn(BATCH, *shape), torch.tensor([300, 700]), cond)
    out.float().square().mean().backward()
    del model, out
    gc.collect()


def one(kind: str, mode: str) -> dict:
    """One row, in this process."""
    import torch

    from sdtrain.config import LoRAConfig, TrainConfig
    from sdtrain.models.lora import add_lora
    from sdtrain.models.quantize import hold_in, quantize
    from sdtrain.train.perf import GiB, estimate_memory, profile_denoiser

    torch.set_num_threads(os.cpu_count() or 1)
    rank, precision, base, checkpointing = MODES[mode]
    half = torch.bfloat16 if precision == "bf16" else None
    _warm_up(kind, half)  # torch's kernels and thread buffers are loaded before the baseline, not counted
    before = _rss()
    model, predict, cond, shape, targets = _build(kind)
    if rank:  # as sdtrain.train.placement holds a LoRA base, then the adapters in fp32
        if base != "none":
            quantize(model, base, half or torch.float32, "cpu")
        elif half:
            hold_in(model.requires_grad_(False), half)
        add_lora(model, LoRAConfig(rank=rank, target_modules=list(targets)))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    tc = TrainConfig(mixed_precision=precision, gradient_checkpointing=checkpointing, lora=LoRAConfig(rank=rank),
                     ema_decay=None)  # fmt: skip
    profile = profile_denoiser(model, predict, shape, cond, torch.device("cpu"), half if rank else None)
    estimate = estimate_memory(model, [], profile, BATCH, tc, base_mode=base)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    start, started = _rss(), time.perf_counter()
    autocast = torch.autocast("cpu", dtype=half) if half else torch.autocast("cpu", enabled=False)
    for _ in range(2):
        x = torch.randn(BATCH, *shape, generator=generator)
        with autocast:
            out = predict(model, x, torch.tensor([300, 700]), cond)
            loss = torch.nn.functional.mse_loss(out.float(), torch.randn(out.shape, generator=generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _rss("VmHWM") - before
    return {
        "kind": kind,
        "mode": mode,
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "held_gib": round((start - before) / GiB, 3),
        "measured_gib": round(peak / GiB, 3),
        "estimated_gib": round(estimate.total / GiB, 3),
        "ratio": round(estimate.total / peak, 3),
        "estimate": estimate.table(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, action="append")
    parser.add_argument("--mode", choices=list(MODES), action="append")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a row in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.kind[0], args.mode[0])))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="2")
    rows = []
    print("| model | mode | parameters (B) | measured peak (GiB) | estimate (GiB) | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for kind in args.kind or KINDS:
        for mode in args.mode or MODES:
            command = [sys.executable, __file__, "--one", "--kind", kind, "--mode", mode]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"| {kind} | {mode} | failed: {done.stderr.strip().splitlines()[-1]} |||||")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {kind} | {mode} | {row['parameters_b']} | {row['measured_gib']:.2f} | "
                  f"{row['estimated_gib']:.2f} | {row['ratio']:.2f} |", flush=True)  # fmt: skip
    worst = max((abs(r["ratio"] - 1) for r in rows), default=None)
    print(json.dumps({"rows": rows, "worst_relative_error": worst}))


if __name__ == "__main__":
    main()

"""The pre-flight memory estimate against ``torch.cuda.max_memory_allocated`` at real size, on a GPU: the LoRA step
of FLUX.1 dev, SD 3.5 large and SDXL (random weights built on the device, the published configs of
``bench/memory_estimate.py``) over each base precision of issue 27 and with block swap, beside what ``sdtrain train``
estimates for the same settings.

Each row builds the denoiser on the meta device, materialises it on the GPU in fp32 with random weights, holds it as
:mod:`sdtrain.train.placement` holds a LoRA base (bf16, or quantised with ``model.quantize``), adds rank-16 adapters
on the family's targets (fp32), turns on gradient checkpointing, swaps the last N blocks where asked
(:mod:`sdtrain.train.block_swap`) and places the autoencoder's decoder beside it (what stays on the device with the
latents and prompts cached). Then three AdamW steps of a 1024 px batch of one under bf16 autocast. Measured: the
peak of ``torch.cuda.max_memory_allocated`` over the steps (the placed weights included), the peak reserved by the
caching allocator, and the seconds of the last step (the first warms up). The estimate is
:func:`sdtrain.train.perf.estimate_memory` of the same settings, as ``bench/memory_estimate.py --cache`` prints it.

    python bench/memory_gpu.py --log rows.jsonl                 # every row (a few minutes on an H100 / H200)
    python bench/memory_gpu.py --row flux:nf4:30 --row sdxl:bf16:0
    python bench/memory_gpu.py --device cpu --resolution 64 --row sd:int8:0   # the code path, on a CPU

A row that fails prints its traceback and the others still run; a CUDA error can leave the process unusable, so
``bench/RESULTS.md`` runs each row in its own process. ``--no-cudnn-attention`` turns off SDPA's cuDNN backend (to
tell a crash in cuDNN's attention from one of ours).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback

import torch
from memory_estimate import _models

from sdtrain.config import LoRAConfig, TrainConfig
from sdtrain.models.families import families
from sdtrain.models.lora import add_lora
from sdtrain.models.quantize import hold_in, quantize
from sdtrain.train import block_swap
from sdtrain.train.perf import GiB, estimate_memory, profile_denoiser

# family:base mode:swapped blocks, in the order they run (the presets' rows first)
ROWS = (
    "flux:nf4:30", "flux:nf4:0", "flux:int8:0", "flux:fp8:0", "flux:bf16:0", "flux:bf16:30",
    "sd3.5-large:nf4:0", "sd3.5-large:bf16:0", "sdxl:nf4:0", "sdxl:bf16:0",
)  # fmt: skip
PRESETS = {"flux:nf4:30": "flux-lora-8gb", "flux:nf4:0": "flux-lora-12gb", "flux:int8:0": "flux-lora-24gb",
           "sd3.5-large:nf4:0": "sd3-lora-12gb", "sdxl:nf4:0": "sdxl-lora-8gb"}  # fmt: skip
RANK, BATCH, STEPS = 16, 1, 3


def _train_config() -> TrainConfig:
    return TrainConfig(mixed_precision="bf16", gradient_checkpointing=True, lora=LoRAConfig(rank=RANK),
                       ema_decay=None)  # fmt: skip


def _estimate(name: str, mode: str, swap: int, resolution: int) -> tuple[float, str]:
    """``sdtrain train``'s estimate of the row (bytes) and its table: as bench/memory_estimate.py --cache."""
    family = families()[name.split(".")[0]]
    model, frozen, cond, channels = _models(name)
    add_lora(model, LoRAConfig(rank=RANK), family.lora_targets)
    side = resolution // 8
    profile = profile_denoiser(model, family.predict, (channels, side, side), cond, torch.device("meta"))
    hold_in(model, torch.bfloat16)
    held = [(hold_in(frozen["vae"].decoder.requires_grad_(False), torch.bfloat16), "none")]
    offloaded = block_swap.offloaded_bytes(model, swap, mode if mode != "bf16" else "none")
    base = mode if mode != "bf16" else "none"
    estimate = estimate_memory(model, held, profile, BATCH, _train_config(), base_mode=base, offloaded=offloaded)
    return estimate.total, estimate.table()


def _materialise(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` (on the meta device) on ``device`` in fp32 with random weights (normal, std 0.02; buffers zero)."""
    module.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
        for buffer in module.buffers():
            buffer.zero_()
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one(row: str, resolution: int, device: torch.device) -> dict:
    """One row: place, step, measure."""
    name, mode, swap = row.split(":")
    swap = int(swap)
    family = families()[name.split(".")[0]]
    estimated, table = _estimate(name, mode, swap, resolution)
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    started = time.perf_counter()
    model, frozen, cond, channels = _models(name)
    model = _materialise(model, device)
    if mode == "bf16":
        hold_in(model.requires_grad_(False), torch.bfloat16)
    else:
        quantize(model, mode, torch.bfloat16, device)
    add_lora(model, LoRAConfig(rank=RANK), family.lora_targets)  # fp32 adapters on the base's device
    decoder = hold_in(_materialise(frozen["vae"].decoder, device).requires_grad_(False), torch.bfloat16)
    model.enable_gradient_checkpointing()
    model.train()
    block_swap.swap_blocks(model, swap, device, checkpointing=True)
    placed_seconds = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    side = resolution // 8
    generator = torch.Generator(device).manual_seed(0)
    cond = {k: torch.randn((BATCH, *v.shape[1:]), device=device, generator=generator) for k, v in cond.items()}
    if "encoder_attention_mask" in cond:
        cond["encoder_attention_mask"] = torch.ones_like(cond["encoder_attention_mask"])
    _sync(device)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    held = (torch.cuda.memory_allocated(device) - before) if cuda else 0
    seconds, losses = [], []
    for _ in range(STEPS):
        tick = time.perf_counter()
        x = torch.randn(BATCH, channels, side, side, device=device, generator=generator)
        t = torch.randint(0, 1000, (BATCH,), device=device, generator=generator)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = family.predict(model, x, t, cond)
        loss = torch.nn.functional.mse_loss(out.float(), torch.randn(out.shape, device=device, generator=generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        block_swap.settle(model)
        losses.append(loss.item())
        _sync(device)
        seconds.append(time.perf_counter() - tick)
    peak = (torch.cuda.max_memory_allocated(device) - before) if cuda else 0
    reserved = torch.cuda.max_memory_reserved(device) if cuda else 0
    result = {
        "row": row, "preset": PRESETS.get(row), "family": name, "base": mode, "swapped_blocks": swap,
        "resolution": resolution, "batch": BATCH, "lora_rank": RANK,
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "held_gib": round(held / GiB, 3), "measured_gib": round(peak / GiB, 3),
        "reserved_gib": round(reserved / GiB, 3), "estimated_gib": round(estimated / GiB, 3),
        "ratio": round(estimated / peak, 3) if peak else None, "estimate": table,
        "step_seconds": [round(s, 3) for s in seconds], "losses": [round(v, 4) for v in losses],
        "placed_seconds": round(placed_seconds, 1),
    }  # fmt: skip
    del model, decoder, optimizer, trainable, cond, out, loss, x
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", help="FAMILY:BASE:SWAPPED (bf16 | fp8 | int8 | nf4)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--log", help="append each row as JSON to this file")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="SDPA without its cuDNN backend")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    print("| model | base | swapped blocks | preset | held (GiB) | measured peak (GiB) | reserved (GiB) | "
          "estimate (GiB) | estimate / measured | step (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for row in args.row or ROWS:
        try:
            result = one(row, args.resolution, device)
        except Exception as error:  # noqa: BLE001 - a row that fails is reported, the others still run
            traceback.print_exc()
            result = {"row": row, "error": f"{type(error).__name__}: {error}"[:500]}
            print(f"| {row} | failed: {result['error']} |", flush=True)
        else:
            print(f"| {result['family']} | {result['base']} | {result['swapped_blocks']} | {result['preset'] or ''} | "
                  f"{result['held_gib']:.2f} | {result['measured_gib']:.2f} | {result['reserved_gib']:.2f} | "
                  f"{result['estimated_gib']:.2f} | {result['ratio']} | {result['step_seconds'][-1]:.2f} |",
                  flush=True)  # fmt: skip
        rows.append(result)
        if args.log:
            with open(args.log, "a") as log:
                log.write(json.dumps(result) + "\n")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratios = [r["ratio"] for r in rows if r.get("ratio")]
    worst = max((abs(r - 1) for r in ratios), default=None)
    print(json.dumps({"rows": len(rows), "failed": sum("error" in r for r in rows), "worst_relative_error": worst}))


if __name__ == "__main__":
    main()

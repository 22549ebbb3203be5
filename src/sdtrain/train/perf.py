"""What a step costs: the UNet's FLOPs (for TFLOP/s and MFU) and a pre-flight memory estimate with advice.

Both come from one batch-1 forward pass of the UNet at the run's latent size: torch's ``FlopCounterMode`` counts
its FLOPs (a training step is ~3x a forward: the backward pass costs two), and forward hooks add up the bytes of
every leaf module's output, which is about what autograd keeps for the backward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdtrain.models.quantize import held_bytes
from sdtrain.train.block_swap import blocks_of

# Dense bf16 / fp16 tensor-core peaks (TFLOP/s, no sparsity), for MFU. fp32 runs use TF32 peaks: half of these.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}

GiB = 2**30


def peak_tflops(device: torch.device, mixed_precision: str) -> float | None:
    """The device's peak for the run's precision, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak if mixed_precision in ("bf16", "fp16") else peak / 2
    return None


@dataclass
class StepProfile:
    """FLOPs and activation bytes of one sample through the denoiser."""

    forward_flops: float
    activation_bytes: float  # of one sample, every leaf module's output
    checkpointed_bytes: float  # of one sample, with gradient checkpointing: the outputs of the checkpointed units
    # and of the leaf modules outside them
    block_bytes: float = 0.0  # of one sample, the leaf outputs inside the largest unit (recomputed in the backward)
    autocast: bool = False  # measured under autocast (else in fp32: halved for a mixed-precision estimate)
    linear_weights: float = 0.0  # elements of the model's frozen linear weights
    block_linear_weights: float = 0.0  # of the largest piece gradient checkpointing recomputes

    @property
    def train_flops(self) -> float:
        """Forward + backward per sample."""
        return 3 * self.forward_flops


@torch.no_grad()
def profile_denoiser(
    model, predict, latent_shape: tuple[int, ...], cond: dict, device, autocast: torch.dtype | None = None
) -> StepProfile:
    """Run one batch-1 forward pass of ``model`` (through the family's ``predict`` with the conditioning ``cond``,
    whose first row is used) and measure FLOPs and activation sizes; under ``autocast`` to that dtype where given
    (a model whose frozen weights are held in it), else in the model's dtype."""
    leaf_bytes, kept_bytes = [0.0], [0.0]
    units = _checkpointed_units(model)
    unit_ids = {id(unit) for unit in units}
    owner = {id(m): id(unit) for unit in units for m in unit.modules()}  # module -> the unit recomputing it
    within: dict[int, float] = {}

    def count(module, inputs, output):
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        if id(module) in unit_ids:
            kept_bytes[0] += size
        elif not any(True for _ in module.children()):
            leaf_bytes[0] += size
            if id(module) in owner:
                within[owner[id(module)]] = within.get(owner[id(module)], 0.0) + size
            else:  # outside every checkpointed unit: kept for the backward pass
                kept_bytes[0] += size

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        dtype = torch.float32 if autocast else next(p.dtype for p in model.parameters() if p.is_floating_point())
        x = torch.randn(1, *latent_shape, device=device, dtype=dtype)
        first = {k: v[:1].to(device=device, dtype=dtype) for k, v in cond.items()}
        context = torch.autocast(torch.device(device).type, autocast) if autocast else contextlib.nullcontext()
        with FlopCounterMode(display=False) as counter, context:
            predict(model, x, torch.tensor([500], device=device), first)
    finally:
        for hook in hooks:
            hook.remove()
    largest = max(within.values(), default=0.0)
    linear = {id(m): m.in_features * m.out_features for m in model.modules() if _frozen_linear(m)}
    per_block = [sum(linear.get(id(m), 0) for m in unit.modules()) for unit in _checkpointed_units(model)]
    return StepProfile(
        float(counter.get_total_flops()), leaf_bytes[0], kept_bytes[0], largest, bool(autocast),
        float(sum(linear.values())), float(max(per_block, default=0)),
    )  # fmt: skip


def _checkpointed_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What diffusers' gradient checkpointing recomputes as one piece: a transformer's blocks; a UNet's residual
    blocks and the transformer blocks inside its attention modules."""
    units = blocks_of(model)
    for level in _levels(model):
        units += list(getattr(level, "resnets", None) or [])
        for attention in getattr(level, "attentions", None) or []:
            units += list(getattr(attention, "transformer_blocks", None) or [attention])
    return units


def _levels(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A UNet's levels, down, middle and up; empty for a transformer."""
    levels = [*getattr(model, "down_blocks", []), getattr(model, "mid_block", None), *getattr(model, "up_blocks", [])]
    return [level for level in levels if level is not None]


def _frozen_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and not module.weight.requires_grad


@dataclass
class MemoryEstimate:
    """Bytes on the training device, by kind."""

    weights: float
    gradients: float
    optimizer: float
    ema: float
    frozen: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema + self.frozen + self.activations

    def gib(self) -> dict[str, float]:
        """GiB by kind, and ``total``."""
        parts = ("weights", "gradients", "optimizer", "ema", "frozen", "activations")
        return {k: getattr(self, k) / GiB for k in parts} | {"total": self.total / GiB}

    def table(self) -> str:
        *parts, total = self.gib().items()
        return ", ".join(f"{k} {v:.2f}" for k, v in parts) + f" = {total[1]:.2f} GiB"


# per trainable parameter (Adafactor: factored; Muon: one momentum for most, AdamW's two for the rest)
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 0.1, "muon": 4.5}


def estimate_memory(
    unet,
    frozen: list[tuple[torch.nn.Module, str]],
    profile: StepProfile,
    micro_batch: int,
    train_config,
    shards: int = 1,
    zero_stage: int = 0,
    processes: int = 1,
    base_mode: str = "none",
    offloaded: float = 0.0,
) -> MemoryEstimate:
    """Memory of a training step on the device: fp32 master weights, gradients and optimizer state of the trainable
    parameters, the frozen weights of the denoiser (a LoRA base) as they are held or in ``base_mode``
    (:func:`~sdtrain.models.quantize.held_bytes`), EMA (unless offloaded), the frozen modules on the device (each
    with its quantisation mode), and activations of a micro-batch (half size under autocast, block outputs only with
    gradient checkpointing). Under FSDP2 over ``shards`` processes each holds 1/shards of the weights, gradients,
    optimizer and EMA (the one block gathered at a time is left out). Under DeepSpeed ZeRO over ``processes``, each
    holds its partition of the optimizer state plus DeepSpeed's fp32 master copy of the trainable weights, and from
    ``zero_stage`` 2 its partition of the gradients. ``offloaded``: bytes of the base that block swap keeps in CPU
    memory (:func:`sdtrain.train.block_swap.offloaded_bytes`)."""
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    per_sample = profile.activation_bytes
    if train_config.gradient_checkpointing:  # the blocks' outputs, and one block's inside while it is recomputed
        per_sample = profile.checkpointed_bytes + profile.block_bytes
    half = train_config.mixed_precision in ("bf16", "fp16")
    if half and not profile.autocast:
        per_sample /= 2  # measured in fp32, stored in 16 bits under autocast
    dequantised = 0.0
    if base_mode in ("fp8", "int8"):  # torchao dequantises a weight for each matmul, and autograd keeps the copy
        # for the backward pass: every layer's without checkpointing, the recomputed block's with it
        count = profile.block_linear_weights if train_config.gradient_checkpointing else profile.linear_weights
        dequantised = count * (2 if half else 4)
    per_param = OPTIMIZER_BYTES[train_config.optim.name]
    optimizer = (per_param + 4.0) * trainable / processes if zero_stage else per_param * trainable / shards
    return MemoryEstimate(
        weights=(4.0 * trainable + held_bytes(unet, base_mode) - offloaded) / shards,
        gradients=4.0 * trainable / (processes if zero_stage >= 2 else shards),
        optimizer=optimizer,
        ema=0.0 if train_config.ema_decay is None or train_config.ema_offload else 4.0 * trainable / shards,
        frozen=sum(held_bytes(module, mode) for module, mode in frozen),
        activations=per_sample * micro_batch + dequantised,
    )


def advice(
    estimate: MemoryEstimate,
    available: float,
    train_config,
    micro_batch: int,
    processes: int = 1,
    shards: int = 1,
    zero_stage: int = 0,
) -> list[str]:
    """Concrete changes that bring the estimate under ``available`` bytes, largest saving first."""
    tips = []
    if processes > 1 and shards == 1 and not zero_stage:
        state = estimate.weights + estimate.gradients + estimate.optimizer + estimate.ema
        tips.append(
            f"FSDP2, `accelerate launch --use_fsdp --fsdp_version 2` (weights, gradients, optimizer and EMA "
            f"{state / GiB:.2f} -> {state / processes / GiB:.2f} GiB a device over {processes} processes)"
        )
    if not train_config.gradient_checkpointing and estimate.activations > 0.25 * available:
        tips.append("train.gradient_checkpointing=true (activations drop to the blocks' outputs, ~30 % slower)")
    if train_config.mixed_precision == "no":
        tips.append("train.mixed_precision=bf16 (activations in half the memory)")
    if train_config.optim.name == "adamw":
        tips.append(f"train.optim.name=adamw8bit (optimizer state {estimate.optimizer / GiB:.2f} -> "
                    f"{estimate.optimizer / 4 / GiB:.2f} GiB)")  # fmt: skip
    if estimate.ema and not train_config.ema_offload:
        tips.append(f"train.ema_offload=true (frees {estimate.ema / GiB:.2f} GiB)")
    if micro_batch > 1:
        tips.append(
            f"train.gradient_accumulation={2 * train_config.gradient_accumulation} (same global batch, half the "
            "activations)"
        )
    if not train_config.lora.rank:
        tips.append("train.lora.rank=16 (train adapters only: no full gradients or optimizer state)")
    elif estimate.weights > 0.25 * available:
        tips.append(f"model.quantize=int8 or nf4 (the frozen base, {estimate.weights / GiB:.1f} GiB, in 8 or 4 "
                    "bits; docs/memory.md), data.cache_latents=true (the text encoders leave the card)")  # fmt: skip
    return tips

"""Optimizers (AdamW, 8-bit AdamW, Adafactor) with decay only where it belongs, and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdtrain.config import OptimConfig
from sdtrain.errors import MissingPackage


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict]:
    """Two groups: matrices and convolution kernels decay; norms, biases and embeddings' 1-d params do not; and two
    more for the parameters whose ``lr_scale(name)`` is not 1 (text encoders at their own learning rate), whose
    ``lr_scale`` key :func:`set_lr` reads. A group with no parameters (LoRA trains matrices only) is left out, as
    DeepSpeed leaves it out: the optimizer state has the same layout under every strategy."""
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        groups.setdefault((lr_scale(name) if lr_scale else 1.0, param.ndim >= 2), []).append(param)
    made = []
    for (scale, decays), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        made.append(group | ({"lr_scale": scale} if scale != 1.0 else {}))
    return [g for g in made if g["params"]]


def make_optimizer(
    model: torch.nn.Module, config: OptimConfig, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.Optimizer:
    """The optimizer of ``config.name`` over the trainable parameters, without decay on norms and biases.

    - ``adamw``: torch's fused AdamW (one kernel for all parameters, CUDA and CPU);
    - ``adamw8bit``: bitsandbytes' 8-bit AdamW (optimizer state in 2 instead of 8 bytes per parameter);
    - ``adafactor``: transformers' Adafactor with factored second moments, stepped at ``lr`` (the schedule here
      sets it, so its own relative-step schedule is off).

    ``lr_scale(name)``: a parameter's learning rate over ``config.lr`` (default 1 for all).
    """
    groups = param_groups(model, config.weight_decay, lr_scale)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=True)
    if config.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise MissingPackage("train.optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=config.lr, beta1=None, relative_step=False, scale_parameter=False, warmup_init=False)


def lr_factor(step: int, progress: float, config: OptimConfig, warmup_share: float = 0.0) -> float:
    """Multiplier of the peak lr: linear warm-up over ``warmup_steps``, then constant, cosine or linear decay to
    ``min_lr_ratio`` over the rest of the run, as ``progress`` (the share of the run done, by steps or by time budget)
    goes from ``warmup_share`` (the share the warm-up takes: ``warmup_steps / num_steps``) to 1. The decay starts at
    the peak where the warm-up ends, as diffusers' and transformers' schedules do (by steps: exactly
    ``get_cosine_schedule_with_warmup``'s, with its floor); a run that a time budget ends before its steps can be a
    little past ``warmup_share`` when its warm-up ends.

    The lr is a pure function of (step, progress), so there is no schedule state to checkpoint.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decayed = (progress - warmup_share) / (1.0 - warmup_share) if warmup_share < 1.0 else 1.0
    decayed = min(1.0, max(0.0, decayed))
    shape = 0.5 * (1 + math.cos(math.pi * decayed)) if config.schedule == "cosine" else 1.0 - decayed
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def warmup_times_cosine(step: int, progress: float, warmup_steps: int = 100, min_ratio: float = 0.1) -> float:
    """Stage 1's multiplier of the peak lr: a linear warm-up over ``warmup_steps`` times a cosine decay to
    ``min_ratio`` as ``progress`` goes from 0 to 1 (both at once, where :func:`lr_factor` decays after warming up)."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return warmup * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate: ``lr`` times the group's ``lr_scale`` (1 unless set)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

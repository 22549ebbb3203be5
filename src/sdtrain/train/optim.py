"""Optimizers (AdamW, 8-bit AdamW, Adafactor) with decay only where it belongs, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from sdtrain.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and convolution kernels decay; norms, biases and embeddings' 1-d params do not. A group
    with no parameters (LoRA trains matrices only) is left out, as DeepSpeed leaves it out: the optimizer state has
    the same layout under every strategy."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config.name`` over the trainable parameters, without decay on norms and biases.

    - ``adamw``: torch's fused AdamW (one kernel for all parameters, CUDA and CPU);
    - ``adamw8bit``: bitsandbytes' 8-bit AdamW (optimizer state in 2 instead of 8 bytes per parameter);
    - ``adafactor``: transformers' Adafactor with factored second moments, stepped at ``lr`` (the schedule here
      sets it, so its own relative-step schedule is off).
    """
    groups = param_groups(model, config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=True)
    if config.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("train.optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=config.lr, beta1=None, relative_step=False, scale_parameter=False, warmup_init=False)


def lr_factor(step: int, progress: float, config: OptimConfig) -> float:
    """Multiplier of the peak lr: linear warm-up over ``warmup_steps``, then constant, cosine or linear decay to
    ``min_lr_ratio`` as ``progress`` (the share of the run done, by steps or by time budget) goes from 0 to 1.

    The lr is a pure function of (step, progress), so there is no schedule state to checkpoint.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, progress))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def warmup_times_cosine(step: int, progress: float, warmup_steps: int = 100, min_ratio: float = 0.1) -> float:
    """Stage 1's multiplier of the peak lr: a linear warm-up over ``warmup_steps`` times a cosine decay to
    ``min_ratio`` as ``progress`` goes from 0 to 1 (both at once, where :func:`lr_factor` decays after warming up)."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return warmup * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr

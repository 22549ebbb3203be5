"""The EMA of the UNet's trainable weights: diffusers' ``EMAModel`` with its warm-up, averaged every ``every``
optimizer steps, on the device or in CPU memory.

The decay of optimizer step ``k`` is diffusers' warm-up ``d_k = min(decay, 1 - (1 + k) ** (-2/3))`` (0 at the first
step, so the average starts from the trained weights). Averaging every ``n`` steps, the average moves once, with the
decays of the ``n`` steps multiplied::

    ema <- d ema + (1 - d) w,   d = d_{k-n+1} ... d_k

which is exactly the per-step EMA when the weights did not change within those steps, and otherwise gives the
``n`` steps' share of the average to the newest weights (n times less work; with ``offload``, n times fewer copies of
the UNet between the CPU and the device). The steps not yet averaged (``pending``) are part of the state a checkpoint
saves, so a run resumed at any step averages as the uninterrupted one; whatever reads the average (samples,
validation, export) calls :meth:`EMA.catch_up` first.

The update is one ``torch._foreach_lerp_`` (reads the average and the weights, writes the average) where diffusers'
``EMAModel.step`` subtracts through a temporary copy of the weights (twice the memory traffic and a UNet-sized
allocation every step); the two are the same formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel

from sdtrain.train import sharding
from sdtrain.train.state import trainable


def ema_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """What the EMA tracks: the trainable weights (under FSDP2 and ZeRO-3, this process's parts of them)."""
    return [sharding.local(p) for _, p in trainable(model)]


class EMA(EMAModel):
    """diffusers' EMA with warm-up (power 2/3), averaged every ``every`` optimizer steps.

    Args:
        parameters: the tensors to average (:func:`ema_parameters`).
        decay: the largest decay, reached after the warm-up.
        every: optimizer steps per average.
        offload: keep the average in CPU memory, moving it to the weights' device for each average.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float, every: int = 1, offload: bool = False):
        super().__init__(parameters, decay=decay, use_ema_warmup=True, power=2 / 3, foreach=True)
        self.every, self.offload, self.pending = every, offload, 0

    def get_decay(self, optimization_step: int) -> float:
        """The product of the decays of the steps averaged at once (the last ``max(pending, 1)``)."""
        first = optimization_step - max(self.pending, 1) + 1
        return math.prod(super(EMA, self).get_decay(k) for k in range(first, optimization_step + 1))

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> None:
        """Average ``parameters`` in, as the steps since the last average (at least one)."""
        parameters = list(parameters)
        self.optimization_step += max(self.pending, 1)
        self.cur_decay_value = self.get_decay(self.optimization_step)
        self.pending = 0
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1.0 - self.cur_decay_value)

    def tick(self, model: torch.nn.Module) -> None:
        """One optimizer step was taken (not a skipped one): average now if ``every`` steps are pending."""
        self.pending += 1
        if self.pending >= self.every:
            self.catch_up(model)

    def catch_up(self, model: torch.nn.Module) -> None:
        """Average in the pending steps (before the average is read)."""
        if not self.pending:
            return
        parameters = ema_parameters(model)
        if not self.offload:
            self.step(parameters)
            return
        device = parameters[0].device
        self.to(device, non_blocking=True)
        self.step(parameters)
        self.to("cpu", non_blocking=True)
        if device.type == "cuda":  # the copies back are asynchronous: checkpoints and copy_to read them on the CPU
            torch.cuda.current_stream(device).synchronize()

    def place(self, device: torch.device) -> None:
        """Move the average where it lives between updates: ``device``, or pinned CPU memory with ``offload``."""
        if not self.offload:
            self.to(device)
            return
        self.to("cpu")
        if device.type == "cuda":
            self.pin_memory()  # asynchronous copies to and from the GPU

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pending": self.pending}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.pending = state_dict.pop("pending", 0)  # checkpoints from before ema_every averaged every step
        super().load_state_dict(state_dict)


def caught_up(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """A checkpoint's EMA tensors with its pending steps averaged in: what the run would have sampled or exported at
    that step. ``weights`` are the checkpoint's trained weights, ``meta`` its EMA state (``state.json``)."""
    if not meta.get("pending"):
        return ema
    names = list(ema)
    average = EMA([ema[n] for n in names], meta["decay"])
    average.load_state_dict(meta)
    average.step([weights[n].to(ema[n]) for n in names])
    return dict(zip(names, average.shadow_params))

"""FSDP2 (and ZeRO-3): the UNet's weights, gradients, optimizer and EMA states as shards, one per process, whole only
where needed.

``accelerate launch --use_fsdp --fsdp_version 2`` (or ``distributed_type: FSDP`` with ``fsdp_version: 2`` in
accelerate's config file) makes ``accelerator.prepare`` shard the UNet with torch's ``fully_shard``: every parameter
becomes a DTensor of which each process holds 1/world (its *local* part), and the optimizer's moments follow. What
that changes for the rest of sdtrain lives here:

- the EMA tracks the local parts (:func:`local`), so it shards too and steps with no communication;
- checkpoints hold whole tensors, gathered (:func:`gather`, :func:`gather_optimizer`, :func:`gather_ema`) into the
  format a DDP or one-process run writes (the same file names, keys and optimizer layout): a checkpoint resumes
  under either strategy, and ``sdtrain export`` reads it as any other. Loading cuts each process's part back out
  (:func:`shard_state`, :func:`shard_optimizer`, :func:`shard_ema`);
- sampling, validation and export run on an ordinary copy of the UNet assembled from gathered weights
  (:func:`unsharded_copy`), because a sharded forward pass is collective and would wait for processes that do not
  sample.

DeepSpeed ZeRO-3 partitions the weights too (each parameter's ``ds_tensor`` is this process's flat slice of it):
the same functions handle its partitions as they handle shards (``sdtrain.train.zero`` holds the arithmetic).

Without FSDP or ZeRO-3 every function here is the identity, or returns the plain state dict, so callers never
branch on it.
Gathering is collective: every process calls it in the same order; ``keep`` says which processes hold the result.
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from typing import Any

import torch
from accelerate.utils import DistributedType, parse_flag_from_env
from torch.distributed.tensor import DTensor, distribute_tensor

from sdtrain.errors import Unsupported
from sdtrain.train import zero

logger = logging.getLogger(__name__)


def check_strategy(accelerator, optimizer: str = "adamw") -> None:
    """Refuse FSDP version 1 before any work, with the version to use instead, and Muon under FSDP2 (``optimizer``:
    train.optim.name); warn when FSDP or DeepSpeed was asked for and accelerate fell back to DDP (it builds them only
    on accelerators). DeepSpeed's settings are checked by :func:`sdtrain.train.zero.check`."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and optimizer == "muon":
        raise Unsupported(
            "train.optim.name=muon is not supported under FSDP2 (it orthogonalises each whole matrix, and FSDP2 "
            "leaves each process a shard of it): use adamw, or muon under DDP or on one device"
        )
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise Unsupported(
            "FSDP version 1 is not supported (it flattens parameters, so the EMA and checkpoints cannot address them "
            "by name); use FSDP2: `accelerate launch --use_fsdp --fsdp_version 2 ...` or `fsdp_version: 2` in "
            "accelerate's config"
        )
    for name, flag, built in (("FSDP", "ACCELERATE_USE_FSDP", DistributedType.FSDP),
                              ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):  # fmt: skip
        if parse_flag_from_env(flag) and kind != built and accelerator.is_main_process:
            logger.warning("%s was asked for, but accelerate builds it only on accelerators: training as %s", name,
                           kind.value)  # fmt: skip


def is_sharded(accelerator) -> bool:
    """Whether each process holds only its part of the denoiser's weights: FSDP2, or DeepSpeed ZeRO-3."""
    return accelerator.distributed_type == DistributedType.FSDP or zero.stage(accelerator) == 3


def wrap_blocks_by_default(accelerator) -> None:
    """Without a wrap policy chosen (``--fsdp_auto_wrap_policy`` / ``fsdp_auto_wrap_policy``), make each of the
    denoiser's blocks (its ``_no_split_modules``: a UNet's ResNet and transformer blocks, a DiT's transformer blocks)
    an FSDP unit, gathered whole only while it runs. accelerate's own default, one unit for the whole model, gathers
    every weight at once in each forward pass."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if is_sharded(accelerator) and plugin.auto_wrap_policy is None and "FSDP_AUTO_WRAP_POLICY" not in os.environ:
        plugin.auto_wrap_policy = transformer_auto_wrap_policy


def prepare(accelerator, model: torch.nn.Module, optimizer) -> tuple[Any, Any, torch.nn.Module | None]:
    """``accelerator.prepare(model, optimizer)``; under FSDP2 first the template of :func:`unsharded_copy` (returned
    third, None otherwise) and the block-wise wrap policy by default, then the layout in the log."""
    template = None
    if is_sharded(accelerator):
        template = meta_template(model)
    if accelerator.distributed_type == DistributedType.FSDP:
        wrap_blocks_by_default(accelerator)
        # every process builds or loads the whole model itself (the same seed, the same files), so accelerate's
        # loading of rank 0's weights into the others (on by default in `accelerate launch`, for transformers) has
        # nothing to do, and it fails on a persistent buffer (the sin-cos positions of SD3's, PixArt's and Sana's
        # patch embeddings), which it takes for a sharded parameter
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
    model, optimizer = accelerator.prepare(model, optimizer)
    if template is not None and accelerator.is_main_process:
        logger.info("%s: %s", "ZeRO-3" if zero.is_zero(accelerator) else "FSDP2", describe(model))
    return model, optimizer, template


def describe(model: torch.nn.Module) -> str:
    """How a sharded model is laid out over the processes, for the log."""
    from torch.distributed.fsdp import FSDPModule

    held = sum(local(p).numel() for p in model.parameters())
    total = sum(p.ds_numel if zero.is_partitioned(p) else p.numel() for p in model.parameters())
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    layout = f"{units} units; " if units else ""
    return f"{layout}this process holds {held} of the denoiser's {total} parameters"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a view of its storage: writing it writes the parameter): a DTensor's
    local tensor, a ZeRO-3 parameter's flat partition."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor.ds_tensor if zero.is_partitioned(tensor) else tensor


def _is_split(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor) or zero.is_partitioned(tensor)


def _full(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``part`` is this process's part, laid out as ``like`` (collective)."""
    if zero.is_partitioned(like):
        return zero.assemble(part, like)
    mesh = like.device_mesh
    if part.device.type != mesh.device_type:  # FSDP2 CPU offload: shards on the CPU, collectives on the accelerator
        part = part.to(mesh.device_type)
    return DTensor.from_local(part, mesh, like.placements, shape=like.shape, stride=like.stride()).full_tensor()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return _full(local(tensor).detach(), tensor) if _is_split(tensor) else tensor.detach()


def gather_model(model: torch.nn.Module, keep: bool, keys: set[str] | None = None) -> dict[str, torch.Tensor] | None:
    """:func:`gather` of the model's state dict, or of its ``keys`` (its parameters themselves where ZeRO-3 partitions
    them: its ``state_dict()`` holds empty stand-ins)."""
    state = model.state_dict()
    if keys is not None:
        state = {k: v for k, v in state.items() if k in keys}
    if any(zero.is_partitioned(p) for p in model.parameters()):
        found = dict(model.named_parameters()) | dict(model.named_buffers())
        state = {k: found[k] for k in state}
    return gather(state, keep)


def load_model(model: torch.nn.Module, weights: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Load whole ``weights`` (a checkpoint's) into ``model``, each process its part: the counterpart of
    :func:`gather_model`; ``partial``: some of the model's weights (the others stay). No communication."""
    if any(zero.is_partitioned(p) for p in model.parameters()):
        zero.load_partitioned(model, weights, partial)
    else:
        result = model.load_state_dict(shard_state(weights, model), strict=not partial)
        if result.unexpected_keys:
            raise KeyError(f"weights the model does not have: {result.unexpected_keys[:3]}")


def gather(state: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor] | None:
    """Whole tensors of a state dict, on the CPU of the processes that ``keep`` them (None on the others); each
    tensor is gathered and moved in turn, so a process never holds two whole copies on the device."""
    out = {}
    for key, tensor in state.items():
        whole = _whole(tensor)
        if keep:
            out[key] = whole.cpu()
    return out if keep else None


def gather_optimizer(optimizer, keep: bool) -> dict[str, Any] | None:
    """The optimizer's ``state_dict()`` with whole moments (its own layout: parameter ids in param-group order), on
    the CPU of the processes that ``keep`` it, tensor by tensor as :func:`gather`."""
    state = optimizer.state_dict()
    gathered = {}
    for index in sorted(state["state"]):
        values = {}
        for key, value in state["state"][index].items():
            if isinstance(value, torch.Tensor):
                value = _whole(value)
                value = value.cpu() if keep else None
            values[key] = value
        gathered[index] = values
    return {"state": gathered, "param_groups": state["param_groups"]} if keep else None


def _cut(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same on every process) laid out as ``like``: this process's part of it if ``like`` is
    sharded (no communication), else ``whole`` itself."""
    if zero.is_partitioned(like):
        return zero.partition(whole, like)
    if not isinstance(like, DTensor):
        return whole
    whole = whole.detach().to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def shard_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A whole state dict (from a checkpoint) laid out as ``model``'s own: ready for ``model.load_state_dict``."""
    current = model.state_dict()
    return {k: _cut(v, current[k]) if k in current else v for k, v in state.items()}


def shard_optimizer(state: dict[str, Any], optimizer) -> dict[str, Any]:
    """A whole optimizer state dict laid out as the optimizer's parameters: ready for ``optimizer.load_state_dict``
    (moments shaped like their parameter are cut; step counters and scalars stay)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        cut[index] = {
            k: _cut(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
            for k, v in values.items()
        }
    return {"state": cut, "param_groups": state["param_groups"]}


def gather_ema(shadow: list[torch.Tensor], parameters: list[torch.Tensor], keep: bool) -> list[torch.Tensor] | None:
    """Whole EMA tensors, on the CPU of the processes that ``keep`` them: ``shadow`` holds the local parts of
    ``parameters`` (the trainable ones, in order), possibly on the CPU (``ema_offload``)."""
    out = []
    for s, p in zip(shadow, parameters, strict=True):
        if _is_split(p):
            s = _full(s.detach(), p)
        if keep:
            out.append(s.detach().cpu())
    return out if keep else None


def shard_ema(shadow: list[torch.Tensor], parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole EMA tensors cut to this process's parts of ``parameters``."""
    pairs = zip(shadow, parameters, strict=True)
    return [local(_cut(s, p)).clone() if _is_split(p) else s for s, p in pairs]


def all_finite(accelerator, model: torch.nn.Module) -> bool:
    """Whether every weight is finite, the same answer on every process (sharded: each checks its part, then one
    all-reduce)."""
    counts = [(~torch.isfinite(local(p).detach())).sum() for p in model.parameters() if p.requires_grad]
    bad = torch.stack(counts).sum().float() if counts else torch.zeros((), device=accelerator.device)
    if is_sharded(accelerator):
        bad = accelerator.reduce(bad, reduction="sum")
    return int(bad.item()) == 0  # one host synchronisation


def meta_template(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s structure with no storage (meta tensors), made before sharding: what
    :func:`unsharded_copy` fills with gathered weights. No tensor is copied on the way (a plain ``deepcopy`` would
    hold a second UNet on the device for a moment, just when FSDP is there because one barely fits)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return deepcopy(model, memo)


def unsharded_copy(template: torch.nn.Module, weights: dict[str, torch.Tensor], device) -> torch.nn.Module:
    """An ordinary UNet on ``device`` with ``weights`` (whole tensors of every parameter and persistent buffer;
    ``load_state_dict`` is strict, so a missing one fails)."""
    copy = deepcopy(template).to_empty(device=device)
    copy.load_state_dict(weights)
    return copy

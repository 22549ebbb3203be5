"""DeepSpeed ZeRO: Adam's moments and an fp32 master copy of the weights (stage 1), the gradients too (stage 2), and
the weights themselves (stage 3) split over the processes.

``accelerate launch --use_deepspeed --zero_stage N`` (or ``distributed_type: DEEPSPEED`` in accelerate's config
file, with or without a DeepSpeed config file) makes ``accelerator.prepare`` wrap the UNet in DeepSpeed's engine and
the optimizer in its ZeRO optimizer. What sdtrain keeps as under DDP and FSDP2, and what that takes, lives here:

- the weights stay fp32 and the forward pass runs under torch's autocast at ``train.mixed_precision``; DeepSpeed's
  own bf16 / fp16 modes, which train 16-bit weights, are switched off (:func:`configure`). Stages 1 and 2 keep whole
  weights in the module on every process, so the EMA, sampling, validation and export read them as under DDP; stage
  3 partitions them, and ``sdtrain.train.sharding`` treats a ZeRO-3 partition as it treats an FSDP2 shard (the EMA
  of each process's partitions, gathered for checkpoints and for an unsharded copy that samples and exports), with
  the partition arithmetic here (:func:`partition`, :func:`assemble`, :func:`load_partitioned`);
- the engine steps inside ``accelerator.backward``: clipping at ``train.clip_norm`` and the skip of a step whose
  gradient norm is not finite (DeepSpeed's own check, the condition sdtrain's loop applies) happen there;
  :func:`configure` writes the batch sizes, accumulation and clipping of sdtrain's config into DeepSpeed's;
- checkpoints hold the files a DDP or one-process run writes: the moments are gathered whole by parameter
  (:func:`gather_optimizer`) into torch's one-process layout and cut back out on load (:func:`load_optimizer`,
  :func:`load_masters`), so a checkpoint resumes under ZeRO, DDP, FSDP2 or in one process.

Refused before any work (:func:`check`): stage 0 (DDP), fp16 (DeepSpeed would own the loss scale), offload,
optimizers other than AdamW (ZeRO steps them on flat partitions: Adafactor would stop factoring, 8-bit states would
not map back to parameters), and optimizer or scheduler sections in DeepSpeed's config (sdtrain builds both from
``train.optim``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from accelerate.utils import DistributedType

from sdtrain.errors import Unsupported
from sdtrain.train.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSpeed's own defaults for what accelerate fills in from a transformer's hidden_size, when the config says "auto"
DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def is_zero(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _config(accelerator) -> dict[str, Any]:
    return accelerator.state.deepspeed_plugin.deepspeed_config


def stage(accelerator) -> int:
    """The ZeRO stage of DeepSpeed's config (0 without DeepSpeed)."""
    if not is_zero(accelerator):
        return 0
    return int(_config(accelerator).get("zero_optimization", {}).get("stage", 0))


def check(accelerator, train_config) -> None:
    """Refuse, before any work, what sdtrain does not drive under DeepSpeed, with what to use instead."""
    if not is_zero(accelerator):
        return
    config, zero_stage = _config(accelerator), stage(accelerator)
    refusals = []
    if zero_stage not in (1, 2, 3):
        refusals.append(f"ZeRO stage {zero_stage} is not supported: use 1, 2 or 3 (stage 0 is DDP: `--multi_gpu`)")
    if train_config.mixed_precision == "fp16":
        refusals.append(
            "train.mixed_precision=fp16 is not supported under DeepSpeed (its engine would own the loss scale that "
            "sdtrain checkpoints): use bf16, or fp16 under DDP or FSDP2"
        )
    if train_config.optim.name != "adamw":
        refusals.append(
            f"train.optim.name={train_config.optim.name} is not supported under DeepSpeed ZeRO (it steps the "
            "optimizer on flat partitions of the weights: Adafactor would stop factoring, 8-bit states would not "
            "map back to parameters, Muon would orthogonalise parts of matrices): use adamw, or DDP (or FSDP2, "
            "but for muon)"
        )
    zero = config.get("zero_optimization", {})
    for part in ("offload_optimizer", "offload_param"):
        if str((zero.get(part) or {}).get("device", "none")).lower() not in ("none", "null"):
            refusals.append(f"zero_optimization.{part} is not supported (untested): remove it from DeepSpeed's config")
    for section in ("optimizer", "scheduler"):
        if section in config:
            refusals.append(
                f"DeepSpeed's config has a `{section}` section: remove it, sdtrain builds the optimizer and the "
                "learning-rate schedule from train.optim"
            )
    if refusals:
        raise Unsupported("DeepSpeed: " + "; ".join(refusals))


def configure(accelerator, train_config, micro_batch: int) -> None:
    """Write sdtrain's batch sizes, accumulation, clipping and precision into DeepSpeed's config before
    ``accelerator.prepare``. Numbers the config already had are replaced, with a warning where they differ."""
    if not is_zero(accelerator):
        return
    config = _config(accelerator)
    accumulation = train_config.gradient_accumulation
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * accelerator.num_processes,
        "gradient_clipping": float(train_config.clip_norm or 0.0),  # 0: no clipping (the norm is still computed)
    }
    for key, value in values.items():
        given = config.get(key, "auto")
        if given not in ("auto", value) and accelerator.is_main_process:
            logger.warning("DeepSpeed's %s=%s is replaced by sdtrain's %s", key, given, value)
        config[key] = value
    # accelerate derives an "auto" bucket size from a transformer's hidden_size, which a UNet has not: DeepSpeed's
    # own default instead
    zero = config.setdefault("zero_optimization", {})
    for key, default in DEFAULTS.items():
        if zero.get(key) == "auto":
            zero[key] = default
    # fp32 weights in the module, 16-bit compute under torch's autocast, as under DDP. The engine's forward pass
    # switches off an autocast entered outside it (on CUDA) unless its own `torch_autocast` section asks for one; no
    # module is "lower-precision safe", so gradients are still reduced in fp32
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config.pop("torch_autocast", None)
    if train_config.mixed_precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def load_whole(accelerator) -> None:
    """Keep every model sdtrain loads whole: with ZeRO-3's ``zero3_init`` (accelerate's default for stage 3)
    accelerate registers DeepSpeed's config with transformers, whose ``from_pretrained`` would then partition the
    frozen text encoder (and a CLIP scorer) as it loads them. ZeRO-3 partitions the UNet in ``accelerator.prepare``,
    as diffusers' training examples have it."""
    if stage(accelerator) != 3:
        return
    from transformers.integrations import unset_hf_deepspeed_config

    accelerator.state.deepspeed_plugin.zero3_init_flag = False
    unset_hf_deepspeed_config()


def autocast(accelerator, mixed_precision: str) -> Callable[[], AbstractContextManager]:
    """What the forward passes run under: ``accelerator.autocast``, except under DeepSpeed, where accelerate leaves
    precision to DeepSpeed's config and :func:`configure` keeps the weights fp32: torch's autocast there."""
    if not is_zero(accelerator) or mixed_precision not in AUTOCAST_DTYPES:
        return accelerator.autocast
    device_type, dtype = accelerator.device.type, AUTOCAST_DTYPES[mixed_precision]
    return lambda: torch.autocast(device_type, dtype=dtype)


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer inside accelerate's wrapper."""
    return optimizer.optimizer


def _layout(zero) -> tuple[list[list[torch.nn.Parameter]], list[torch.Tensor]]:
    """The trainable parameters of each param group in order, and the flat fp32 partitions that the torch optimizer
    inside steps (its state is keyed by them): one per group under ZeRO-1 / 2, one per sub-group under ZeRO-3."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return [g["params"] for g in zero.trainable_param_groups], zero.fp32_partitioned_groups_flat
    return zero.bit16_groups, zero.single_partition_of_fp32_groups


def _link_fragments(zero) -> None:
    """ZeRO-1 / 2: point every parameter's view of the optimizer state (what DeepSpeed's ``safe_*_optimizer_state``
    read and write) at the state of its group. DeepSpeed links them once, after stepping its first group, when the
    other groups have no state yet: with two groups (decay and no decay) the second's views stay empty."""
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def gather_optimizer(optimizer, keep: bool) -> dict[str, Any] | None:
    """The optimizer state in torch's one-process layout (what ``torch.optim.AdamW(groups).state_dict()`` holds after
    the same steps: parameter ids in param-group order, whole moments by parameter), on the CPU of the processes that
    ``keep`` it. Collective: each moment of each parameter is assembled from the partitions."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    inner = zero.optimizer  # the torch AdamW
    groups, flats = _layout(zero)
    _link_fragments(zero)
    stepped = next((inner.state[f] for f in flats if inner.state.get(f)), {})  # every partition steps together
    moments = [k for k, v in stepped.items() if torch.is_tensor(v) and v.dim() > 0]
    scalars = {k: v for k, v in stepped.items() if k not in moments}  # the step count
    state, saved_groups, index = {}, [], 0
    for params, group in zip(groups, inner.param_groups, strict=True):
        for param in params:
            if stepped:  # no state before the first step
                values = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
                for key in moments:
                    whole = safe_get_full_optimizer_state(param, key)  # collective; shaped as the parameter
                    values[key] = whole.cpu() if keep else None
                state[index] = values
            index += 1
        hyper = {k: v for k, v in group.items() if k != "params"}
        saved_groups.append({**hyper, "params": list(range(index - len(params), index))})
    return {"state": state, "param_groups": saved_groups} if keep else None


def load_optimizer(optimizer, saved: dict[str, Any]) -> None:
    """Restore a one-process optimizer state (from :func:`gather_optimizer`, DDP, FSDP2 or one process, its empty
    param groups left out as ``optim.param_groups`` and DeepSpeed leave them out): each process takes its partition
    of every moment; step counts and hyperparameters as saved. No communication."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    inner = zero.optimizer
    groups, flats = _layout(zero)
    saved_groups = saved["param_groups"]
    counts = [len(g["params"]) for g in saved_groups], [len(params) for params in groups]
    if counts[0] != counts[1]:
        raise CheckpointError(f"the checkpoint's optimizer groups have {counts[0]} parameters, this one's {counts[1]}")
    for group, saved_group in zip(inner.param_groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    saved_state = {int(k): v for k, v in saved["state"].items()}
    first = next((saved_state[int(i)] for g in saved_groups for i in g["params"] if saved_state.get(int(i))), None)
    if first is None:
        return  # saved before the first step
    moments = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
    on_device = inner.param_groups[0].get("fused") or inner.param_groups[0].get("capturable")
    for flat in flats:  # the state torch's AdamW creates at its first step, moments zero until set below
        inner.state[flat] = {
            k: torch.zeros_like(flat) if k in moments else _step_count(v, flat, on_device) for k, v in first.items()
        }
    _link_fragments(zero)
    for params, saved_group in zip(groups, saved_groups):
        for param, index in zip(params, saved_group["params"]):
            for key in moments if saved_state.get(int(index)) else ():
                safe_set_full_optimizer_state(param, saved_state[int(index)][key].to(param.device), key)


def _step_count(value, flat: torch.Tensor, on_device: bool):
    """A saved step count as torch's AdamW keeps it: an fp32 scalar, on the parameters' device when fused."""
    if not torch.is_tensor(value):
        return value
    value = value.detach().clone().float()
    return value.to(flat.device) if on_device else value


def load_masters(optimizer, named: list[tuple[str, torch.nn.Parameter]], weights: dict[str, torch.Tensor]) -> None:
    """Set the fp32 master copy DeepSpeed steps (each process its partition) to the checkpoint's ``weights``, for the
    trainable parameters ``named`` (the module's own copy is loaded by ``load_state_dict`` or, under ZeRO-3,
    :func:`load_partitioned`). No communication."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in named:
        safe_set_full_fp32_param(param, weights[name].to(param.device))


# ZeRO-3: each parameter's data is empty outside the forward and backward passes; ``param.ds_tensor`` holds this
# process's part of it, a flat slice of ``param.ds_numel_aligned`` elements (the whole tensor, flattened and padded
# to a multiple of the processes), slice r on process r.


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a parameter that ZeRO-3 partitions."""
    return getattr(tensor, "ds_tensor", None) is not None and hasattr(tensor, "ds_numel")


def partition(whole: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This process's part of ``whole`` laid out as ZeRO-3 lays out ``param`` (no communication)."""
    import deepspeed.comm as dist

    part = param.ds_tensor
    flat = whole.detach().reshape(-1).to(device=part.device, dtype=part.dtype)
    flat = torch.nn.functional.pad(flat, (0, param.ds_numel_aligned - flat.numel()))
    return flat.narrow(0, dist.get_rank() * part.numel(), part.numel()).clone()


def assemble(part: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The whole tensor of which ``part`` (laid out as ``param.ds_tensor``) is this process's part (collective)."""
    import deepspeed.comm as dist

    device = param.ds_tensor.device
    parts = [torch.empty_like(part, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part.to(device))
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)


def load_partitioned(model: torch.nn.Module, weights: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Load a whole state dict into a model ZeRO-3 partitions: each process writes its part of every parameter (and
    the whole of those DeepSpeed keeps gathered, ``stage3_param_persistence_threshold``). Strict, as
    ``load_state_dict`` unless ``partial`` (the trainable weights alone). No communication."""
    params = dict(model.named_parameters())
    if partial:
        params = {k: v for k, v in params.items() if k in weights}
    missing, unexpected = params.keys() - weights.keys(), weights.keys() - model.state_dict().keys()
    if missing or unexpected:
        differ = f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        raise CheckpointError(f"the checkpoint's UNet differs: {differ}")
    with torch.no_grad():
        for name, param in params.items():
            param.ds_tensor.copy_(partition(weights[name], param))
            if param.numel() == param.ds_numel:  # kept whole as well
                param.data.copy_(weights[name].reshape(param.shape))
        for name, buffer in model.named_buffers():
            if name in weights:
                buffer.copy_(weights[name])

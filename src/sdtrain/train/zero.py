"""DeepSpeed ZeRO stages 1 and 2: Adam's moments and the fp32 master copy (and with stage 2 the gradients) split
over the processes, the weights whole on each.

``accelerate launch --use_deepspeed --zero_stage 2`` (or ``distributed_type: DEEPSPEED`` in accelerate's config
file, with or without a DeepSpeed config file) makes ``accelerator.prepare`` wrap the UNet in DeepSpeed's engine and
the optimizer in its ZeRO optimizer. What sdtrain keeps as under DDP, and what that changes, lives here:

- the UNet's weights stay fp32 in the module on every process and the forward pass runs under torch's autocast at
  ``train.mixed_precision`` (:func:`autocast`); DeepSpeed's own bf16 / fp16 modes, which train 16-bit weights, are
  switched off. So the EMA, sampling, validation and export read whole fp32 weights exactly as under DDP;
- the engine steps inside ``accelerator.backward``: clipping at ``train.clip_norm`` and the skip of a step whose
  gradient norm is not finite (DeepSpeed's own check, the condition sdtrain's loop applies) happen there;
  :func:`configure` writes the batch sizes, accumulation and clipping of sdtrain's config into DeepSpeed's;
- checkpoints hold the files a DDP or one-process run writes: the moments are gathered whole by parameter
  (:func:`gather_optimizer`) into torch's one-process layout and cut back out on load (:func:`load_optimizer`,
  :func:`load_masters`), so a checkpoint resumes under ZeRO, DDP, FSDP2 or in one process.

Refused before any work (:func:`check`): stage 3 (FSDP2 is sdtrain's weight sharding), stage 0, fp16 (DeepSpeed
would own the loss scale), optimizer offload, optimizers other than AdamW (ZeRO steps them on flat partitions:
Adafactor would stop factoring, 8-bit states would not map back to parameters), and optimizer or scheduler sections
in DeepSpeed's config (sdtrain builds both from ``train.optim``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce / all-gather bucket


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
    if zero_stage == 3:
        refusals.append(
            "ZeRO stage 3 is not supported (it partitions the weights themselves, which sdtrain shards with FSDP2: "
            "`accelerate launch --use_fsdp --fsdp_version 2 ...`); stages 1 and 2 are"
        )
    elif zero_stage not in (1, 2):
        refusals.append(f"ZeRO stage {zero_stage} is not supported: use 1 or 2 (stage 0 is DDP: `--multi_gpu`)")
    if train_config.mixed_precision == "fp16":
        refusals.append(
            "train.mixed_precision=fp16 is not supported under DeepSpeed (its engine would own the loss scale that "
            "sdtrain checkpoints): use bf16, or fp16 under DDP or FSDP2"
        )
    if train_config.optim.name != "adamw":
        refusals.append(
            f"train.optim.name={train_config.optim.name} is not supported under DeepSpeed ZeRO (it steps the "
            "optimizer on flat partitions of the weights: Adafactor would stop factoring, 8-bit states would not "
            "map back to parameters): use adamw, or DDP / FSDP2"
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
        raise RuntimeError("DeepSpeed: " + "; ".join(refusals))


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
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key) == "auto":
            zero[key] = DEFAULT_BUCKET
    # fp32 weights in the module, 16-bit compute under torch's autocast (:func:`autocast`), as under DDP
    config["bf16"] = {"enabled": False}
    config["fp16"] = {"enabled": False}
    config.pop("torch_autocast", None)


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


def _link_fragments(zero) -> None:
    """Point every parameter's view of the optimizer state (what DeepSpeed's ``safe_*_optimizer_state`` read and
    write) at the state of its group. DeepSpeed links them once, after stepping its first group, when the other
    groups have no state yet: with two groups (decay and no decay) the second's views stay empty."""
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def gather_optimizer(optimizer, keep: bool) -> dict[str, Any] | None:
    """The optimizer state in torch's one-process layout (what ``torch.optim.AdamW(groups).state_dict()`` holds after
    the same steps: parameter ids in param-group order, whole moments by parameter), on the CPU of the processes that
    ``keep`` it. Collective: each moment of each parameter is assembled from the partitions (one all-reduce)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    inner = zero.optimizer  # the torch AdamW, stepping one flat fp32 partition per group
    _link_fragments(zero)
    state, groups, index = {}, [], 0
    for i, group in enumerate(inner.param_groups):
        flat = zero.single_partition_of_fp32_groups[i]
        flat_state = inner.state.get(flat, {})
        moments = [k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape]
        params = zero.bit16_groups[i]
        for param in params:
            if flat_state:  # none before the first step
                values = {k: v.detach().clone() for k, v in flat_state.items() if k not in moments}
                for key in moments:
                    whole = safe_get_full_optimizer_state(param, key)
                    values[key] = whole.cpu() if keep else None
                state[index] = values
            index += 1
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(index - len(params), index))})
    return {"state": state, "param_groups": groups} if keep else None


def load_optimizer(optimizer, saved: dict[str, Any]) -> None:
    """Restore a one-process optimizer state (from :func:`gather_optimizer`, DDP, FSDP2 or one process): each
    process takes its partition of every moment; step counts and hyperparameters as saved. No communication."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    inner = zero.optimizer
    saved_groups = [g for g in saved["param_groups"] if g["params"]]  # DeepSpeed drops empty groups
    if len(saved_groups) != len(inner.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this one {len(inner.param_groups)}"
        )
    saved_state = {int(k): v for k, v in saved["state"].items()}
    flat_states, whole = {}, []
    for i, group in enumerate(saved_groups):
        flat, params = zero.single_partition_of_fp32_groups[i], zero.bit16_groups[i]
        if len(group["params"]) != len(params):
            raise ValueError(
                f"the checkpoint's optimizer group {i} has {len(group['params'])} parameters, not {len(params)}"
            )
        per_param = [saved_state.get(int(k)) for k in group["params"]]
        first = next((s for s in per_param if s), None)
        if first is None:
            continue  # the group had not stepped
        moments = [k for k, v in first.items() if torch.is_tensor(v) and v.dim() > 0]
        flat_states[i] = {k: (torch.zeros_like(flat) if k in moments else v) for k, v in first.items()}
        whole += [(param, s, moments) for param, s in zip(params, per_param) if s]
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in saved_groups]
    inner.load_state_dict({"state": flat_states, "param_groups": [{**h, "params": [i]} for i, h in enumerate(hyper)]})
    _link_fragments(zero)  # each parameter's fragment of the state just loaded
    for param, values, moments in whole:
        for key in moments:
            safe_set_full_optimizer_state(param, values[key].to(param.device), key)


def load_masters(optimizer, named: list[tuple[str, torch.nn.Parameter]], weights: dict[str, torch.Tensor]) -> None:
    """Set the fp32 master copy DeepSpeed steps (each process its partition) to the checkpoint's ``weights``, for the
    trainable parameters ``named`` (the module's own copy is loaded by ``load_state_dict``). No communication."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in named:
        safe_set_full_fp32_param(param, weights[name].to(param.device))

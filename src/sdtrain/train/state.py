"""Training state: what a checkpoint holds and how a run is restored from it, and the start-up disk check.

A checkpoint of a run holds the UNet (fp32 master weights), the EMA of its trainable weights, the optimizer and fp16
loss-scaler states, the counters, every rank's RNG states and data position. ``save_training_state`` is collective
(every rank calls it, the main process writes); ``load_training_state`` restores all of it on every rank. Under FSDP2
the tensors are gathered whole to write and cut back into shards to load (``sdtrain.train.sharding``), under
DeepSpeed ZeRO the optimizer's partitions likewise (``sdtrain.train.zero``), so the files are the same whatever the
strategy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from sdtrain.data.streams import regroup_states
from sdtrain.errors import Diverged, StorageError
from sdtrain.train import checkpoint, sharding, zero
from sdtrain.train.randomness import rng_state, set_generator_state, set_rng_state
from sdtrain.train.tracking import log_lines


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The UNet itself, out of DDP and out of torch.compile's wrapper (whose state-dict keys carry an ``_orig_mod.``
    prefix that would end up in checkpoints and exports). Under FSDP2 the module is sharded in place: it is the
    UNet, its parameters DTensors."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


# inserted into parameter names by activation checkpointing's wrapper (FSDP2's ``fsdp_activation_checkpointing``);
# state dicts leave it out, and so do the names the EMA is saved under
CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."
LATENT_SCALE = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")  # how the latents are scaled


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that train (all of the UNet, or only its LoRA adapters), in a fixed order, under their state-dict
    names: what EMA tracks."""
    return [(n.replace(CHECKPOINT_WRAPPER, ""), p) for n, p in model.named_parameters() if p.requires_grad]


def whole_ema(ema, model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The EMA's whole tensors by parameter name, on the CPU of the processes that ``keep`` them (collective under
    FSDP2, where each process holds its parts)."""
    names, parameters = zip(*trainable(model))
    shadow = sharding.gather_ema(ema.shadow_params, list(parameters), keep)
    return dict(zip(names, shadow)) if keep else None


def check_disk(out: Path, model: torch.nn.Module, with_ema: bool) -> None:
    """Fail before training when the run directory is not writable or cannot hold two checkpoints."""
    probe = out / ".write-test"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise StorageError(f"cannot write to {out}: {e}") from None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint_bytes = params * (4 if with_ema else 3)  # weights, two Adam moments, EMA
    free = shutil.disk_usage(out).free
    if free < 2 * checkpoint_bytes:
        raise StorageError(
            f"{out} has {free / 2**30:.2f} GiB free, two checkpoints need {2 * checkpoint_bytes / 2**30:.2f} GiB"
        )


def describe_frozen(frozen: dict[str, torch.nn.Module], probes: int = 256) -> dict[str, Any]:
    """What identifies the frozen components a run trains with, saved in every checkpoint: their classes, the
    latent scaling, and ``probes`` weights of each at evenly spaced positions of its flattened state. Two loads of
    the same model agree to rounding whatever dtype they were loaded in; two different models do not. (The latent
    cache's exact ``model_hash`` would refuse a resume that switches the VAE to fp32 after fp16 NaNs.)"""
    described = {}
    for name, module in frozen.items():
        tensors = [t.detach().reshape(-1) for t in module.state_dict().values() if t.is_floating_point()]
        total = sum(t.numel() for t in tensors)
        targets = [round(i * (total - 1) / max(1, probes - 1)) for i in range(probes)]
        values, offset, k = [], 0, 0
        for flat in tensors:
            while k < len(targets) and targets[k] < offset + flat.numel():
                values.append(float(flat[targets[k] - offset]))
                k += 1
            offset += flat.numel()
        described[name] = {"class": type(module).__name__, "parameters": total, "probe": values}
    if "vae" in frozen:
        config = getattr(frozen["vae"], "config", {})
        described["vae"] |= {k: config.get(k) for k in LATENT_SCALE}
    return described


def check_frozen(saved: dict[str, Any] | None, current: dict[str, Any], where: Path) -> None:
    """Refuse frozen components other than the ones the checkpoint ``where`` was trained with (None: an older
    checkpoint that did not record them)."""
    if not saved:
        return
    for name in sorted(saved.keys() | current.keys()):
        if name not in saved or name not in current:
            raise checkpoint.CheckpointError(
                f"{where} was trained with the frozen components {sorted(saved)}, this run has {sorted(current)}"
            )
        a, b = saved[name], current[name]
        same = (
            a["class"] == b["class"]
            and a["parameters"] == b["parameters"]
            and all(a.get(k) == b.get(k) for k in LATENT_SCALE)
            and torch.allclose(torch.tensor(a["probe"]), torch.tensor(b["probe"]), rtol=2e-2, atol=1e-3)
        )
        if not same:
            raise checkpoint.CheckpointError(
                f"the {name} differs from the one {where} was trained with (a relative model.{name}.path is read "
                f"from the current directory, {Path.cwd()}): point the config at the run's own {name}"
            )


@dataclass
class Counters:
    """Where a run stands; saved in every checkpoint's state.json."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0


def save_training_state(
    accelerator: Accelerator,
    root: Path,
    keep: int,
    unet,
    optimizer,
    ema,
    stream,
    generator,
    counters: Counters,
    frozen: dict[str, Any] | None = None,
    name: str = "unet",
    trained_only: bool = False,
) -> None:
    """Checkpoint everything a bit-exact resume needs: weights (under ``name``, the family's name of its denoiser),
    EMA, optimizer, every rank's RNGs and data position. ``trained_only``: the weights that train alone (a LoRA run
    whose frozen base is read again from its folder on resume, :mod:`sdtrain.train.placement`).

    Collective: every rank calls it; only the main process writes.
    """
    model = unwrap(accelerator, unet)
    if not sharding.all_finite(accelerator, model):
        raise Diverged(f"non-finite weights at step {counters.step}: checkpoint not written")
    # whole tensors on the main process (under FSDP2 each is gathered from the shards: every rank takes part)
    main = accelerator.is_main_process
    weights = sharding.gather_model(model, main, {n for n, _ in trainable(model)} if trained_only else None)
    ema_weights = whole_ema(ema, model, main) if ema is not None else None
    if zero.is_zero(accelerator):  # DeepSpeed ZeRO: moments assembled from the partitions, by parameter
        optimizer_state = zero.gather_optimizer(optimizer, main)
    else:
        optimizer_state = sharding.gather_optimizer(optimizer, main)
    data_states = accelerator.gather_for_metrics([stream.state()], use_gather_object=True)
    rng_states = accelerator.gather_for_metrics([rng_state(generator)], use_gather_object=True)
    if not main:
        return
    tensors = {name: weights}
    ema_meta = {}
    if ema is not None:
        tensors["ema"] = ema_weights
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    objects = {"optimizer": optimizer_state} | {f"rng-{i}": s for i, s in enumerate(rng_states)}
    if accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker
        objects["scaler"] = accelerator.scaler.state_dict()
    state = {**dataclasses.asdict(counters), "ema": ema_meta, "data": data_states, "frozen": frozen}
    checkpoint.save_or_keep_previous(root, counters.step, tensors, objects, state, keep)


def load_training_state(
    path: Path,
    accelerator: Accelerator,
    unet,
    optimizer,
    ema,
    stream,
    generator,
    frozen: dict[str, Any] | None = None,
    name: str = "unet",
) -> Counters:
    """Restore what :func:`save_training_state` wrote, with the same frozen components; returns the counters. The
    number of processes may differ from the one that wrote it where the data position allows
    (:func:`sdtrain.data.streams.regroup_states`)."""
    tensors, objects, state = checkpoint.load_checkpoint(path)
    if frozen is not None:
        check_frozen(state.get("frozen"), frozen, path)
    model = unwrap(accelerator, unet)
    saved_weights = tensors[name]
    sharding.load_model(model, saved_weights, partial=_trained_only(model, saved_weights, path))  # each rank its part
    saved = objects["optimizer"]
    saved = {**saved, "param_groups": [g for g in saved["param_groups"] if g["params"]]}  # as optim.param_groups
    if zero.is_zero(accelerator):  # the master copy and the moments DeepSpeed steps, each rank its partition
        zero.load_masters(optimizer, trainable(model), tensors[name])
        zero.load_optimizer(optimizer, saved)
    else:
        optimizer.load_state_dict(sharding.shard_optimizer(saved, optimizer))
    if ema is not None:
        names, parameters = zip(*trainable(model))
        shadow = sharding.shard_ema([tensors["ema"][n] for n in names], list(parameters))
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})  # on the CPU: the caller places it
    if accelerator.scaler is not None and "scaler" in objects:
        accelerator.scaler.load_state_dict(objects["scaler"])
    rank, world = accelerator.process_index, accelerator.num_processes
    written_by = len(state["data"])
    try:
        data_states = regroup_states(state["data"], world)
    except ValueError as e:
        raise checkpoint.CheckpointError(
            f"{path} was written by {written_by} processes and {e}: resume it with {written_by}, not {world}"
        ) from None
    if f"rng-{rank}" in objects:
        set_rng_state(objects[f"rng-{rank}"], generator)
    else:  # a process the checkpoint's run did not have: the shared draws go on (global RNGs as seeded at start)
        set_generator_state(generator, objects["rng-0"]["generator"])
    stream.load_state(data_states[rank])
    return Counters(**{f.name: state[f.name] for f in dataclasses.fields(Counters)})


def _trained_only(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> bool:
    """Whether a checkpoint holds the trainable weights alone (its base is read from a folder); every one of them
    must be there."""
    names = {n for n, _ in trainable(model)}
    if len(weights) >= len(model.state_dict()):
        return False
    missing = sorted(names - weights.keys())
    if missing:
        raise checkpoint.CheckpointError(f"{path} lacks {len(missing)} trained weights of this run ({missing[0]}...): "
                                         "it was written by a run that trained other weights")  # fmt: skip
    return True


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written before a crash, and about to be written again by the resumed run)."""
    if not path.exists():
        return
    original = path.read_text(errors="replace")
    kept = "".join(line for line, record in log_lines(path) if record["step"] <= step)  # a torn last line goes too
    if kept != original:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(kept)
        os.replace(tmp, path)

"""`sdtrain` with a fault injected, for the never-lose-a-run tests: ``python tests/faults.py train ...``.

``SDTRAIN_FAULT`` says what goes wrong (nothing when unset):

- ``kill_micro=N``: SIGKILL this process when it starts its N-th micro-batch (counted from its own start, so
  N not a multiple of the accumulation steps kills in the middle of an optimizer step);
- ``kill_vae_step=N``: the same in ``train-vae``, at its N-th step;
- ``kill_save=K:POINT``: SIGKILL inside the K-th checkpoint save, at POINT: ``file`` (a weights file written in the
  temporary folder), ``manifest`` (manifest written, folder not yet renamed), ``committed`` (renamed, ``latest``
  not yet updated), ``pointer`` (new ``latest`` written but not yet swapped in), ``prune`` (an old checkpoint half
  deleted);
- ``nan=RANK:N``: rank RANK's N-th micro-batch has a NaN loss (the other ranks' are finite);
- ``enospc=K``: the K-th checkpoint save fails with "No space left on device" after writing its first file;
- ``term_setup``: SIGTERM to this process while the run sets up (right after its models loaded), as a stop from
  the web UI or a scheduler while a large model loads;
- ``orphan_kill=N:FILE``: at the N-th micro-batch, fork a child that lives on for 2 minutes (a data-loader worker slow
  to notice its parent is gone), write its pid to FILE, and SIGKILL this process.

The kill is a real SIGKILL: no handler, no ``finally``, no flush, exactly what a preempted VM or the OOM killer does.

Launched with ``accelerate launch --use_fsdp --fsdp_version 2`` on a machine without GPUs, it also shards with FSDP2
over gloo (:func:`fsdp_on_cpu`): accelerate itself builds FSDP only on accelerators, although torch's
``fully_shard`` runs on CPU processes as well. Likewise with ``--use_deepspeed`` (:func:`deepspeed_on_cpu`): DeepSpeed
has a CPU accelerator and runs its engine over gloo.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _pointer(root: Path) -> str:
    return (root / "latest").read_text() if (root / "latest").exists() else ""


def _newest(root: Path) -> str:
    return max(p.name for p in root.iterdir() if p.name.startswith("step-"))


def _die_at_call(module, name: str, nth: int) -> None:
    """SIGKILL this process at the ``nth`` call of ``module.name``."""
    original, calls = getattr(module, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            _die()
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _inject(spec: str) -> None:
    from sdtrain import objective
    from sdtrain.train import checkpoint

    kind, _, arg = spec.partition("=")
    if kind == "kill_micro":
        _die_at_call(objective, "diffusion_loss", int(arg))
    elif kind == "kill_vae_step":  # `train-vae`: SIGKILL in the middle of its N-th step (after the forward pass)
        from sdtrain.train import autoencoder

        _die_at_call(autoencoder, "reconstruction_loss", int(arg))
    elif kind == "kill_save":
        nth, point = arg.split(":")
        saves = [0]
        save, fsync, prune = checkpoint.save_checkpoint, checkpoint._fsync, checkpoint._prune

        def counted_save(*args, **kwargs):
            saves[0] += 1
            return save(*args, **kwargs)

        def fsync_then_maybe_die(path: Path) -> None:
            fsync(path)
            if saves[0] != int(nth):
                return
            in_tmp = path.parent.name.startswith(".tmp-")
            committed = path.is_dir() and path.name == "checkpoints" and not (path / ".latest.tmp").exists()
            if (
                (point == "file" and in_tmp and path.suffix == ".safetensors")
                or (point == "manifest" and in_tmp and path.name == checkpoint.MANIFEST)
                # the parent's fsync right after the rename (the one after the pointer swap comes later: skip it)
                or (point == "committed" and committed and _pointer(path) != _newest(path))
                or (point == "pointer" and path.name == ".latest.tmp")
            ):
                _die()

        def prune_then_maybe_die(root: Path, keep: int) -> None:
            if point == "prune" and saves[0] == int(nth):
                committed = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(checkpoint.PREFIX))
                if len(committed) > keep:
                    next(committed[0].glob("*.safetensors")).unlink()  # half-deleted
                    _die()
            prune(root, keep)

        checkpoint.save_checkpoint = counted_save
        checkpoint._fsync = fsync_then_maybe_die
        checkpoint._prune = prune_then_maybe_die
    elif kind == "enospc":
        nth, saves = int(arg), [0]
        save_file = checkpoint.save_file

        def full_disk(tensors, path, *args, **kwargs):
            if Path(path).name == "unet.safetensors":
                saves[0] += 1
                if saves[0] == nth:
                    save_file(tensors, path, *args, **kwargs)  # part of it fits...
                    raise OSError(28, "No space left on device", str(path))  # ...then the disk is full
            return save_file(tensors, path, *args, **kwargs)

        checkpoint.save_file = full_disk
    elif kind == "term_setup":
        from sdtrain.train import loop

        check_disk = loop.check_disk

        def terminated(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return check_disk(*args, **kwargs)

        loop.check_disk = terminated
    elif kind == "orphan_kill":
        nth, pid_file = arg.split(":", 1)
        calls = [0]
        loss = objective.diffusion_loss

        def fork_then_die(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(nth):
                child = os.fork()
                if child == 0:  # off the test's pipes, so that its wait for their end does not wait for this
                    devnull = os.open(os.devnull, os.O_RDWR)
                    for fd in (0, 1, 2):
                        os.dup2(devnull, fd)
                    time.sleep(120)
                    os._exit(0)
                Path(pid_file).write_text(str(child))
                _die()
            return loss(*args, **kwargs)

        objective.diffusion_loss = fork_then_die
    elif kind == "nan":
        rank, nth = (int(x) for x in arg.split(":"))
        calls = [0]
        loss = objective.diffusion_loss

        def nan_loss(*args, **kwargs):
            calls[0] += 1
            value, per_sample = loss(*args, **kwargs)
            if int(os.environ.get("RANK", "0")) == rank and calls[0] == nth:
                value = value * float("nan")
            return value, per_sample

        objective.diffusion_loss = nan_loss
    elif kind:
        raise ValueError(f"unknown SDTRAIN_FAULT {spec!r}")


def fsdp_on_cpu() -> None:
    """Let accelerate build FSDP on CPU processes when it was asked for (``accelerate launch --use_fsdp``): after
    accelerate's own set-up chose DDP over gloo, switch the state to FSDP with the plugin it built from the launch
    options. Everything after that (``prepare``'s ``fully_shard``, gradient sync, clipping) is accelerate's and torch's
    own code, as on GPUs."""
    import torch
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return
    init = AcceleratorState.__init__

    def init_then_shard(self, *args, **kwargs):
        built = AcceleratorState._shared_state.get("fsdp_plugin")  # by the Accelerator, before this call
        init(self, *args, **kwargs)  # every AcceleratorState() call copies the DDP type back in from PartialState
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or built or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = init_then_shard


def deepspeed_on_cpu() -> None:
    """Let accelerate build DeepSpeed on CPU processes when it was asked for (``accelerate launch --use_deepspeed``):
    after accelerate's own set-up chose DDP over gloo, switch the state to DeepSpeed with the plugin it built from
    the launch options, as its set-up does on accelerators. Everything after that (``prepare``'s
    ``deepspeed.initialize``, the engine's backward and step) is accelerate's and DeepSpeed's own code."""
    import torch
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return
    init = AcceleratorState.__init__

    def init_then_deepspeed(self, *args, **kwargs):
        init(self, *args, **kwargs)  # every AcceleratorState() call copies the DDP type back in from PartialState
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.DEEPSPEED
            if getattr(self, "deepspeed_plugins", None) is None:  # the first call: set the plugin up, once
                plugin = kwargs.get("deepspeed_plugin") or DeepSpeedPlugin()
                plugin.set_mixed_precision(self._mixed_precision)
                plugin.select(_from_accelerator_state=True)
                self.deepspeed_plugins = plugin
                self._mixed_precision = "no"  # DeepSpeed's config says the precision, as accelerate sets it up

    AcceleratorState.__init__ = init_then_deepspeed


if __name__ == "__main__":
    fsdp_on_cpu()
    deepspeed_on_cpu()
    _inject(os.environ.get("SDTRAIN_FAULT", ""))
    from sdtrain.cli import main

    sys.exit(main(sys.argv[1:]))

"""What a training run is made of besides its step: the Accelerator as launched, the micro-batch of each process,
the decisions every rank takes alike, skipped steps, the log records. The denoiser's loop (:mod:`sdtrain.train.loop`)
and stage 1's (:mod:`sdtrain.train.autoencoder`) share them (with :class:`~sdtrain.train.state.Counters`, the
checkpoint code and :class:`~sdtrain.train.preemption.StopSignal`), and ``sdtrain cache`` launches the way training
does."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin

from sdtrain.config import ConfigError, TrainConfig
from sdtrain.errors import Diverged, UserError
from sdtrain.train import zero
from sdtrain.train.progress import Progress
from sdtrain.train.sharding import check_strategy
from sdtrain.train.state import Counters
from sdtrain.train.tracking import check_trackers

logger = logging.getLogger(__name__)


def processes_on_cpu() -> bool:
    """Several processes on a machine without CUDA (`accelerate launch --multi_gpu` on CPUs): accelerate needs
    ``cpu=True`` to run them as DDP over gloo, else each process would train alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(tc: TrainConfig, unused_parameters: bool = False) -> Accelerator:
    """accelerate's Accelerator as launched (one process, DDP, FSDP2 or DeepSpeed), the strategies sdtrain cannot run
    refused, and the GPU's math settings (TF32, cuDNN autotuning); ``unused_parameters``: the denoiser has parameters
    its output does not depend on, which DDP is told to look for (else it waits for their gradients and fails)."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", tc.mixed_precision) != tc.mixed_precision:
        AcceleratorState._reset_state()  # a second run in this process (the Python API) with another precision
    check_trackers(tc.trackers)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation,
        cpu=processes_on_cpu(),
        log_with=tc.trackers or None,
        project_dir=Path(tc.output_dir),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if tc.compile else None,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_parameters else None,
    )
    check_strategy(accelerator, tc.optim.name)  # FSDP1 refused; FSDP2 shards (sdtrain.train.sharding)
    if tc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("train.mixed_precision=fp16 on a CPU: accelerate autocasts to fp16 on accelerators only, so "
                       "this run trains in fp32 (bf16 autocast runs on CPUs)")  # fmt: skip
    zero.check(accelerator, tc)  # DeepSpeed ZeRO partitions the optimizer, and at stage 3 the UNet (train.zero)
    zero.load_whole(accelerator)  # not partitioned by ZeRO-3's zero3_init as transformers loads them
    if torch.cuda.is_available():
        if tc.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = tc.cudnn_benchmark
    return accelerator


def micro_batch_size(tc: TrainConfig, accelerator: Accelerator) -> int:
    """Each process's micro-batch: ``train.batch_size`` is the global batch of every step, whatever the launch."""
    world, accumulation = accelerator.num_processes, tc.gradient_accumulation
    micro_batch, parts = divmod(tc.batch_size, accumulation * world)
    if micro_batch < 1 or parts:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is not a multiple of gradient_accumulation x processes "
            f"({accumulation} x {world}): it is the global batch every step trains on"
        )
    if accelerator.is_main_process:
        kind = accelerator.distributed_type.value
        kind += f" ZeRO-{zero.stage(accelerator)}" if zero.is_zero(accelerator) else ""
        logger.info(
            "world size %d (%s on %s): global batch %d = micro-batch %d x accumulation %d x processes %d",
            *(world, kind, accelerator.device, tc.batch_size, micro_batch, accumulation, world),
        )
    return micro_batch


def agree(accelerator: Accelerator, loss, grad_norm, stopping: bool, seconds: float) -> tuple[bool, bool, float]:
    """One all-reduce (max) of the step's flags: ``(non-finite loss or gradient on any rank, a stop signal on any
    rank, the largest elapsed time)``, the same on every rank."""
    device = accelerator.device
    finite = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=device))
    flags = torch.tensor([0.0, float(stopping), seconds], device=device, dtype=torch.float64)
    flags[0] = (~finite).double()
    flags = accelerator.reduce(flags, reduction="max")
    return bool(flags[0]), bool(flags[1]), float(flags[2])


def report(accelerator, bar: Progress, counters: Counters, record: dict, log_path: Path) -> None:
    """A log record: on the progress bar, appended to ``log.jsonl`` and sent to the trackers."""
    postfix = {"loss": f"{record['loss']:.4f}", "img_s": f"{record['images_per_s']:.0f}"}
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.4f}"
    bar.update(counters.step, counters.train_seconds, **postfix)
    append_record(log_path, record)
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    accelerator.log(scalars, step=record["step"])


def append_record(log_path: Path, record: dict[str, Any]) -> None:
    """One line of ``log.jsonl``."""
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def count_skip(
    counters: Counters, consecutive: int, limit: int, checkpoints: Path, remedy: str, note: str = ""
) -> None:
    """Count a step skipped for a non-finite loss or gradient (``note``: what else the log should say); the
    ``limit``-th in a row stops the run, pointing at the last checkpoint (whose weights are finite) and ``remedy``.

    Raises:
        RuntimeError: ``consecutive`` reached ``limit``.
    """
    counters.skipped_steps += 1
    logger.warning("non-finite loss or gradient at step %d: step skipped%s", counters.step, note)
    if consecutive >= limit:
        raise Diverged(
            f"{consecutive} consecutive steps had a non-finite loss or gradient (last: step {counters.step}); the "
            f"newest checkpoint in {checkpoints} holds finite weights. {remedy}"
        )


def append_to_log(log_path: Path, step: int, values: dict[str, float]) -> None:
    """Append ``values`` (a validation loss, fidelity scores) as a record of ``step``: the file is only ever appended
    to, and :func:`~sdtrain.train.tracking.read_log` merges them into the step's training record."""
    append_record(log_path, {"step": step, **values})


class RunLocked(UserError, RuntimeError):
    """Another process is training in the same run folder."""


# the run locks this process holds (the open lock files): a forked child closes its copies at once
_HELD: dict[int, Any] = {}
DEAD_HOLDER_GRACE_S = 10.0  # how long a restart waits for what a dead trainer left holding its lock


def _drop_inherited_locks() -> None:
    """In a child forked while a run lock is held (a data-loader worker): close its copy of the lock file. An flock
    lasts while any copy of the descriptor is open, so without this the workers a SIGKILLed trainer leaves behind
    would keep its run locked until they notice their parent is gone."""
    for f in _HELD.values():
        f.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _holder(text: str) -> tuple[int | None, bool]:
    """``(pid, alive)`` of the lock's recorded holder (``pid N on HOST since ...``); ``alive`` is True where it cannot
    be told (another host, another user's process, no record)."""
    words = text.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != socket.gethostname():
        return None, True
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return int(words[1]), False
    except PermissionError:
        pass
    return int(words[1]), True


def _take(f, path: Path, output_dir: str | Path) -> None:
    """flock ``f`` or raise RunLocked naming the holder. Where the recorded holder is dead, what it left behind is
    given :data:`DEAD_HOLDER_GRACE_S` to exit before the error says so (and never asks to wait for the dead)."""
    deadline = None
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
        pid, alive = _holder(text)
        if alive:
            raise RunLocked(f"{output_dir} is being trained by {text or 'another process'}: wait for it, stop it "
                            "(SIGTERM checkpoints and exits), or choose another output_dir") from None  # fmt: skip
        deadline = deadline or time.monotonic() + DEAD_HOLDER_GRACE_S
        if time.monotonic() > deadline:
            raise RunLocked(
                f"{path} is still locked although its trainer (pid {pid}) is dead: a process it started holds the "
                f"lock (`fuser -v {path}` names it); stop that process, then run the same command again"
            ) from None
        time.sleep(0.1)


@contextmanager
def run_lock(output_dir: str | Path, main_process: bool | None = None):
    """Hold ``output_dir/.lock`` for a whole run, so that a second trainer started on the same folder stops at once
    (naming the holder) instead of interleaving checkpoints with the first. The operating system releases the lock
    when its holder dies, however it dies; the holder's forked children (data-loader workers) never hold it. Only
    the main process (``RANK`` 0, as ``accelerate launch`` sets it) takes it.

    Raises:
        RunLocked: the folder is another live process's run (or a dead one's children still hold its lock).
    """
    main_process = int(os.environ.get("RANK", "0")) == 0 if main_process is None else main_process
    if not main_process:
        yield
        return
    path = Path(output_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        _take(f, path, output_dir)
        _HELD[f.fileno()] = f
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            yield
        finally:
            _HELD.pop(f.fileno(), None)
            fcntl.flock(f, fcntl.LOCK_UN)


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """The config as flat dotted scalars (trackers record hyperparameters that way)."""
    if dataclasses.is_dataclass(value):
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            flat.update(flat_config(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name))
        return flat
    if value is None:
        return {}
    return {prefix: value if isinstance(value, (int, float, str, bool)) else str(value)}

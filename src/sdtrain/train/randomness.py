"""Random draws that do not depend on the number of processes, and the RNG states a bit-exact resume restores.

Every rank holds the same generator (seeded by ``train.seed`` alone) and draws each random tensor for the whole
*global* micro-batch, then keeps its own rows. Rank ``r`` of ``W`` takes rows ``r, r + W, r + 2W, ...``, which are
exactly the samples its data sampler hands it (``EpochSampler`` deals its sequence out the same way). So sample
``j`` of a global micro-batch gets the same noise, timestep, posterior sample and caption dropout on one GPU or on
64, and a run's weights do not depend on how many processes trained it, whatever the dataset size (tested with 1
and 2 gloo processes on 5 images). The
draws for the other ranks' rows cost a few random numbers per latent element, nothing next to a UNet step.
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class SharedDraws:
    """A generator shared by all ranks, drawing for the global micro-batch and returning this rank's rows.

    Args:
        generator: seeded identically on every rank.
        rank, world_size: this process and the number of processes.
        micro_batch: samples per rank per micro-batch (the global micro-batch is ``micro_batch * world_size``).
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1, micro_batch: int = 1):
        self.generator, self.rank, self.world_size, self.micro_batch = generator, rank, world_size, micro_batch

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _mine(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full[self.rank :: self.world_size][:n]

    def _rows(self, n: int) -> int:
        # a rank whose batch lost samples to bad files still draws for the nominal size: the others stay aligned
        return max(n, self.micro_batch) * self.world_size

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal values of ``shape``; ``shape[0]`` is this rank's number of samples."""
        full = torch.randn((self._rows(shape[0]), *shape[1:]), generator=self.generator, device=self.device)
        return self._mine(full, shape[0])

    def rand(self, n: int) -> torch.Tensor:
        """Uniform [0, 1) values, one per sample."""
        return self._mine(torch.rand(self._rows(n), generator=self.generator, device=self.device), n)

    def randint(self, high: int, n: int) -> torch.Tensor:
        """Integers in [0, high), one per sample."""
        full = torch.randint(0, high, (self._rows(n),), generator=self.generator, device=self.device)
        return self._mine(full, n)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a step may touch: python, numpy, torch CPU (and this process's CUDA device), and the training
    generator."""
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor: the file is read back with torch.load(weights_only=True)
        "numpy": [
            torch.from_numpy(v.astype(np.int64)) if isinstance(v, np.ndarray) else v for v in np.random.get_state()
        ],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the device this process draws on, not every one it can see
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` returned, on a machine with as many GPUs or with others (another count, none)."""
    random.setstate(state["python"])  # torch.save keeps the tuples
    np.random.set_state(tuple(v.numpy().astype(np.uint32) if torch.is_tensor(v) else v for v in state["numpy"]))
    torch.set_rng_state(state["torch"])
    set_generator_state(generator, state["generator"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints written before: every visible device's state
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def set_generator_state(generator: torch.Generator, saved: torch.Tensor) -> None:
    """The training generator's saved state; one saved on another kind of device (a CUDA checkpoint resumed on a CPU,
    or the other way round: their generators' states differ in kind) seeds a new stream from it instead, with a
    warning: the run goes on, its draws no longer those of an uninterrupted run."""
    if saved.numel() == generator.get_state().numel():
        generator.set_state(saved)
        return
    seed = int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little") >> 1
    logger.warning(
        "the checkpoint's random draws were made on another kind of device than %s: the run goes on with a new "
        "stream of draws (seeded from the saved one), not the uninterrupted run's",
        generator.device.type,
    )
    generator.manual_seed(seed)

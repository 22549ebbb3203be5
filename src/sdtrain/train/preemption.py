"""Stopping a run cleanly: SIGTERM / SIGUSR1 (a scheduler's preemption notice) end the current step, write a
checkpoint and exit with :data:`EXIT_PREEMPTED`; running the same command resumes. Shared by the UNet loop and the
autoencoder loop."""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # exit code of `sdtrain train` / `train-vae` after SIGTERM / SIGUSR1: checkpoint written, rerun


class Preempted(RuntimeError):
    """Training stopped on SIGTERM / SIGUSR1 after writing a checkpoint; running the same command resumes."""


class StopSignal:
    """Records SIGTERM / SIGUSR1 so a loop can finish its step, checkpoint and stop (a context manager: the previous
    handlers come back on exit). Outside the main thread, where handlers cannot be set, it records nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

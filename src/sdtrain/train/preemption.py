"""Stopping a run cleanly: SIGTERM / SIGUSR1 (a scheduler's preemption notice) end the current step, write a
checkpoint and exit with :data:`EXIT_PREEMPTED`; running the same command resumes. Before the loop's first step
(models loading, data caching) they stop the run at once, with the same exit code. Shared by the UNet loop and the
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


class StopWhileSettingUp:
    """SIGTERM / SIGUSR1 before the loop takes over (models loading, the data being cached: minutes for a large
    model) stop the run at once with :class:`Preempted`, where the default action would kill it (exit -15, which a
    scheduler or the web UI reads as a failure). Nothing was trained since the newest checkpoint, so there is nothing
    to save; the caches write their files atomically, so a half-built one is resumed. A context manager:
    :meth:`done` (or leaving it) gives the previous handlers back, when the loop installs its own :class:`StopSignal`.
    Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        raise Preempted(f"stopped by {signal.Signals(signum).name} before the first step (nothing new to "
                        "checkpoint); running the same command starts or resumes the run")  # fmt: skip

    def done(self) -> None:
        """The previous handlers back (idempotent)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.done()

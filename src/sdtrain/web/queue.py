"""The queue of runs the web UI starts: a JSON file under the root (``.sdtrain/queue.json``, written atomically), so
it outlives the server; one run at a time per device, each ``sdtrain train`` in a process of its own.

A job is queued, running, stopping, then finished (exit 0), stopped (75: SIGTERM, checkpoint written), failed (any
other exit, or its process gone without a word) or cancelled (stopped before it started). A server that starts finds
the jobs a previous one left running and watches them again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.errors import UserError
from sdtrain.train.preemption import EXIT_PREEMPTED
from sdtrain.web.files import Root
from sdtrain.web.worker import write_atomically

ACTIVE = ("queued", "running", "stopping")
LOG_NAME = "train.log"  # the run's output, in its folder, appended to by every start


@dataclass
class Job:
    id: str
    run: str  # the run folder, relative to the root
    command: list[str]  # sdtrain's arguments: ["train", "--config", ..., overrides]
    state: str = "queued"
    device: str | None = None
    pid: int | None = None
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None


def device_env(device: str) -> dict[str, str]:
    """The environment of a run on ``device``: ``cpu`` hides the GPUs, ``cuda:N`` (or ``N``) shows GPU N alone,
    ``default`` changes nothing."""
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device != "default":
        env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
    return env


class Queue:
    """The jobs of a root, and the scheduler that starts them (:meth:`tick`, or :meth:`start` for a thread)."""

    def __init__(self, root: Root, devices: tuple[str, ...] = ("default",), program: list[str] | None = None):
        """``program``: what a job's command is given to (``python -m sdtrain``; tests give another)."""
        self.root, self.devices = root, tuple(devices) or ("default",)
        self.program = program or [sys.executable, "-m", "sdtrain"]
        self.file = root.state_dir() / "queue.json"
        self.jobs_dir = root.state_dir() / "jobs"
        self.jobs_dir.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._children: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self.jobs: list[Job] = self._read()

    # --- the file

    def _read(self) -> list[Job]:
        if not self.file.is_file():
            return []
        try:
            return [Job(**entry) for entry in json.loads(self.file.read_text())["jobs"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f"{self.file}: not a queue this server wrote ({e}); move it away to start afresh"
            ) from None

    def _write(self) -> None:
        write_atomically(self.file, json.dumps({"jobs": [asdict(j) for j in self.jobs]}, indent=1))

    # --- what the pages ask

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(j) for j in self.jobs]

    def latest(self, run: str) -> Job | None:
        """The newest job of run folder ``run``."""
        with self._lock:
            return next((j for j in reversed(self.jobs) if j.run == run), None)

    def submit(self, run: str, command: list[str]) -> Job:
        """Queue ``sdtrain COMMAND`` for run folder ``run``; refused while that run has a job queued or running."""
        with self._lock:
            active = self.latest(run)
            if active is not None and active.state in ACTIVE:
                raise UserError(f"{run} is {active.state} already: stop it first, or choose another run name")
            job = Job(id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", run=run, command=command)
            self.jobs.append(job)
            self._write()
        self.tick()
        return job

    def stop(self, run: str) -> Job:
        """Stop run ``run``: a queued job is cancelled; a running one gets SIGTERM (it checkpoints and exits 75)."""
        with self._lock:
            job = self.latest(run)
            if job is None or job.state not in ACTIVE:
                raise UserError(f"{run} is not queued or running")
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
            elif job.state == "running":
                try:
                    os.kill(job.pid, signal.SIGTERM)  # the worker passes it on to the run
                    job.state = "stopping"
                except ProcessLookupError:  # it ended a moment ago: the next tick says how
                    pass
            self._write()
            return job

    def resume(self, run: str) -> Job:
        """Queue run ``run`` again with the command it was started with: training resumes from its newest
        checkpoint."""
        with self._lock:
            job = self.latest(run)
            if job is None:
                raise UserError(f"{run} was not started here, so there is no command to resume it with")
            return self.submit(run, job.command)

    # --- the scheduler

    def tick(self) -> None:
        """Notice the jobs that ended and start queued ones on free devices."""
        with self._lock:
            changed = False
            for job in self.jobs:
                if job.state in ("running", "stopping") and not self._alive(job):
                    self._ended(job)
                    changed = True
            busy = {j.device for j in self.jobs if j.state in ("running", "stopping")}
            for job in self.jobs:
                free = [d for d in self.devices if d not in busy]
                if job.state == "queued" and free:
                    self._launch(job, free[0])
                    busy.add(free[0])
                    changed = True
            if changed:
                self._write()

    def _launch(self, job: Job, device: str) -> None:
        run = self.root.path / job.run
        run.mkdir(parents=True, exist_ok=True)
        exit_file = self.jobs_dir / f"{job.id}.exit.json"
        command = [sys.executable, "-m", "sdtrain.web.worker", str(exit_file), str(run / LOG_NAME), "--"]
        command += [*self.program, *job.command]
        quiet = subprocess.DEVNULL  # the run's output goes to its log, through the worker
        child = subprocess.Popen(command, cwd=self.root.path, env=device_env(device), start_new_session=True,
                                 stdin=quiet, stdout=quiet, stderr=quiet)  # fmt: skip
        self._children[job.id] = child
        job.state, job.device, job.pid, job.started = "running", device, child.pid, time.time()

    def _alive(self, job: Job) -> bool:
        """Whether the job's worker is still running: polled where this server started it, else looked up (a job a
        previous server started: its pid, and that the pid is still that worker, not a process that reused it)."""
        child = self._children.get(job.id)
        if child is not None:
            return child.poll() is None
        if job.pid is None:
            return False
        try:
            os.kill(job.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process took the pid
            return False
        cmdline = Path(f"/proc/{job.pid}/cmdline")
        return not cmdline.exists() or job.id.encode() in cmdline.read_bytes()

    def _ended(self, job: Job) -> None:
        self._children.pop(job.id, None)
        exit_file = self.jobs_dir / f"{job.id}.exit.json"
        try:
            job.returncode = json.loads(exit_file.read_text())["returncode"]
        except (OSError, json.JSONDecodeError, KeyError):
            job.returncode = None  # the worker itself was killed
        job.ended = time.time()
        job.state = {0: "finished", EXIT_PREEMPTED: "stopped"}.get(job.returncode, "failed")

    def start(self, every: float = 0.5) -> None:
        """Run :meth:`tick` every ``every`` seconds in a thread until :meth:`close`."""

        def loop() -> None:
            while not self._stop.wait(every):
                self.tick()

        self.tick()
        threading.Thread(target=loop, name="sdtrain-queue", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

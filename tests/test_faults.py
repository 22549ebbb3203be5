"""Never lose a run: real subprocesses killed with SIGKILL at random steps and inside saves, resumed, and compared
bit for bit with an uninterrupted run; SIGTERM and a NaN on one rank of a 2-process gloo run.

The faults are injected by ``tests/faults.py`` (see its docstring). Kill points are drawn at random; the seed is in
every failure message and ``SDTRAIN_TEST_SEED`` replays it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.train import checkpoint
from sdtrain.train.preemption import EXIT_PREEMPTED
from tests.conftest import tiny_overrides

FAULTS = Path(__file__).parent / "faults.py"
KILLED = -9  # Popen's return code for a process that died of SIGKILL
# Comparing 1 and 2 processes: the all-reduce sums gradients in another order, and with Adam's default eps the update
# g / (sqrt(v) + eps) of a parameter whose gradient is ~1e-9 turns that rounding into a full-size step. A larger eps
# keeps the comparison about the gradients (max difference 1e-7 after 3 steps, 2e-4 with eps 1e-8).
ADAM_EPS = "train.optim.eps=1e-4"

pytestmark = pytest.mark.slow  # SIGKILL chains and multi-process faults: make test-all


def _env(fault: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("SDTRAIN_FAULT", None)
    if fault:
        env["SDTRAIN_FAULT"] = fault
    return env


def _train(
    overrides: list[str], fault: str | None = None, file_limit: int | None = None, verb: str = "train"
) -> subprocess.CompletedProcess:
    """``sdtrain VERB`` in a subprocess with ``fault`` injected; ``file_limit``: the largest file it may write, in
    bytes (``ulimit -f``: a write past it fails with EFBIG, as on a full disk)."""
    command = [sys.executable, str(FAULTS), verb, *overrides]
    limit = None if file_limit is None else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    return subprocess.run(command, env=_env(fault), capture_output=True, text=True, timeout=300, preexec_fn=limit)


def _losses(run: Path) -> list[tuple[int, float]]:
    from sdtrain.train.tracking import read_log

    return [(r["step"], r["loss"]) for r in read_log(run / "log.jsonl")]  # a step's scores merged into its record


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors")


def _overrides(run: Path, data: Path, vae: Path, clip: Path) -> list[str]:
    return tiny_overrides(run, data, vae, str(clip), "text_encoder") + [
        "data.num_workers=2",
        "train.gradient_accumulation=2",  # micro-batches of 2: a kill can land between them
        "train.num_steps=20",
        "train.save_every=3",  # 8 images = 2 steps an epoch: every other checkpoint falls mid-epoch
        "train.keep_checkpoints=2",
    ]


def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path, clip_dir, vae_dir, image_folder):
    seed = int(os.environ.get("SDTRAIN_TEST_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    straight = _train(_overrides(tmp_path / "a", image_folder, vae_dir, clip_dir))
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "b"
    overrides = _overrides(run, image_folder, vae_dir, clip_dir)
    # two kills at random micro-batches, then one inside each stage of a save, then another random kill; a process
    # gets at most 3 steps further, so 20 steps leave room for every fault
    faults = [f"kill_micro={rng.randint(2, 7)}", f"kill_micro={rng.randint(2, 7)}"]
    faults += [f"kill_save=1:{point}" for point in ("file", "manifest", "committed", "pointer", "prune")]
    faults += [f"kill_micro={rng.randint(2, 7)}"]
    for fault in faults:
        result = _train(overrides, fault)
        assert result.returncode == KILLED, f"seed {seed}, {fault}: not killed\n{result.stderr[-3000:]}"
    result = _train(overrides)
    assert result.returncode == 0, f"seed {seed}\n{result.stderr[-3000:]}"

    assert _losses(run) == _losses(tmp_path / "a"), f"seed {seed}, faults {faults}"
    assert [s for s, _ in _losses(run)] == list(range(1, 21))  # each step logged once
    a, b = _weights(tmp_path / "a"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}, faults {faults}"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-00000018", "step-00000020"], names  # no temporary or half-pruned leftovers


def test_kill_inside_first_save_resumes_from_scratch_not_from_garbage(tmp_path, clip_dir, vae_dir, image_folder):
    run = tmp_path / "run"
    overrides = _overrides(run, image_folder, vae_dir, clip_dir) + ["train.num_steps=2"]
    assert _train(overrides, "kill_save=1:manifest").returncode == KILLED
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".tmp-")] == []
    assert checkpoint.find_latest(run / "checkpoints") is None
    assert _train(overrides).returncode == 0


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, clip_dir, vae_dir, image_folder):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder") + ["train.num_steps=6"]
    result = _train(overrides, "enospc=2")  # saves at steps 2 (fine), 4 (disk full)
    assert result.returncode != 0
    assert "could not write the checkpoint of step 4" in result.stderr and "step-00000002 is intact" in result.stderr
    assert "[Errno 28] No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]  # no temp folder
    checkpoint.verify(run / "checkpoints" / "step-00000002")
    assert _train(overrides).returncode == 0  # space freed: the same command resumes from step 2


def test_restart_right_after_a_sigkill_resumes_while_its_workers_still_live(tmp_path, clip_dir, vae_dir, image_folder):
    """kill -9 with 2 data-loader workers and a forked child that lives on (an orphan slow to notice), then the same
    command at once, as systemd or a requeue does: it takes the lock, resumes, and ends with an uninterrupted run's
    weights."""
    straight = _train(_overrides(tmp_path / "a", image_folder, vae_dir, clip_dir))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run, pid_file = tmp_path / "b", tmp_path / "orphan.pid"
    overrides = _overrides(run, image_folder, vae_dir, clip_dir)
    assert _train(overrides, f"orphan_kill=9:{pid_file}").returncode == KILLED  # after the checkpoint of step 3
    orphan = int(pid_file.read_text())
    try:
        os.kill(orphan, 0)  # the killed trainer's child still runs as the restart starts
        result = _train(overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from" in result.stderr
    finally:
        subprocess.run(["kill", "-9", str(orphan)], capture_output=True)  # if it still runs
    a, b = _weights(tmp_path / "a"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_while_setting_up_exits_75_in_one_line_and_the_rerun_trains(tmp_path, clip_dir, vae_dir, image_folder):
    """SIGTERM while the models load: `sdtrain train` exits with the stopped code (75, what the web UI shows as
    stopped and resumes), one line and no traceback, where it used to die of the signal (-15, a failure)."""
    from sdtrain.train.preemption import EXIT_PREEMPTED

    overrides = _overrides(tmp_path / "run", image_folder, vae_dir, clip_dir) + ["train.num_steps=2"]
    result = _train(overrides, "term_setup")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == EXIT_PREEMPTED and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("sdtrain: stopped by SIGTERM before the first step"), last
    assert _train(overrides).returncode == 0


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, clip_dir, vae_dir, image_folder):
    """Writes refused for want of space (``ulimit -f``: EFBIG, as the issue tried) while a checkpoint or an export is
    written: one line naming what could not be written where, the errno, the last good checkpoint and that a rerun
    resumes from it; the rerun with space ends with an uninterrupted run's weights."""
    tiny = ["train.num_steps=4", "train.save_every=2"]
    straight = _train(tiny_overrides(tmp_path / "a", image_folder, vae_dir, str(clip_dir), "text_encoder") + tiny)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "b"
    overrides = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder") + tiny
    assert _train(overrides, "kill_micro=3").returncode == KILLED  # the checkpoint of step 2 is written
    result = _train(overrides, file_limit=200_000)  # a UNet's weights are ~1 MB: the checkpoint of step 4 fails
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last == (
        f"sdtrain: could not write the checkpoint of step 4 to {run / 'checkpoints'} ([Errno 27] File too large); "
        "step-00000002 is intact: free some space and run the same command to resume from it"
    ), last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    result = _train(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _weights(tmp_path / "a"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # `sdtrain export` of a checkpoint onto a full disk
    out = tmp_path / "export"
    result = _train(["--run", str(run), "--out", str(out)], file_limit=200_000, verb="export")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"sdtrain: could not write the export {out} ([Errno 27] File too large); "), last
    assert last.endswith("step-00000004 is intact: free some space and run the same command again"), last


def test_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, clip_dir, vae_dir, image_folder):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder")
    assert _train(overrides).returncode == 0  # checkpoints at steps 2 and 4
    weights = run / "checkpoints" / "step-00000004" / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a torn write
    result = _train(overrides + ["train.num_steps=6"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000004 is unusable" in result.stderr and "resumed from" in result.stderr
    assert "step-00000002 at step 2" in result.stderr
    steps = [s for s, _ in _losses(run)]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 trained again, logged once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(overrides: list[str], fault: str | None = None) -> list[subprocess.Popen]:
    """Two gloo ranks started by hand (the environment torchrun / accelerate launch would set), so that each
    rank's exit code can be checked."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(fault, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank))
        env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(FAULTS), "train", *overrides],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def test_sigterm_on_one_rank_stops_both_with_a_checkpoint_and_resume_matches(
    tmp_path, clip_dir, vae_dir, image_folder
):
    import signal

    base = tiny_overrides(tmp_path / "a", image_folder, vae_dir, str(clip_dir), "text_encoder")
    steps = ["train.num_steps=8", "train.save_every=100"]
    procs = _launch_two(base + steps)
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]

    run = tmp_path / "b"
    overrides = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder") + steps
    procs = _launch_two(overrides)
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told; rank 0 learns it from the all-reduce
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], [p.stderr.read()[-3000:] for p in procs]
    latest = checkpoint.find_latest(run / "checkpoints")
    state = json.loads((latest / "state.json").read_text())
    assert 2 <= state["step"] < 8 and len(state["data"]) == 2  # both ranks' data positions were saved
    procs = _launch_two(overrides)
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    (steps_a, losses_a), (steps_b, losses_b) = zip(*_losses(tmp_path / "a")), zip(*_losses(run))
    assert steps_b == steps_a and losses_b == pytest.approx(losses_a, rel=1e-5)
    a, b = _weights(tmp_path / "a"), _weights(run)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, clip_dir, vae_dir, image_folder):
    """NaN on rank 1 at step 2: the 2-process run skips step 2 everywhere and ends with the weights of a 1-process
    run (same global batch) whose step 2 was skipped. Had any rank stepped, its replica (and the export) would differ;
    had none skipped, the weights would be NaN."""
    overrides = ["train.num_steps=3", "train.save_every=100", "train.ema_decay=null", ADAM_EPS]
    single = tiny_overrides(tmp_path / "one", image_folder, vae_dir, str(clip_dir), "text_encoder") + overrides
    assert _train(single, "nan=0:2").returncode == 0
    run = tmp_path / "two"
    two = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder") + overrides
    procs = _launch_two(two, fault="nan=1:2")  # rank 1's second micro-batch = step 2
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    for name in ("one", "two"):
        log = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert [r["skipped_steps"] for r in log] == [0, 1, 1]
    a, b = _weights(tmp_path / "one"), _weights(run)
    assert all(torch.isfinite(b[k]).all() and torch.allclose(a[k], b[k], atol=1e-6) for k in a)

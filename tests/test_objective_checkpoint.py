"""The diffusion math against closed-form formulas; atomic checkpoints and their verification; safe loading."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from sdtrain import objective
from sdtrain.config import ConfigError, ObjectiveConfig, OptimConfig
from sdtrain.errors import StorageError
from sdtrain.train import checkpoint
from sdtrain.train.optim import lr_factor, param_groups
from sdtrain.train.randomness import SharedDraws


def _setup(prediction_type: str, zsnr: bool = False):
    sched = objective.make_noise_scheduler(
        ObjectiveConfig(prediction_type=prediction_type, rescale_zero_terminal_snr=zsnr)
    )
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    return sched, x0, eps, t, ab


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_noising_and_targets_match_closed_form(kind):
    sched, x0, eps, t, ab = _setup(kind)
    xt = sched.add_noise(x0, eps, t)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-5)
    expected = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[kind]
    assert torch.allclose(objective.target(sched, x0, eps, t), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_closed_form(kind):
    sched, _, _, t, ab = _setup(kind)
    snr = (ab / (1 - ab)).flatten()
    w = objective.loss_weights(sched, t, 5.0)
    expected = {
        "epsilon": snr.clamp(max=5) / snr,
        "v_prediction": snr.clamp(max=5) / (snr + 1),
        "sample": snr.clamp(max=5),
    }
    assert torch.allclose(w, expected[kind], rtol=1e-4)
    assert torch.equal(objective.loss_weights(sched, t, None), torch.ones(6))


def test_zero_terminal_snr_keeps_last_step_trained():
    sched, x0, eps, t, _ = _setup("v_prediction", zsnr=True)
    assert sched.alphas_cumprod[-1] == 0
    assert objective.snr(sched, t)[-1] == 0
    assert objective.loss_weights(sched, t, 5.0)[-1] == 1.0
    # at zero SNR the v target is -x0: the model must predict the image from pure noise
    assert torch.allclose(objective.target(sched, x0, eps, t)[-1], -x0[-1], atol=1e-6)
    with pytest.raises(ConfigError):
        ObjectiveConfig(prediction_type="epsilon", rescale_zero_terminal_snr=True)


def test_noise_offset_adds_per_channel_constant():
    noise = objective.sample_noise((64, 4, 8, 8), 0.5, SharedDraws(torch.Generator().manual_seed(0)))
    channel_means = noise.mean(dim=(2, 3))
    assert channel_means.std() > 0.35  # plain N(0, 1) noise would give ~1/8


def test_loss_is_weighted_mse():
    out, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    loss, per_sample = objective.diffusion_loss(out, target, torch.tensor([1.0, 3.0]))
    assert per_sample.tolist() == [1.0, 1.0] and loss.item() == 2.0


def test_lr_schedule_warmup_cosine_floor():
    c = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, c) == pytest.approx(0.1)
    assert lr_factor(10, 0.0, c) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, c) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, c) == pytest.approx(0.1)


def test_the_decay_starts_at_the_peak_where_the_warm_up_ends():
    """The lr is continuous at the end of warm-up (it used to drop there to the cosine's value at that share of the
    run: from 1.0 to 0.55 for 100 warm-up steps of 200), and by steps it is diffusers' cosine schedule with warm-up
    (whose warm-up starts at 0 where sdtrain's takes its first step at 1 / warmup_steps)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    total, warmup = 200, 100
    c = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.0)
    ours = [lr_factor(s, s / total, c, warmup / total) for s in range(total)]
    assert ours[warmup - 1] == 1.0 and ours[warmup] == 1.0 and ours[150] == pytest.approx(0.5)
    assert max(abs(a - b) for a, b in zip(ours, ours[1:])) < 0.016  # no jump: at most the cosine's slope, pi / 200
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs.step()
    assert ours[warmup:] == pytest.approx(lrs[warmup:], abs=1e-12)
    linear = OptimConfig(lr=1.0, schedule="linear", warmup_steps=warmup, min_lr_ratio=0.1)
    assert lr_factor(warmup, 0.5, linear, 0.5) == 1.0 and lr_factor(150, 0.75, linear, 0.5) == pytest.approx(0.55)


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.ndim for p in decay["params"]] == [2]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def _save(root, step, value=1.0, keep=2):
    tensors = {"unet": {"w": torch.full((4,), value)}}
    return checkpoint.save_checkpoint(root, step, tensors, {"optimizer": {"state": {}}}, {"step": step}, keep=keep)


def test_checkpoint_round_trip_rotation_and_pointer(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, float(step))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-00000002", "step-00000003"]
    assert (tmp_path / "latest").read_text() == "step-00000003"
    tensors, objects, state = checkpoint.load_checkpoint(checkpoint.find_latest(tmp_path))
    assert state["step"] == 3 and torch.equal(tensors["unet"]["w"], torch.full((4,), 3.0))
    manifest = json.loads((tmp_path / "step-00000003" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"unet.safetensors", "optimizer.pt", "state.json"}


def test_corrupt_newest_checkpoint_falls_back_with_message(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2, 2.0)
    data = bytearray((newest / "unet.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "unet.safetensors").write_bytes(bytes(data))
    assert checkpoint.find_latest(tmp_path).name == "step-00000001"
    assert "step-00000002" in caplog.text and "sha256" in caplog.text


def test_partial_checkpoint_is_ignored_and_all_bad_is_an_error(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "step-00000002").mkdir()  # a crash between mkdir and manifest
    assert checkpoint.find_latest(tmp_path).name == "step-00000001"
    (tmp_path / "step-00000001" / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no valid checkpoint"):
        checkpoint.find_latest(tmp_path)


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    checkpoint.verify(tmp_path / "step-00000001")


class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_non_finite_weights_are_found_and_not_checkpointed():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sdtrain.train.sharding import all_finite
    from sdtrain.train.state import Counters, save_training_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.NO, device=torch.device("cpu"), unwrap_model=lambda m, **_: m
    )
    assert all_finite(accelerator, model)
    with torch.no_grad():
        model[1].bias[1] = float("inf")
    assert not all_finite(accelerator, model)
    with pytest.raises(RuntimeError, match="non-finite weights at step 7"):
        save_training_state(accelerator, Path("unused"), 2, model, None, None, None, None, Counters(step=7))


def test_pickle_payload_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path / "ckpt", 1)
    (path / "optimizer.pt").write_bytes(pickle.dumps(_Boom()))
    # even with a manifest that matches the malicious file, loading refuses to unpickle it
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {
        "size": (path / "optimizer.pt").stat().st_size,
        "sha256": checkpoint.file_sha256(path / "optimizer.pt"),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_logit_normal_timesteps_concentrate_at_mid_noise():
    config = ObjectiveConfig(timestep_sampling="logit_normal")
    draws = SharedDraws(torch.Generator().manual_seed(0))
    t = objective.sample_timesteps(20000, config, draws)
    u = objective.sample_timesteps(20000, ObjectiveConfig(), draws)
    assert t.min() >= 0 and t.max() <= 999
    mid = lambda x: ((x > 250) & (x < 750)).float().mean().item()  # noqa: E731
    assert mid(t) > 0.6 and 0.45 < mid(u) < 0.55  # logit-normal(0, 1): 73 % inside, uniform: 50 %
    assert abs(t.float().median().item() - 500) < 15


def test_timestep_range_and_input_perturbation():
    draws = SharedDraws(torch.Generator().manual_seed(0))
    for sampling in ("uniform", "logit_normal"):
        config = ObjectiveConfig(timestep_sampling=sampling, min_timestep=200, max_timestep=299)
        t = objective.sample_timesteps(5000, config, draws)
        assert 200 <= t.min() and t.max() <= 299
        if sampling == "uniform":
            assert t.min() == 200 and t.max() == 299
    with pytest.raises(ConfigError, match="timestep range"):
        ObjectiveConfig(min_timestep=500, max_timestep=100)
    noise = torch.randn(4000, 8)
    assert objective.perturb(noise, 0.0, draws) is noise
    extra = objective.perturb(noise, 0.1, draws) - noise
    assert abs(extra.std().item() - 0.1) < 0.005  # gamma times standard normal noise


def test_shared_draws_split_the_global_batch_across_ranks():
    """Rank r of W gets rows r, r + W, ... of what one process drawing for the whole micro-batch gets."""
    single = SharedDraws(torch.Generator().manual_seed(3), 0, 1, micro_batch=6)
    full = single.randn((6, 2)), single.rand(6), single.randint(1000, 6)
    for rank in range(3):
        draws = SharedDraws(torch.Generator().manual_seed(3), rank, 3, micro_batch=2)
        mine = draws.randn((2, 2)), draws.rand(2), draws.randint(1000, 2)
        for a, b in zip(full, mine):
            assert torch.equal(a[rank::3], b)


def test_remote_code_is_refused_without_the_flag(tmp_path, monkeypatch):
    """A text encoder folder whose config maps AutoModel to code shipped with it: that code never runs by default."""
    from sdtrain.models.text import load_text_encoder

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    payload = "open('PWNED', 'w').write('x')\n"
    (folder / "configuration_evil.py").write_text(payload + "from transformers import PretrainedConfig\n")
    (folder / "modeling_evil.py").write_text(payload)
    config = {
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_text_encoder(str(folder))
    assert not (tmp_path / "PWNED").exists()


def test_old_torch_is_refused():
    from sdtrain import check_torch

    for version in ("2.5.1", "2.5.1+cu121", "1.13.0", "2.6.0.dev20240101"):
        if version.startswith("2.6"):
            check_torch(version)
        else:
            with pytest.raises(RuntimeError, match="torch >= 2.6"):
                check_torch(version)
    check_torch("2.13.0+cpu")
    check_torch("3.0.0")


def test_start_up_refuses_an_unwritable_or_full_output_folder(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from sdtrain.train.state import check_disk

    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights: a checkpoint with Adam and EMA is ~16 MB
    check_disk(tmp_path, model, with_ema=True)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 20 * 2**20))
    with pytest.raises(StorageError, match="two checkpoints need"):
        check_disk(tmp_path, model, with_ema=True)
    monkeypatch.undo()

    def denied(self, data):  # chmod would not stop root, so the refusal is simulated where the probe writes
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(StorageError, match="cannot write"):
        check_disk(tmp_path, model, with_ema=False)


def test_rng_states_restore_on_another_gpu_count_or_device_kind(monkeypatch, caplog):
    """A checkpoint saves this process's CUDA RNG state (older ones: every visible GPU's); resumed on a machine with
    fewer GPUs it restores the current device's state where it has one and never indexes past the machine's GPUs. A
    training generator saved on another kind of device seeds a new stream, the same for the same checkpoint."""
    from sdtrain.train import randomness

    generator = torch.Generator().manual_seed(0)
    state = randomness.rng_state(generator)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(int(s[0])))
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # an 8-GPU run's file
    randomness.set_rng_state({**state, "cuda": states}, generator)
    randomness.set_rng_state({**state, "cuda": states[:4]}, generator)  # this process is on GPU 5 of 4 saved
    randomness.set_rng_state({**state, "cuda": states[3]}, generator)  # a new file: one device's state
    assert restored == [5, 3]
    monkeypatch.undo()

    draws = []
    cuda_generator_state = torch.arange(16, dtype=torch.uint8)  # a CUDA (Philox) generator's state: seed and offset
    for _ in range(2):
        with caplog.at_level("WARNING", logger="sdtrain.train.randomness"):
            randomness.set_rng_state({**state, "generator": cuda_generator_state}, generator)
        draws.append(torch.randn(4, generator=generator))
    assert "another kind of device" in caplog.text and torch.equal(draws[0], draws[1])
    randomness.set_rng_state(state, generator)  # the same kind: restored exactly
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=torch.Generator().manual_seed(0)))


def test_a_manifest_of_the_wrong_shape_or_unlisted_files_fall_back_to_the_previous_checkpoint(tmp_path, caplog):
    """A manifest that is valid JSON but not a manifest is a CheckpointError (not a KeyError), and so is a file the
    manifest does not list (load_checkpoint would load it): either way the previous checkpoint is used."""
    for damage in ("list", "no_files", "bad_entry", "unlisted", "path"):
        root = tmp_path / damage
        _save(root, 1)
        newest = _save(root, 2, 2.0)
        manifest = json.loads((newest / checkpoint.MANIFEST).read_text())
        if damage == "list":
            (newest / checkpoint.MANIFEST).write_text("[1, 2]")
        elif damage == "no_files":
            (newest / checkpoint.MANIFEST).write_text(json.dumps({"step": 2}))
        elif damage == "bad_entry":
            manifest["files"]["state.json"] = "abc"
            (newest / checkpoint.MANIFEST).write_text(json.dumps(manifest))
        elif damage == "unlisted":
            _save(tmp_path / "other", 2, 3.0)  # a planted weight file: sorted after unet.safetensors, it would win
            (newest / "zz.safetensors").write_bytes(
                (tmp_path / "other" / "step-00000002" / "unet.safetensors").read_bytes()
            )
        else:
            manifest["files"]["../state.json"] = manifest["files"]["state.json"]
            (newest / checkpoint.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load_checkpoint(newest)
        assert checkpoint.find_latest(root).name == "step-00000001", damage


def test_a_second_trainer_on_the_same_run_stops_and_only_dead_writers_temp_folders_go(
    tmp_path, capsys, vae_dir, image_folder
):
    import subprocess
    import sys
    import time

    from sdtrain.cli import main

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom sdtrain.train.run import run_lock\n"
            f"with run_lock({str(tmp_path / 'run')!r}, main_process=True):\n    print('held', flush=True)\n"
            "    time.sleep(60)",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        sources = [f"model.vae.path={vae_dir}", f"data.path={image_folder}"]  # a run that would start
        assert main(["train", "--config", "demo", f"train.output_dir={tmp_path / 'run'}", *sources]) == 2
        err = capsys.readouterr().err
        assert f"is being trained by pid {holder.pid} on" in err and "Traceback" not in err
        # a checkpoint save removes the temporary folder of a dead writer, not a live one's
        root = tmp_path / "ckpt"
        live, dead = root / f".tmp-step-00000003-{holder.pid}", root / ".tmp-step-00000003-999999999"
        live.mkdir(parents=True)
        dead.mkdir()
        _save(root, 1)
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    from sdtrain.train.run import run_lock

    with run_lock(tmp_path / "run", main_process=True):  # the OS released the dead holder's lock
        assert "pid" in (tmp_path / "run" / ".lock").read_text()


def test_a_killed_trainers_forked_children_do_not_hold_its_run_lock(tmp_path):
    """A trainer SIGKILLed (the OOM killer, a requeue) while its data-loader workers live: a restart at once takes the
    lock, as the workers (forked children) closed their copies of it. Before, they held it until they noticed their
    parent was gone, and the restart was sent to wait for a dead process."""
    import subprocess
    import sys
    import time

    from sdtrain.train.run import DEAD_HOLDER_GRACE_S, run_lock

    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, time\nfrom sdtrain.train.run import run_lock\n"
            f"with run_lock({str(tmp_path / 'run')!r}, main_process=True):\n"
            "    child = os.fork()\n"
            "    if child == 0:\n"
            "        time.sleep(30)\n"
            "        os._exit(0)\n"
            "    print(child, flush=True)\n"
            "    time.sleep(0.3)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = int(trainer.stdout.readline())
    try:
        assert trainer.wait(timeout=30) == -9
        os.kill(worker, 0)  # the orphaned child still runs
        started = time.monotonic()
        with run_lock(tmp_path / "run", main_process=True):
            assert time.monotonic() - started < DEAD_HOLDER_GRACE_S / 2  # taken at once, not after the grace
    finally:
        os.kill(worker, 9)


def test_a_lock_held_for_a_dead_trainer_says_so(tmp_path, monkeypatch):
    """Whatever holds a lock whose recorded trainer is dead gets a short grace, then the message says the trainer is
    dead and how to find the holder; it never asks to wait for the dead."""
    import fcntl
    import socket
    import subprocess
    import sys

    from sdtrain.train import run

    monkeypatch.setattr(run, "DEAD_HOLDER_GRACE_S", 0.5)
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(f"pid 999999999 on {socket.gethostname()} since 2026-12-04 06:00:00\n")  # no such process
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, time\nf = open({str(lock)!r})\nfcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\ntime.sleep(30)",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run.RunLocked) as raised:
            with run.run_lock(tmp_path / "run", main_process=True):
                pass
        message = str(raised.value)
        assert "pid 999999999) is dead" in message and f"fuser -v {lock}" in message and "wait" not in message
    finally:
        holder.kill()
        holder.wait()
    with open(lock) as f:  # and the lock is free once the holder is gone
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_torn_last_log_line_is_dropped_and_records_are_appended(tmp_path, caplog):
    from sdtrain.train.run import append_record, append_to_log
    from sdtrain.train.state import truncate_log
    from sdtrain.train.tracking import read_log

    log = tmp_path / "log.jsonl"
    for step in (1, 2, 3):
        append_record(log, {"step": step, "loss": 0.5})
    before = log.read_text()
    append_to_log(log, 3, {"val_loss": 0.25})
    assert log.read_text().startswith(before)  # appended, not rewritten
    assert read_log(log)[-1] == {"step": 3, "loss": 0.5, "val_loss": 0.25}  # merged into the step's record
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a write
    assert [r["step"] for r in read_log(log)] == [1, 2, 3] and "not a log record" not in caplog.text
    truncate_log(log, 2)
    assert log.read_text() == before.rsplit("\n", 2)[0] + "\n"
    append_record(log, {"step": 3, "loss": 0.4})
    log.write_text(log.read_text() + '{"step": 4, "lo')
    truncate_log(log, 10)  # a resume past every record still drops the torn line
    assert [r["step"] for r in read_log(log)] == [1, 2, 3] and log.read_text().endswith("\n")

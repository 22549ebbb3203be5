"""Scale-out through accelerate: `accelerate launch` with 2 CPU processes (gloo DDP) trains the weights one process
trains with the same global batch, scores them as one process does (each drawing its share), and only the main
process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sdtrain.train.tracking import read_log
from tests.conftest import tiny_overrides
from tests.test_faults import ADAM_EPS, _env, _free_port, _losses, _train, _weights


def test_accelerate_launch_two_processes_equals_one(
    tmp_path, clip_dir, vae_dir, image_folder, inception_file, clip_model_dir
):
    # caption dropout, posterior sampling, noise and timesteps all random: the draws must not depend on the ranks
    overrides = ["train.num_steps=4", "train.save_every=2", "data.caption_dropout=0.3", ADAM_EPS]
    # FID / KID / CLIP score every 2 steps, each process scoring its share of 3 held-out images; 5 images train, a
    # number the processes do not divide (epochs end mid-batch)
    fidelity = ["every=2", "metrics=[fid,kid,clip]", "num_images=3", "batch_size=2", f"inception={inception_file}"]
    overrides += [f"train.fidelity.{o}" for o in fidelity + [f"clip_model={clip_model_dir}"]]
    overrides += ["data.validation_split=3"]
    one = tiny_overrides(tmp_path / "one", image_folder, vae_dir, str(clip_dir), "text_encoder") + overrides
    assert _train(one).returncode == 0
    run = tmp_path / "two"
    two = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder") + overrides
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "sdtrain", "train", *two]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr  # really two processes

    scores = [[r for r in read_log(root / "log.jsonl") if "fid" in r] for root in (tmp_path / "one", run)]
    assert [r["step"] for r in scores[1]] == [r["step"] for r in scores[0]] == [2, 4]
    for one_process, two_processes in zip(*scores):
        for key in ("fid", "kid_mean", "clip_score"):
            assert two_processes[key] == pytest.approx(one_process[key], rel=1e-3), key
    (steps_a, losses_a), (steps_b, losses_b) = zip(*_losses(tmp_path / "one")), zip(*_losses(run))
    assert steps_b == steps_a == (1, 2, 3, 4)  # one log line per step: only the main process writes
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(run)  # the export holds the EMA weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["samples_seen"] == 16 and len(state["data"]) == 2  # global batch 4 x 4 steps; both ranks' positions
    assert not os.path.exists(run / "checkpoints" / "step-00000004" / "rng-2.pt")
    assert torch.load(run / "checkpoints" / "step-00000004" / "rng-1.pt", weights_only=True)


def test_sharded_strategies_are_refused_before_any_work():
    from accelerate.utils import DistributedType

    from sdtrain.train.loop import check_distributed_type

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(RuntimeError, match="use DDP"):
            check_distributed_type(kind)
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        check_distributed_type(kind)

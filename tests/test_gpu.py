"""What only a CUDA device can show: fp16 with its loss scaler, autocast and the FLOP rates logged on CUDA, the
offloaded EMA's copies between the GPU and pinned CPU memory, the memory estimate against the measured peak, and
DeepSpeed's bf16 path. Off by default (marker ``gpu``) and skipped without CUDA: ``pytest -m gpu tests/test_gpu.py``.

GPU kernels (cuDNN's convolution backward among them) are not bit-reproducible from run to run, so runs that the CPU
tests compare with ``torch.equal`` are compared here to a tolerance far below what the checked mistake would cause.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.train.loop import train
from sdtrain.train.perf import peak_tflops
from tests.conftest import tiny_overrides
from tests.test_faults import _env, _free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DETERMINISTIC = ["train.cudnn_benchmark=false", "train.log_every=1"]


def _run(tmp_path, fixtures, name: str, extra: list[str]):
    image_folder, vae_dir, clip_dir = fixtures
    overrides = tiny_overrides(tmp_path / name, image_folder, vae_dir, str(clip_dir), "text_encoder")
    return train(load_config(Config, None, overrides + DETERMINISTIC + extra))


def _log(run) -> list[dict]:
    from sdtrain.train.tracking import read_log

    return read_log(run / "log.jsonl")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert gap < atol, gap


@pytest.fixture
def fixtures(image_folder, vae_dir, clip_dir):
    return image_folder, vae_dir, clip_dir


def test_bf16_autocasts_on_cuda_and_logs_tflops_and_mfu(tmp_path, fixtures):
    _run(tmp_path, fixtures, "fp32", ["train.num_steps=2"])
    _run(tmp_path, fixtures, "bf16", ["train.num_steps=2", "train.mixed_precision=bf16"])
    fp32, bf16 = _log(tmp_path / "fp32"), _log(tmp_path / "bf16")
    assert bf16[0]["loss"] != fp32[0]["loss"] and bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    known = peak_tflops(torch.device("cuda"), "bf16") is not None  # MFU needs the card's peak (H100, A100, ...)
    for record in bf16:
        assert record["tflops"] > 0, record
        assert 0 < record["mfu"] < 1 if known else "mfu" not in record, record


def test_fp16_trains_with_a_loss_scaler_saved_in_checkpoints_and_resumes(tmp_path, fixtures):
    extra = ["train.mixed_precision=fp16", "train.num_steps=4", "train.save_every=2"]
    straight = _run(tmp_path, fixtures, "a", extra)
    _run(tmp_path, fixtures, "b", extra[:-2] + ["train.num_steps=2", "train.save_every=2"])
    scaler = torch.load(tmp_path / "b" / "checkpoints" / "step-00000002" / "scaler.pt", weights_only=True)
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    resumed = _run(tmp_path, fixtures, "b", extra)
    losses = [[r["loss"] for r in _log(tmp_path / name)] for name in ("a", "b")]
    assert all(torch.isfinite(torch.tensor(x)).all() for x in losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    unet = lambda run: load_file(run / "unet" / "diffusion_pytorch_model.safetensors")  # noqa: E731
    _close(unet(straight), unet(resumed))


@pytest.mark.parametrize("every", [1, 2])
def test_offloaded_ema_equals_the_ema_kept_on_the_gpu(tmp_path, fixtures, every):
    """ema_offload moves the average between the GPU and pinned CPU memory with asynchronous copies; checkpoints read
    the CPU copy: it must be complete, the same numbers as the average kept on the GPU."""
    extra = ["train.num_steps=4", f"train.ema_every={every}", "train.ema_decay=0.9"]
    on_gpu = _run(tmp_path, fixtures, "gpu", extra)
    offloaded = _run(tmp_path, fixtures, "cpu", extra + ["train.ema_offload=true"])
    for step in ("step-00000002", "step-00000004"):
        ema = [load_file(tmp_path / name / "checkpoints" / step / "ema.safetensors") for name in ("gpu", "cpu")]
        _close(*ema)
    unet = lambda run: load_file(run / "unet" / "diffusion_pytorch_model.safetensors")  # noqa: E731
    _close(unet(on_gpu), unet(offloaded))


def test_memory_estimate_is_near_the_measured_peak(tmp_path, fixtures, caplog):
    """The preflight estimate (weights, gradients, Adam, EMA, encoders, activations) against torch's peak of
    allocated memory over the run, for a UNet whose activations and weights both count."""
    extra = ["train.num_steps=2", "train.mixed_precision=bf16", "data.resolution=64", "train.batch_size=16"]
    extra += ["model.unet.block_out_channels=[64, 128, 256]", "model.unet.attention=[false, true, true]"]
    extra += ["model.unet.norm_num_groups=32", "train.export=false", "train.final_checkpoint=false"]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with caplog.at_level("INFO", logger="sdtrain.train.loop"):
        _run(tmp_path, fixtures, "run", extra)
    peak = torch.cuda.max_memory_allocated() / 2**30
    estimate = float(re.search(r"memory estimate per device \(GiB\): .* = ([\d.]+) GiB", caplog.text).group(1))
    print(f"estimate {estimate:.3f} GiB, measured peak {peak:.3f} GiB")
    assert 0.5 < peak / estimate < 1.5, (estimate, peak)


def test_deepspeed_bf16_autocasts_on_cuda(tmp_path, fixtures):
    """DeepSpeed's engine switches off an autocast entered outside it on CUDA; sdtrain sets DeepSpeed's own
    torch_autocast section so that ZeRO trains in bf16 as DDP does: one ZeRO-2 process on the GPU gives the losses of
    a bf16 run without DeepSpeed, not those of fp32 (on a CPU, accelerate falls back to one plain process)."""
    pytest.importorskip("deepspeed")
    image_folder, vae_dir, clip_dir = fixtures
    extra = ["train.num_steps=3", "train.save_every=100"]
    _run(tmp_path, fixtures, "fp32", extra)
    _run(tmp_path, fixtures, "bf16", extra + ["train.mixed_precision=bf16"])
    overrides = tiny_overrides(tmp_path / "zero", image_folder, vae_dir, str(clip_dir), "text_encoder")
    overrides += DETERMINISTIC + extra + ["train.mixed_precision=bf16"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2"]
    launch += ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "sdtrain", "train", *overrides]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEEPSPEED ZeRO-2" in result.stderr
    # the first step's loss is the initial weights' forward pass: the same kernels in the same order in all three
    # runs but for the precision (bf16 and fp32 differ by ~3e-5 there; later steps add run-to-run noise of that size)
    first = {name: _log(tmp_path / name)[0]["loss"] for name in ("fp32", "bf16", "zero")}
    print(first)
    assert abs(first["zero"] - first["bf16"]) < abs(first["zero"] - first["fp32"]) / 4, first

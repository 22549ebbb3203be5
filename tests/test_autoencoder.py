"""Stage 1: AutoencoderKL, VQModel and AutoencoderDC training, metrics, scaling factor, export; VQ latents through the
UNet stage."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL, VQModel

from sdtrain.config import AutoencoderConfig, Config, ConfigError, load_config
from sdtrain.evaluate.metrics import psnr, ssim
from sdtrain.models.vae import decode_latents, encode_moments, load_vae, scale_latents
from sdtrain.train import checkpoint
from sdtrain.train.autoencoder import train_autoencoder
from sdtrain.train.loop import train
from tests.conftest import tiny_overrides, write_image_folder


def _overrides(tmp_path, kind: str) -> list[str]:
    data = write_image_folder(tmp_path / "data", count=24)
    return [
        f"model.kind={kind}",
        "model.block_out_channels=[8, 16]",
        "model.norm_num_groups=4",
        "model.num_vq_embeddings=32",
        f"data.path={data}",
        "data.resolution=32",
        f"train.output_dir={tmp_path / 'vae'}",
        "train.batch_size=4",
        "train.num_steps=30",
        "train.eval_images=8",
        "train.log_every=10",
    ]


@pytest.mark.parametrize("kind", ["kl", "vq", "dc"])
def test_train_autoencoder_exports_with_metrics(tmp_path, kind):
    result = train_autoencoder(load_config(AutoencoderConfig, None, _overrides(tmp_path, kind)))
    final = tmp_path / "vae" / "final"
    saved = json.loads((final / "metrics.json").read_text())
    assert saved["steps"] == 30 and saved["psnr"] == result["psnr"] and 0 < saved["ssim"] <= 1
    vae = load_vae(str(final))
    assert isinstance(vae, {"kl": AutoencoderKL, "vq": VQModel, "dc": AutoencoderDC}[kind])
    assert vae.config.scaling_factor == pytest.approx(saved["scaling_factor"])
    if kind == "vq":
        assert 0 < saved["codebook_usage"] <= 1
    from PIL import Image

    with Image.open(tmp_path / "vae" / "reconstructions.png") as grid:  # 8 held-out images over their reconstructions
        assert grid.size == (8 * 32, 2 * 32)
    # the scaling factor gives the latents unit variance
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    mean, std = encode_moments(vae, x)
    assert 0.3 < scale_latents(vae, mean).std() < 3.0


def test_vq_autoencoder_trains_a_unet(tmp_path, clip_dir):
    train_autoencoder(load_config(AutoencoderConfig, None, _overrides(tmp_path, "vq")))
    vae_dir = tmp_path / "vae" / "final"
    config = load_config(
        Config, None, tiny_overrides(tmp_path / "run", tmp_path / "data", vae_dir, str(clip_dir), "text_encoder")
    )
    final = train(config)
    from sdtrain.api import StableDiffusion

    image = (
        StableDiffusion.from_pretrained(final, device="cpu").generate("a red square", num_inference_steps=3).images[0]
    )
    assert image.size == (32, 32)


def test_decode_inverts_scaling():
    vae = AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=4, latent_channels=4, scaling_factor=0.3, shift_factor=0.1
    )
    z = torch.randn(1, 4, 8, 8)
    direct = vae.decode(z).sample
    assert torch.allclose(decode_latents(vae, scale_latents(vae, z)), direct, atol=1e-5)


def test_dc_autoencoder_whose_latents_do_not_divide_its_width_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="latent_channels=3 does not divide the deepest width 16"):
        load_config(AutoencoderConfig, None, _overrides(tmp_path, "dc") + ["model.latent_channels=3"])


def test_crop_training_needs_convolutional_model(tmp_path):
    with pytest.raises(ConfigError, match="mid_block_attention"):
        load_config(AutoencoderConfig, None, ["train.crop_size=32", "data.resolution=64"])


def test_recolouring_turns_hues_and_leaves_greys_and_unchosen_images_alone():
    from sdtrain.train.autoencoder import recolour

    x = torch.zeros(200, 3, 2, 2)
    x[:, 0], x[:, 1:] = 0.7, -0.8  # red
    x[:, :, 0, 0] = 0.2  # a grey pixel
    y = recolour(x, 0.5, torch.Generator().manual_seed(0))
    changed = (y != x).flatten(1).any(1)
    assert 70 < changed.sum() < 130 and torch.equal(y[~changed], x[~changed])  # about half, the rest bit for bit
    grey = y[:, :, 0, 0]
    assert (grey.amax(1) - grey.amin(1)).max() < 1e-5 and y.min() >= -1 and y.max() <= 1  # greys stay grey
    hues = torch.atan2(math.sqrt(3) * (y[changed, 1, 1, 1] - y[changed, 2, 1, 1]),
                       2 * y[changed, 0, 1, 1] - y[changed, 1, 1, 1] - y[changed, 2, 1, 1])  # fmt: skip
    assert torch.histc(hues, bins=6, min=-math.pi, max=math.pi).min() > 0  # every sixth of the colour wheel


def test_psnr_ssim_identity_and_noise():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.all(psnr(x, x) > 90) and torch.allclose(ssim(x, x), torch.ones(2), atol=1e-4)
    noise = torch.randn_like(x)
    a, b = x + 0.05 * noise, x + 0.3 * noise
    assert torch.all(psnr(b, x) < psnr(a, x)) and torch.all(ssim(b, x) < ssim(a, x))
    assert float(psnr(b, x).mean()) == pytest.approx(
        float(10 * torch.log10(1 / (0.15**2 * noise.pow(2).mean()))), rel=0.05
    )
    assert torch.all(ssim(-x, x) < 0)


# --- stage 1 as a real run: adversarial loss, non-finite steps, checkpoints, resume -------------------------------


def _adversarial(tmp_path, steps: int, *extra: str) -> list[str]:
    """A KL run whose critic starts mid-run, with an EMA, checkpointing every 3 steps."""
    return _overrides(tmp_path, "kl") + [
        f"train.num_steps={steps}",
        "train.save_every=3",
        "train.ema_decay=0.9",
        "train.disc_weight=0.5",
        "train.disc_start=4",
        "train.disc_channels=8",
        "train.log_every=1",
        *extra,
    ]


def _vae_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _sigterm_in_step(nth: int, config, monkeypatch):
    """Run ``config`` with SIGTERM arriving in the middle of its ``nth`` step (after the forward pass), as a
    scheduler's preemption notice does; the loss is the real one again afterwards."""
    from sdtrain.train import autoencoder

    calls, loss = [0], autoencoder.reconstruction_loss

    def signalled(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(autoencoder, "reconstruction_loss", signalled)
        return train_autoencoder(config)


def test_patch_discriminator_hinge_loss_and_adaptive_weight():
    from sdtrain.models.discriminator import PatchDiscriminator, hinge_loss, smallest_input
    from sdtrain.train.autoencoder import adaptive_weight

    # pix2pix's layout: 3 layers -> widths 64, 128, 256, 512, one logit per 70 x 70 patch; 256 px -> 30 x 30 patches
    critic = PatchDiscriminator(3, 64)
    convs = [m for m in critic if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    with torch.no_grad():
        assert critic(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert critic(torch.zeros(2, 3, smallest_input(3), smallest_input(3))).shape == (2, 1, 1, 1)
    # hinge: (mean relu(1 - real) + mean relu(1 + fake)) / 2
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0])
    assert hinge_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    # the adaptive weight is the ratio of the two losses' gradient norms at the last layer
    w = torch.nn.Parameter(torch.randn(4, 3))
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    rec_loss, gan_loss = (a * w).sum(), (b * w).sum()  # gradients a and b
    expected = a.norm() / (b.norm() + 1e-4)
    assert adaptive_weight(rec_loss, gan_loss, w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_discriminator_is_refused_on_images_too_small_for_it(tmp_path):
    overrides = _overrides(tmp_path, "kl") + ["train.disc_weight=1", "train.disc_layers=4"]
    with pytest.raises(ConfigError, match="at least 48 px"):
        load_config(AutoencoderConfig, None, overrides)


def test_adversarial_run_logs_both_players_and_trains_the_critic_from_disc_start(tmp_path):
    result = train_autoencoder(load_config(AutoencoderConfig, None, _adversarial(tmp_path, 6)))
    log = _log(tmp_path / "vae")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all("gan" not in r and "critic" not in r for r in log[:4])  # steps 0-3: reconstruction only
    assert all(r["gan_weight"] > 0 and r["critic"] > 0 for r in log[4:])
    state = checkpoint.load_checkpoint(tmp_path / "vae" / "checkpoints" / "step-00000006")
    tensors, objects, _ = state
    # the critic was stepped twice (steps 4 and 5), the autoencoder six times
    assert objects["critic_optimizer"]["state"][0]["step"].item() == 2
    assert objects["optimizer"]["state"][0]["step"].item() == 6
    # the export holds the EMA of the weights (the checkpoint's "ema"), not the last trained ones
    exported = _vae_weights(tmp_path / "vae")
    assert all(torch.equal(exported[k], v) for k, v in tensors["ema"].items())
    assert any(not torch.equal(exported[k], tensors["vae"][k]) for k in tensors["ema"])
    assert result["steps"] == 6 and math.isfinite(result["psnr"])


def test_non_finite_vae_step_is_skipped_and_counted(tmp_path, monkeypatch):
    from sdtrain.train import autoencoder

    calls, loss = [0], autoencoder.reconstruction_loss

    def nan_at_third(*args, **kwargs):
        calls[0] += 1
        rec_loss, reg, rec, parts = loss(*args, **kwargs)
        return (rec_loss * float("nan") if calls[0] == 3 else rec_loss), reg, rec, parts

    monkeypatch.setattr(autoencoder, "reconstruction_loss", nan_at_third)
    overrides = _overrides(tmp_path, "kl") + ["train.num_steps=5", "train.log_every=1"]
    result = train_autoencoder(load_config(AutoencoderConfig, None, overrides))
    assert result["skipped_steps"] == 1 and [r["skipped_steps"] for r in _log(tmp_path / "vae")] == [0, 0, 1, 1, 1]
    _, objects, state = checkpoint.load_checkpoint(checkpoint.find_latest(tmp_path / "vae" / "checkpoints"))
    assert state["step"] == 5 and objects["optimizer"]["state"][0]["step"].item() == 4  # 5 steps, 4 taken
    assert all(torch.isfinite(t).all() for t in _vae_weights(tmp_path / "vae").values())


def test_sigterm_stops_train_vae_with_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from sdtrain.train.preemption import Preempted

    reference = train_autoencoder(load_config(AutoencoderConfig, None, _adversarial(tmp_path / "a", 8)))
    config = load_config(AutoencoderConfig, None, _adversarial(tmp_path / "b", 8))
    with pytest.raises(Preempted, match="step 5"):
        _sigterm_in_step(5, config, monkeypatch)
    assert checkpoint.find_latest(tmp_path / "b" / "vae" / "checkpoints").name == "step-00000005"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    resumed = train_autoencoder(config)
    a, b = _vae_weights(tmp_path / "a" / "vae"), _vae_weights(tmp_path / "b" / "vae")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "a" / "vae") == _log(tmp_path / "b" / "vae")
    assert (resumed["psnr"], resumed["steps"]) == (reference["psnr"], 8)


def test_sigkill_mid_step_then_rerun_is_bit_exact(tmp_path):
    """A real SIGKILL (no handler runs) in step 8, after the checkpoint of step 6: the rerun resumes from it and ends
    where an uninterrupted run ends, bit for bit. Both run as subprocesses with the same thread count."""
    faults = Path(__file__).parent / "faults.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("SDTRAIN_FAULT", None)

    def run(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        overrides = [o for o in _adversarial(tmp_path, 10) if not o.startswith("train.output_dir=")]
        command = [sys.executable, str(faults), "train-vae", f"train.output_dir={out}", *overrides]
        return subprocess.run(
            command, env=dict(env, SDTRAIN_FAULT=fault or ""), capture_output=True, text=True, timeout=300
        )

    assert run(tmp_path / "a").returncode == 0
    killed = run(tmp_path / "b", "kill_vae_step=8")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert checkpoint.find_latest(tmp_path / "b" / "checkpoints").name == "step-00000006"
    resumed = run(tmp_path / "b")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    a, b = _vae_weights(tmp_path / "a"), _vae_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "a") == _log(tmp_path / "b")  # the killed run's step-7 record was written again once


def test_resume_refuses_another_autoencoder_and_adds_a_critic_midway(tmp_path, caplog):
    overrides = _overrides(tmp_path, "kl") + ["train.num_steps=3"]
    train_autoencoder(load_config(AutoencoderConfig, None, overrides))
    wider = overrides + ["model.block_out_channels=[8, 32]", "train.num_steps=4"]
    with pytest.raises(checkpoint.CheckpointError, match=r"model.block_out_channels=\[8, 16\]"):
        train_autoencoder(load_config(AutoencoderConfig, None, wider))
    # the same autoencoder with a discriminator from here on: resumes at step 3, the critic starts fresh
    with caplog.at_level("INFO"):
        result = train_autoencoder(
            load_config(AutoencoderConfig, None, overrides + ["train.num_steps=5", "train.disc_weight=0.1"])
        )
    assert "resumed from" in caplog.text and "discriminator starts at step 3" in caplog.text
    assert result["steps"] == 5
    tensors, objects, _ = checkpoint.load_checkpoint(checkpoint.find_latest(tmp_path / "vae" / "checkpoints"))
    assert "critic" in tensors and objects["critic_optimizer"]["state"][0]["step"].item() == 2


# --- LPIPS: the perceptual term, against the lpips package's own code ---------------------------------------------

REFERENCE = Path(__file__).resolve().parents[1] / ".venv" / "reference"
# torchvision's VGG-16 ("D") up to relu5_3, as torchvision builds it (in-place ReLUs)
TORCHVISION_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _lpips_wheel() -> Path:
    wheels = sorted(REFERENCE.glob("lpips-*.whl"))
    assert wheels, f"lpips' wheel is not in {REFERENCE}: run `make test` (it downloads it there)"
    return wheels[-1]


def _torchvision_vgg16_features() -> torch.nn.Sequential:
    layers, channels = [], 3
    for width in TORCHVISION_VGG16:
        if width == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = torch.nn.Conv2d(channels, width, kernel_size=3, padding=1)
            # torchvision's VGG init: with torch's default one the deep layers' features of any two images nearly
            # coincide, and relu4_3 / relu5_3 would add ~1e-8 to the distance (a test blind to them)
            torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.normal_(conv.bias, 0.0, 0.01)
            layers += [conv, torch.nn.ReLU(inplace=True)]
            channels = width
    return torch.nn.Sequential(*layers)


def _reference_lpips(tmp_path: Path, monkeypatch, features: torch.nn.Sequential):
    """The lpips package's LPIPS(net="vgg") from its wheel (``make test`` downloads it), its VGG trunk ``features``
    handed over by a stand-in for torchvision (which the package imports, and which would pin torch)."""
    import ast
    import importlib
    import types
    import zipfile

    with zipfile.ZipFile(_lpips_wheel()) as wheel:
        wheel.extractall(tmp_path, [n for n in wheel.namelist() if n.startswith("lpips/")])
    package = types.ModuleType("lpips")
    package.__path__ = [str(tmp_path / "lpips")]
    # the package's __init__ imports its trainer (scipy, scikit-image); of it, lpips.py needs normalize_tensor only
    tree = ast.parse((tmp_path / "lpips" / "__init__.py").read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "normalize_tensor")
    namespace = {"torch": torch}
    exec(compile(ast.Module([function], []), "lpips/__init__.py", "exec"), namespace)
    package.normalize_tensor = namespace["normalize_tensor"]
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(vgg16=lambda pretrained=False: types.SimpleNamespace(features=features))
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "lpips", package)
    for name in [n for n in sys.modules if n.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("lpips.lpips").LPIPS(net="vgg", pnet_rand=True, verbose=False)


def _vgg_file(path: Path, features: torch.nn.Sequential) -> Path:
    """A weight file laid out as torchvision's vgg16-397923af.pth (with a classifier tensor LPIPS does not use)."""
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save({**state, "classifier.0.weight": torch.zeros(2, 2)}, path)
    return path


def test_lpips_equals_the_lpips_packages(tmp_path, monkeypatch):
    from sdtrain.evaluate.lpips import load_lpips

    torch.manual_seed(0)
    features = _torchvision_vgg16_features()
    reference = _reference_lpips(tmp_path / "ref", monkeypatch, features)
    ours = load_lpips(_vgg_file(tmp_path / "vgg16.pth", features), _lpips_wheel())  # lin weights read from the wheel
    a, b = torch.rand(3, 3, 64, 48) * 2 - 1, torch.rand(3, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        expected = reference(a, b).flatten()
        got = ours(a, b)
    assert got.shape == (3,) and torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (got, expected)
    assert torch.equal(ours(a, a), torch.zeros(3))
    assert not any(p.requires_grad for p in ours.parameters())
    # a gradient reaches the images (the loss), not the network
    x = a.clone().requires_grad_(True)
    ours(x, b).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_missing_weights_name_the_files(tmp_path):
    from sdtrain.evaluate.lpips import VGG_URL, load_lpips

    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_lpips(tmp_path / "nothing.pth", tmp_path / "nothing.pth")
    overrides = _overrides(tmp_path, "kl") + ["train.perceptual_weight=1", f"train.lpips_vgg={tmp_path / 'no.pth'}"]
    with pytest.raises(ConfigError, match=VGG_URL):
        train_autoencoder(load_config(AutoencoderConfig, None, overrides))
    assert not (tmp_path / "vae" / "log.jsonl").exists()  # refused before any step


def test_perceptual_loss_trains_and_reports_lpips(tmp_path):
    torch.manual_seed(0)
    vgg = _vgg_file(tmp_path / "vgg16.pth", _torchvision_vgg16_features())
    overrides = _overrides(tmp_path, "kl") + [
        "train.num_steps=4",
        "train.log_every=1",
        "train.perceptual_weight=1.0",
        f"train.lpips_vgg={vgg}",
        f"train.lpips_lin={_lpips_wheel()}",
    ]
    result = train_autoencoder(load_config(AutoencoderConfig, None, overrides))
    log = _log(tmp_path / "vae")
    assert all(r["lpips"] > 0 for r in log)
    # the logged loss is the weighted sum of its parts (kl weight 1e-6, perceptual weight 1)
    assert log[0]["loss"] == pytest.approx(log[0]["l1"] + log[0]["l2"] + log[0]["lpips"] + 1e-6 * log[0]["reg"])
    assert result["lpips"] > 0 and json.loads((tmp_path / "vae" / "final" / "metrics.json").read_text())["lpips"]


@pytest.mark.parametrize("kind", ["kl", "vq", "dc"])
def test_bf16_autoencoder_steps_run_under_autocast_with_fp32_weights(tmp_path, kind):
    """bf16 (autocast on the CPU here, as on a GPU): the same run's losses move by bf16's rounding, not more, and
    what is exported is fp32."""
    overrides = _overrides(tmp_path, kind) + ["train.num_steps=3", "train.log_every=1", "train.disc_weight=0.5"]
    overrides += ["train.disc_channels=8"]
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        config = load_config(
            AutoencoderConfig, None, overrides + [f"train.output_dir={out}", f"train.mixed_precision={precision}"]
        )
        train_autoencoder(config)
        runs[precision] = _log(out)
        assert all(v.dtype == torch.float32 for v in _vae_weights(out).values())
    for fp32, bf16 in zip(runs["no"], runs["bf16"]):
        assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
        assert math.isfinite(bf16["gan"]) and math.isfinite(bf16["critic"])


def test_decoder_only_fine_tune_of_a_pipelines_vae_keeps_its_latents(tmp_path):
    """sd-vae-ft-mse's recipe: a pretrained VAE (here in a pipeline's vae/ subfolder) fine-tuned with its encoder
    frozen: encoder bit for bit unchanged, decoder trained, the export keeps the pretrained scaling factor."""
    from diffusers import AutoencoderKL

    pretrained = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4, scaling_factor=0.5,
    )  # fmt: skip
    pretrained.save_pretrained(tmp_path / "pipe" / "vae")
    with pytest.raises(ConfigError, match="needs model.pretrained"):
        load_config(AutoencoderConfig, None, _overrides(tmp_path, "kl") + ["train.decoder_only=true"])
    overrides = _overrides(tmp_path, "kl") + [
        f"model.pretrained={tmp_path / 'pipe'}",
        "model.subfolder=vae",
        "model.block_out_channels=[4, 4, 4, 4]",  # ignored: the pretrained model's architecture is used
        "train.decoder_only=true",
        "train.num_steps=3",
    ]
    result = train_autoencoder(load_config(AutoencoderConfig, None, overrides))
    before, after = pretrained.state_dict(), _vae_weights(tmp_path / "vae")
    assert set(before) == set(after)
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert result["scaling_factor"] == 0.5 and result["measured_scaling_factor"] != 0.5
    assert AutoencoderKL.from_pretrained(tmp_path / "vae" / "final").config.scaling_factor == 0.5
    # crops the pretrained model's factor (2) does not divide are refused before any step
    odd = overrides + ["train.crop_size=15", f"train.output_dir={tmp_path / 'odd'}"]
    with pytest.raises(ConfigError, match="crop_size=15 is not a multiple of .* downsampling factor 2"):
        train_autoencoder(load_config(AutoencoderConfig, None, odd))
    assert not (tmp_path / "odd" / "checkpoints").exists()


def test_streamed_training_images_skip_bad_files_and_resume_exactly(tmp_path, monkeypatch):
    """train.in_memory=false: the training images are read epoch by epoch by 2 workers; a corrupt file is skipped and
    counted; SIGTERM mid-run, then the rerun continues from the checkpoint's position and ends as an uninterrupted
    run, bit for bit."""
    from sdtrain.train.preemption import Preempted

    data = write_image_folder(tmp_path / "stream", count=14)
    (data / "007.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt, among the training images
    held_out = write_image_folder(tmp_path / "held_out", count=4, seed=1)

    def config(out):
        overrides = _overrides(tmp_path, "kl") + [
            f"data.path={data}",
            f"eval_data={held_out}",
            "data.num_workers=2",
            "train.in_memory=false",
            "train.batch_size=4",  # 14 images: an epoch ends mid-batch, so batches straddle epochs
            "train.num_steps=9",
            "train.save_every=3",
            "train.log_every=1",
            f"train.output_dir={out}",
        ]
        return load_config(AutoencoderConfig, None, overrides)

    reference = train_autoencoder(config(tmp_path / "a"))
    # 9 steps x 4 images: the first 36 places of the epochs' order (the seed's), each visit of 007.png a skip
    from sdtrain.data.folder import EpochSampler

    visits = sum(index % 14 == 7 for index in EpochSampler(14, seed=0).take(36))
    assert visits >= 2 and reference["skipped"] == {"not_an_image": visits}
    with pytest.raises(Preempted):
        _sigterm_in_step(5, config(tmp_path / "b"), monkeypatch)
    resumed = train_autoencoder(config(tmp_path / "b"))
    a, b = _vae_weights(tmp_path / "a"), _vae_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log(tmp_path / "a") == _log(tmp_path / "b")
    assert resumed["skipped"] == reference["skipped"]


def test_weight_downloads_are_checked_against_their_published_hashes(tmp_path, monkeypatch):
    """Downloads go through torch.hub with the sha256 prefix in the cached name checked: the published LPIPS file is
    accepted and cached; other bytes at the same URL (a tampered mirror, a truncated download) are refused and
    nothing is cached. FID's Inception file carries its hash the same way."""
    import email.message
    import zipfile

    from sdtrain.evaluate import inception, lpips
    from sdtrain.evaluate.weights import WeightsNotFound, hub_weights

    published = zipfile.ZipFile(_lpips_wheel()).read(lpips.LIN_IN_WHEEL)
    served = {}

    class Response(io.BytesIO):
        def info(self):
            message = email.message.Message()
            message["Content-Length"] = str(len(self.getvalue()))
            return message

    monkeypatch.setattr(torch.hub, "urlopen", lambda request, **kw: Response(served["bytes"]))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    served["bytes"] = published[:-10] + b"0123456789"
    with pytest.raises(WeightsNotFound, match="not the published file"):
        hub_weights(lpips.LIN_URL, "LPIPS' channel weights", lpips.LIN_FILE)
    assert not any(cache.glob("*"))
    served["bytes"] = published
    weights = hub_weights(lpips.LIN_URL, "LPIPS' channel weights", lpips.LIN_FILE)
    assert (cache / lpips.LIN_FILE).is_file() and all(isinstance(v, torch.Tensor) for v in weights.values())
    for url in (inception.WEIGHTS_URL, lpips.VGG_URL):
        assert re.search(r"-[0-9a-f]{8}\.pth$", url), url  # the name torch.hub checks the download against

"""Stage 1: AutoencoderKL and VQModel training, metrics, scaling factor, export; VQ latents through the UNet stage."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from sdtrain.config import AutoencoderConfig, Config, ConfigError, load_config
from sdtrain.evaluate.metrics import psnr, ssim
from sdtrain.models.vae import decode_latents, encode_moments, load_vae, scale_latents
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


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_train_autoencoder_exports_with_metrics(tmp_path, kind):
    result = train_autoencoder(load_config(AutoencoderConfig, None, _overrides(tmp_path, kind)))
    final = tmp_path / "vae" / "final"
    saved = json.loads((final / "metrics.json").read_text())
    assert saved["steps"] == 30 and saved["psnr"] == result["psnr"] and 0 < saved["ssim"] <= 1
    vae = load_vae(str(final))
    assert isinstance(vae, VQModel if kind == "vq" else AutoencoderKL)
    assert vae.config.scaling_factor == pytest.approx(saved["scaling_factor"])
    if kind == "vq":
        assert 0 < saved["codebook_usage"] <= 1
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


def test_crop_training_needs_convolutional_model(tmp_path):
    with pytest.raises(ConfigError, match="mid_block_attention"):
        load_config(AutoencoderConfig, None, ["train.crop_size=32", "data.resolution=64"])


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

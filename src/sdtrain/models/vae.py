"""Frozen autoencoder (AutoencoderKL, VQModel, Sana's deep-compression AutoencoderDC, Qwen-Image's video autoencoder
AutoencoderKLQwenImage, or FLUX.2's AutoencoderKLFlux2) and the mapping between pixels and scaled latents.

Latents the UNet sees are ``(z - shift_factor) * scaling_factor`` with both read from the autoencoder's config
(``shift_factor`` is unset for Stable Diffusion 1.x / 2.x VAEs). For a VQModel the UNet denoises the
pre-quantisation latents, as the LDM paper does, and decoding quantises them. An AutoencoderDC's latents are
deterministic, as a VQModel's. AutoencoderKLQwenImage encodes videos: an image is one frame (the frame axis added
before encoding, removed after), and its latents are normalised per channel, ``(z - latents_mean) / latents_std``, as
its pipelines normalise them. AutoencoderKLFlux2 normalises its latents by its batch norm's running statistics over
2 x 2 patches: the scaled latents are ``unpatchify((patchify(z) - mean) / sqrt(var + eps))``, shaped as ``z``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage, VQModel

from sdtrain.errors import Unsupported
from sdtrain.models.text import DTYPES, freeze

AUTOENCODERS = {
    "AutoencoderKL": AutoencoderKL, "VQModel": VQModel, "AutoencoderDC": AutoencoderDC,
    "AutoencoderKLQwenImage": AutoencoderKLQwenImage, "AutoencoderKLFlux2": AutoencoderKLFlux2,
}  # fmt: skip

Autoencoder = AutoencoderKL | VQModel | AutoencoderDC | AutoencoderKLQwenImage | AutoencoderKLFlux2


def _class_name(path: str, subfolder: str | None) -> str:
    """The diffusers class recorded in the model's config.json (local folder or hub id)."""
    local = Path(path, subfolder or "", "config.json")
    if local.exists():
        return json.loads(local.read_text()).get("_class_name", "AutoencoderKL")
    from huggingface_hub import hf_hub_download

    config = hf_hub_download(path, "config.json", subfolder=subfolder)
    return json.loads(Path(config).read_text()).get("_class_name", "AutoencoderKL")


def load_vae(path: str, subfolder: str | None = None, dtype: str = "float32") -> Autoencoder:
    """Load a frozen AutoencoderKL or VQModel from a local folder or hub id (the class is read from its config)."""
    name = _class_name(path, subfolder)
    if name not in AUTOENCODERS:
        known = ", ".join(AUTOENCODERS)
        raise Unsupported(f"{path}: autoencoder class {name!r} is not supported (use one of {known})")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    vae = AUTOENCODERS[name].from_pretrained(path, torch_dtype=DTYPES[dtype], **kwargs)
    return freeze(vae)


def downsample_factor(vae: Autoencoder) -> int:
    """Pixels per latent pixel (8 for Stable Diffusion's VAE, 32 for Sana's)."""
    if isinstance(vae, AutoencoderKLQwenImage):
        return 2 ** len(vae.config.temperal_downsample)  # its pipelines' vae_scale_factor
    levels = getattr(vae.config, "block_out_channels", None) or vae.config.encoder_block_out_channels
    return 2 ** (len(levels) - 1)


def latent_channels(vae: Autoencoder) -> int:
    """Channels of the autoencoder's latents."""
    if isinstance(vae, AutoencoderKLQwenImage):
        return int(vae.config.z_dim)
    return int(vae.config.latent_channels)


def _scale_shift(vae: Autoencoder) -> tuple[float, float]:
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(scale), float(shift)


@torch.no_grad()
def encode_moments(vae: Autoencoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior ``(mean, std)`` of images in [-1, 1]; std is zero for a VQModel (deterministic)."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    if isinstance(vae, VQModel):
        latents = vae.encode(images).latents
        return latents, torch.zeros_like(latents)
    if isinstance(vae, AutoencoderDC):
        latents = vae.encode(images).latent
        return latents, torch.zeros_like(latents)
    if isinstance(vae, AutoencoderKLQwenImage):  # one frame
        dist = vae.encode(images.unsqueeze(2)).latent_dist
        return dist.mean.squeeze(2), dist.std.squeeze(2)
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def _per_channel(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's per-channel latent means and deviations, shaped to broadcast over ``B x C x H x W`` latents."""
    c = vae.config
    mean, std = (torch.tensor(v, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
                 for v in (c.latents_mean, c.latents_std))  # fmt: skip
    return mean, std


def _batch_norm(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.2's batch norm statistics over patchified latents, as its pipelines compute them: the mean and the
    deviation, shaped to broadcast over ``B x 4C x H/2 x W/2``."""
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return mean, std


def mean_latents(vae: Autoencoder, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> their posterior mean in the denoiser's latent space: how the pipelines encode a reference
    or control image (``retrieve_latents(..., sample_mode="argmax")``, then shifted and scaled)."""
    return scale_latents(vae, encode_moments(vae, pixels)[0])


def scale_latents(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Autoencoder latents -> the UNet's latent space."""
    if isinstance(vae, AutoencoderKLFlux2):
        from diffusers import Flux2KleinPipeline as Flux2  # its pipelines' 2 x 2 patches

        patches = Flux2._patchify_latents(latents)
        mean, std = _batch_norm(vae, patches)
        return Flux2._unpatchify_latents((patches - mean) / std)
    if isinstance(vae, AutoencoderKLQwenImage):
        mean, std = _per_channel(vae, latents)
        return (latents - mean) * (1 / std)  # as its pipelines compute it
    scale, shift = _scale_shift(vae)
    return (latents - shift) * scale


def unscale_latents(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """The UNet's latent space -> autoencoder latents."""
    if isinstance(vae, AutoencoderKLFlux2):
        from diffusers import Flux2KleinPipeline as Flux2

        patches = Flux2._patchify_latents(latents)
        mean, std = _batch_norm(vae, patches)
        return Flux2._unpatchify_latents(patches * std + mean)
    if isinstance(vae, AutoencoderKLQwenImage):
        mean, std = _per_channel(vae, latents)
        return latents / (1 / std) + mean  # as its pipelines compute it
    scale, shift = _scale_shift(vae)
    return latents / scale + shift


@torch.no_grad()
def decode_latents(vae: Autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (not clamped)."""
    latents = unscale_latents(vae, latents).to(device=vae.device, dtype=vae.dtype)
    if isinstance(vae, AutoencoderKLQwenImage):
        return vae.decode(latents.unsqueeze(2)).sample[:, :, 0]
    return vae.decode(latents).sample

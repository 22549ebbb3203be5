"""Held-out validation loss on fixed (latent, timestep, noise) triples.

The held-out images (``data.validation_split`` or ``data.validation_path``) are encoded once (posterior mean, center
crop, first caption). Each image gets fixed timesteps spread evenly over the training range and fixed noise from a
generator seeded by ``train.seed``, so the number moves only when the model does: two evaluations of the same weights
give the same loss, and curves of different runs with the same data are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtrain.config import DataConfig, ObjectiveConfig
from sdtrain.data.decode import Skip, clean_caption, decode_image
from sdtrain.data.folder import resize_crop, validation_records
from sdtrain.models.text import encode_prompts
from sdtrain.models.vae import encode_moments, scale_latents
from sdtrain.train import objective

TIMESTEPS_PER_IMAGE = 4


@dataclass
class ValidationSet:
    """Fixed inputs of the validation loss, one row per (image, timestep)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def build_validation_set(
    data: DataConfig, config: ObjectiveConfig, vae, text_encoder, tokenizer, seed: int
) -> ValidationSet | None:
    """Encode the held-out images; None when the config holds none out."""
    records = validation_records(data, seed)
    pixels, captions = [], []
    for record in records:
        try:
            caption = record["caption"][0] if isinstance(record["caption"], list) else record["caption"]
            caption = clean_caption(caption)
            image = decode_image(record["image"], cover=(data.resolution, data.resolution))
        except Skip:
            continue
        pixels.append(resize_crop(image, data.resolution, center_crop=True, flip=False)[0])
        captions.append(caption)
    if not pixels:
        return None
    device = text_encoder.device
    means = [encode_moments(vae, torch.stack(pixels[i : i + 32]).to(device))[0] for i in range(0, len(pixels), 32)]
    latents = scale_latents(vae, torch.cat(means).float())
    embeddings = encode_prompts(text_encoder, tokenizer, captions, device).float()
    low = config.min_timestep
    high = config.max_timestep if config.max_timestep is not None else config.num_train_timesteps - 1
    # stratified: image i at timesteps spread over the range, offset per image so the images cover it between them
    n, k = latents.shape[0], TIMESTEPS_PER_IMAGE
    grid = (torch.arange(n * k, dtype=torch.float64) + 0.5) / (n * k)
    timesteps = (low + grid * (high - low + 1)).long().clamp(low, high).view(k, n).t().reshape(-1)
    generator = torch.Generator().manual_seed(seed)
    latents, embeddings = latents.repeat_interleave(k, 0), embeddings.repeat_interleave(k, 0)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    return ValidationSet(latents, embeddings, timesteps.to(latents.device), noise)


@torch.no_grad()
def validation_loss(unet, scheduler, data: ValidationSet, snr_gamma: float | None, batch_size: int, autocast) -> float:
    """Mean (weighted, as in training) loss of ``unet`` over the fixed triples."""
    was_training = unet.training
    unet.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        x0, cond = data.latents[i : i + batch_size], data.embeddings[i : i + batch_size]
        t, noise = data.timesteps[i : i + batch_size], data.noise[i : i + batch_size]
        noisy = scheduler.add_noise(x0, noise, t)
        target = objective.target(scheduler, x0, noise, t)
        weights = objective.loss_weights(scheduler, t, snr_gamma)
        with autocast():
            loss, _ = objective.diffusion_loss(unet(noisy, t, cond).sample, target, weights)
        total += loss.item() * x0.shape[0]
    unet.train(was_training)
    return total / len(data)

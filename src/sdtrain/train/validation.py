"""Held-out validation loss on fixed (latent, timestep, noise) triples.

The held-out images (``data.validation_split`` or ``data.validation_path``) are encoded once (posterior mean, center
crop, first caption). Each image gets fixed timesteps spread evenly over the training range and fixed noise from a
generator seeded by ``train.seed``, so the number moves only when the model does: two evaluations of the same weights
give the same loss, and curves of different runs with the same data are comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdtrain import objective
from sdtrain.config import DataConfig
from sdtrain.data.buckets import condition_bucket_of
from sdtrain.data.captions import with_trigger
from sdtrain.data.decode import Skip, clean_caption
from sdtrain.data.folder import validation_records
from sdtrain.data.streams import encode_conditions, encode_prompts, size_condition
from sdtrain.data.transforms import load_pixels, stack_conditions
from sdtrain.models.families import Conditioning, Encoders
from sdtrain.models.vae import encode_moments, scale_latents

TIMESTEPS_PER_IMAGE = 4


@dataclass
class ValidationSet:
    """Fixed inputs of the validation loss, one row per (image, timestep)."""

    latents: torch.Tensor
    embeddings: Conditioning
    timesteps: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def build_validation_set(data: DataConfig, diffusion, encoders: Encoders, seed: int) -> ValidationSet | None:
    """Encode the held-out images, with timesteps from ``diffusion`` (the run's objective) and fixed noise; None
    when the config holds none out."""
    records = validation_records(data, seed)
    pixels, captions, originals, crops, conditions = [], [], [], [], []
    own_size = condition_bucket_of(data)
    for record in records:
        try:
            caption = record["caption"][0] if isinstance(record["caption"], list) else record["caption"]
            caption = with_trigger(clean_caption(caption), data.trigger)
            image, info = load_pixels(record["image"], data.resolution, conditions=record.get("conditions"),
                                      condition_bucket_of=own_size)  # fmt: skip
        except Skip:
            continue
        pixels.append(image)
        captions.append(caption)
        originals.append(info["original_size"])
        crops.append(info["crop_top_left"])
        if "conditions" in info:
            conditions.append(info["conditions"])
    if not pixels:
        return None
    vae = encoders.vae
    means = [encode_moments(vae, torch.stack(pixels[i : i + 32]))[0] for i in range(0, len(pixels), 32)]
    latents = scale_latents(vae, torch.cat(means).float())
    target = (data.resolution, data.resolution)
    embeddings = size_condition(encoders, (originals, crops), target, latents.device)
    images = stack_conditions(conditions, len(data.conditions), ()) if conditions else None
    if images:  # the condition images, encoded as training encodes them (none dropped)
        chunks = [encode_conditions(encoders, [b[i : i + 32] for b in images], latents.device)
                  for i in range(0, len(conditions), 32)]  # fmt: skip
        embeddings |= {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    embeddings |= encode_prompts(encoders, captions, images)  # with the images, where their encoding sees them
    # stratified: image i at timesteps spread over the range, offset per image so the images cover it between them
    n, k = latents.shape[0], TIMESTEPS_PER_IMAGE
    timesteps = diffusion.fixed_timesteps(n * k).view(k, n).t().reshape(-1)
    generator = torch.Generator().manual_seed(seed)
    latents = latents.repeat_interleave(k, 0)
    embeddings = {key: value.repeat_interleave(k, 0) for key, value in embeddings.items()}
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    return ValidationSet(latents, embeddings, timesteps.to(latents.device), noise)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    predict: Callable[..., torch.Tensor],
    diffusion,
    data: ValidationSet,
    batch_size: int,
    autocast,
) -> float:
    """Mean (weighted, as in training) loss of ``model`` over the fixed triples; ``predict`` is the family's
    ``(model, noisy, timesteps, conditioning) -> output``, ``diffusion`` its objective (:func:`objective.make`)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        x0, t, noise = (v[i : i + batch_size] for v in (data.latents, data.timesteps, data.noise))
        cond = {k: v[i : i + batch_size] for k, v in data.embeddings.items()}
        loss, _ = diffusion.loss(predict, model, cond, x0, objective.Draw(noise, t), autocast)
        total += loss.item() * x0.shape[0]
    model.train(was_training)
    return total / len(data)

"""FLUX.1 Kontext: Flux's transformer editing a reference image under an instruction. The reference's latents (the
autoencoder's posterior mean, shifted and scaled, as ``FluxKontextPipeline`` encodes it) are packed into 2 x 2 patches
like the noisy latents and appended to their sequence, at position ids whose first coordinate is 1 (the noisy
latents' is 0); the transformer's output for the noisy latents' tokens is the velocity. Everything else is Flux's
(:mod:`sdtrain.models.families.flux`): the encoders, the objective, the guidance embedding, LoRA's targets.

Loads a Kontext folder (``FluxKontextPipeline``), or with ``model.family=flux-kontext`` a FLUX.1 folder (the same
transformer, which then learns to read the reference); exported as a ``FluxKontextPipeline``. Sampling draws at the
size asked (the pipeline's ``max_area`` set to it) from the reference at its own size (not resized to Kontext's
preferred resolutions). References train cropped with their image, or at a size of their own of any aspect with
``data.condition_resolution`` (the reference's ids follow its own latents' shape either way).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import FluxKontextPipeline, FluxPipeline

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, flux
from sdtrain.models.vae import mean_latents

REFERENCE = "reference_latents"  # the conditioning key of the reference's latents


def encode_references(vae, images: list[torch.Tensor]) -> Conditioning:
    """The reference as the pipeline's ``_encode_vae_image`` encodes it: the posterior mean, shifted and scaled."""
    if len(images) != 1:
        raise ConfigError(f"FLUX.1 Kontext edits one reference image; data.conditions names {len(images)}")
    return {REFERENCE: mean_latents(vae, images[0])}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's velocity for noisy ``B x C x H x W`` latents beside the reference's, as the pipeline calls
    it: both packed, the reference's tokens after the noisy ones at position index 1, the output cut to the noisy
    ones and unpacked."""
    cond = dict(cond)
    reference = cond.pop(REFERENCE).to(noisy)
    b, _, h, w = noisy.shape
    rh, rw = reference.shape[-2:]
    states = cond["encoder_hidden_states"]
    config = getattr(transformer, "module", transformer).config  # DDP and DeepSpeed wrap the model
    guidance = torch.full((b,), flux.TRAIN_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
    reference_ids = FluxPipeline._prepare_latent_image_ids(b, rh // 2, rw // 2, noisy.device, noisy.dtype)
    reference_ids[..., 0] = 1
    latent_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    tokens = (h // 2) * (w // 2)
    out = transformer(
        hidden_states=torch.cat([flux.pack(noisy), flux.pack(reference)], dim=1),
        timestep=timesteps.to(noisy.dtype) / 1000,
        guidance=guidance,
        pooled_projections=cond["pooled_projections"],
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=torch.cat([latent_ids, reference_ids], dim=0),
    ).sample
    return flux.unpack(out[:, :tokens], h, w)


def encoders(components: flux.Components) -> Encoders:
    """Flux's, and the reference images' encoding."""
    vae = components.vae
    return dataclasses.replace(
        flux.encoders(components), encode_conditions=lambda images: encode_references(vae, images)
    )


def sampling_kwargs(components: flux.Components) -> dict[str, Any]:
    """Flux's T5 length, and the reference kept at its own size (the pipeline would resize it to Kontext's preferred
    resolutions, which a model trained on pairs of one size has not seen)."""
    return {"max_sequence_length": components.tokenizer_2.model_max_length, "_auto_resize": False}


FAMILY = Family(
    name="flux-kontext",
    pipeline_classes=("FluxKontextPipeline",),
    txt2img=FluxKontextPipeline,
    img2img=None,
    denoiser="transformer",
    lora_targets=flux.FAMILY.lora_targets,
    objectives=("flow",),
    load=flux.load_components,
    encode_prompts=flux.encode_prompts,
    predict=predict,
    pipeline_components=flux.pipeline_components,
    components_of=flux.components_of,
    frozen=flux.frozen,
    encoders=encoders,
    sampling_kwargs=sampling_kwargs,
    pipeline_latents=flux.pipeline_latents,
    condition="reference",
    references_own_size=True,
)

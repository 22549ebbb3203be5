"""InstructPix2Pix: Stable Diffusion's UNet taught to edit an image under an instruction. The reference image's
latents (the autoencoder's posterior mean, unscaled, as ``StableDiffusionInstructPix2PixPipeline`` encodes it) are
concatenated to the noisy latents on the channel axis, so the UNet takes twice the autoencoder's channels; zero
reference latents are the null image that image guidance samples against. Text encoder, autoencoder and objective
are Stable Diffusion's (:mod:`sdtrain.models.families.sd`); exported as a ``StableDiffusionInstructPix2PixPipeline``.

The UNet is built with the doubled input, loaded from an InstructPix2Pix folder, or made from a text-to-image Stable
Diffusion UNet as diffusers' ``train_instruct_pix2pix.py`` does: its first convolution widened, the reference's new
input channels starting at zero (so the model starts as the text-to-image model it was).
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, sd
from sdtrain.models.text import hidden_size
from sdtrain.models.unet import build_unet, load_unet
from sdtrain.models.vae import downsample_factor, encode_moments, latent_channels

REFERENCE = "image_latents"  # the conditioning key of the reference's latents (the pipeline's name for them)


def load_components(config, denoiser: bool = True) -> sd.Components:
    """Stable Diffusion's frozen parts, and a UNet taking the noisy and the reference latents side by side."""
    m = config.model
    vae, text_encoder, tokenizer = sd.load_encoders(config)
    if not denoiser:
        return sd.Components(vae, text_encoder, tokenizer, None)
    channels = latent_channels(vae)
    if not m.unet.from_scratch and (m.unet.pretrained or m.pretrained):
        unet = load_unet(m.unet.pretrained or m.pretrained, m.unet.subfolder if m.unet.pretrained else "unet")
        if unet.config.in_channels == channels:
            unet = widen_input(unet, 2 * channels)
    else:
        sample_size = config.data.resolution // downsample_factor(vae)
        unet = build_unet(m.unet, channels, sample_size, hidden_size(text_encoder), in_channels=2 * channels)
    if unet.config.in_channels != 2 * channels:
        raise ConfigError(f"the UNet takes {unet.config.in_channels} channels: an InstructPix2Pix UNet takes the "
                          f"noisy and the reference latents, 2 x {channels} (or give a text-to-image UNet of "
                          f"{channels}, widened as diffusers does)")  # fmt: skip
    if unet.config.cross_attention_dim != hidden_size(text_encoder):
        raise ConfigError(
            f"the UNet's cross_attention_dim ({unet.config.cross_attention_dim}) differs from the text encoder's "
            f"hidden size ({hidden_size(text_encoder)})"
        )
    return sd.Components(vae, text_encoder, tokenizer, unet)


@torch.no_grad()
def widen_input(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """``unet`` with a first convolution of ``in_channels`` inputs: its own weights on the first channels, zeros on
    the new ones (``train_instruct_pix2pix.py``'s initialisation), and the config saying so."""
    old = unet.conv_in
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new.weight.zero_()
    new.weight[:, : old.in_channels].copy_(old.weight)
    new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight)
    unet.register_to_config(in_channels=in_channels)
    return unet


def encode_references(vae, images: list[torch.Tensor]) -> Conditioning:
    """The reference image as the pipeline's ``prepare_image_latents`` encodes it: the posterior mean, unscaled."""
    if len(images) != 1:
        raise ConfigError(f"InstructPix2Pix edits one reference image; data.conditions names {len(images)}")
    return {REFERENCE: encode_moments(vae, images[0])[0]}


def predict(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's output for the noisy latents beside the reference's, as the pipeline calls it."""
    cond = dict(cond)
    reference = cond.pop(REFERENCE)
    return unet(torch.cat([noisy, reference.to(noisy)], dim=1), timesteps, **cond).sample


def encoders(components: sd.Components) -> Encoders:
    """Stable Diffusion's, and the reference images' encoding."""
    vae = components.vae
    return dataclasses.replace(
        sd.encoders(components), encode_conditions=lambda images: encode_references(vae, images)
    )


FAMILY = Family(
    name="instruct-pix2pix",
    pipeline_classes=("StableDiffusionInstructPix2PixPipeline",),
    txt2img=StableDiffusionInstructPix2PixPipeline,
    img2img=None,
    denoiser="unet",
    lora_targets=sd.FAMILY.lora_targets,
    objectives=("ddpm",),
    text_encoders=("text_encoder",),
    tokenize=sd.tokenize,
    encode_tokens=sd.encode_tokens,
    embedding_keys=("emb_params",),
    load_tokenizers=sd.load_tokenizers,
    load=load_components,
    encode_prompts=sd.encode_prompts,
    predict=predict,
    pipeline_components=sd.pipeline_components,  # the pipeline takes Stable Diffusion's
    components_of=sd.components_of,
    frozen=sd.frozen,
    encoders=encoders,
    condition="reference",
    image_guidance="image_guidance_scale",
)

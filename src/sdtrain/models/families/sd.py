"""Stable Diffusion 1.x / 2.x: one text encoder (CLIP, OpenCLIP in CLIP layout, T5, or any transformers encoder),
an AutoencoderKL or VQModel, a ``UNet2DConditionModel`` conditioned by cross-attention on the encoder's last hidden
state, the DDPM objective (epsilon / v / x0), exported as a ``StableDiffusionPipeline``. Its single-file layout (LDM's)
is :mod:`sdtrain.models.single_file`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.single_file import sd_tensors
from sdtrain.models.text import encode_prompts as encode_text
from sdtrain.models.text import hidden_size, load_text_encoder, load_tokenizer
from sdtrain.models.text import tokenize as tokenize_text
from sdtrain.models.unet import build_unet, load_unet
from sdtrain.models.vae import downsample_factor, load_vae


@dataclass
class Components:
    """The three models and the tokenizer; only ``unet`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: UNet2DConditionModel


def _text_source(config) -> tuple[str, str | None]:
    """Where the text encoder is: its own path, or the pipeline's ``text_encoder`` over the default MiniLM."""
    m = config.model
    if m.pretrained and m.text_encoder.path == "minilm" and m.text_encoder.subfolder is None:
        return m.pretrained, "text_encoder"  # a pipeline's own encoder wins over the default
    return m.text_encoder.path, m.text_encoder.subfolder


def load_tokenizers(config) -> dict[str, Any]:
    """The tokenizer the config names, alone (the pre-flight's check of new tokens)."""
    return {"text_encoder": load_tokenizer(*_text_source(config), config.model.text_encoder.trust_remote_code)}


def load_encoders(config) -> tuple[Any, Any, Any]:
    """The frozen ``(vae, text_encoder, tokenizer)`` the config names."""
    m = config.model
    te_path, te_sub = _text_source(config)
    text_encoder, tokenizer = load_text_encoder(
        te_path, te_sub, m.text_encoder.max_length, m.text_encoder.dtype, m.text_encoder.trust_remote_code
    )
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    return load_vae(vae_path, vae_sub, m.vae.dtype), text_encoder, tokenizer


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen text encoder and autoencoder, and build or load the UNet, as the config says (``denoiser``
    False: no UNet, for encoding a dataset)."""
    m = config.model
    vae, text_encoder, tokenizer = load_encoders(config)
    if not denoiser:
        return Components(vae, text_encoder, tokenizer, None)
    if not m.unet.from_scratch and (m.unet.pretrained or m.pretrained):
        unet = load_unet(m.unet.pretrained or m.pretrained, m.unet.subfolder if m.unet.pretrained else "unet")
    else:
        sample_size = config.data.resolution // downsample_factor(vae)
        unet = build_unet(m.unet, vae.config.latent_channels, sample_size, hidden_size(text_encoder))
    if unet.config.cross_attention_dim != hidden_size(text_encoder):
        raise ConfigError(
            f"the UNet's cross_attention_dim ({unet.config.cross_attention_dim}) differs from the text encoder's "
            f"hidden size ({hidden_size(text_encoder)})"
        )
    return Components(vae, text_encoder, tokenizer, unet)


def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``StableDiffusionPipeline.encode_prompt`` encodes them: the encoder's last hidden state."""
    return {"encoder_hidden_states": encode_text(components.text_encoder, components.tokenizer, prompts, device)}


def tokenize(components: Components, prompts: list[str]) -> Conditioning:
    """The prompts' token ids (and attention mask where the encoder takes one), for a trained text encoder."""
    return tokenize_text(components.text_encoder, components.tokenizer, prompts)


def encode_tokens(text_encoders: dict[str, torch.nn.Module], cond: Conditioning) -> Conditioning:
    """``cond``'s tokens replaced by the encoder's last hidden state (with gradients where the encoder trains)."""
    cond = dict(cond)
    ids, mask = cond.pop("input_ids"), cond.pop("attention_mask", None)
    return cond | {"encoder_hidden_states": text_encoders["text_encoder"](ids, attention_mask=mask)[0]}


def predict(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's output for noisy latents at ``timesteps`` under ``cond``."""
    return unet(noisy, timesteps, **cond).sample


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionPipeline`` and its img2img sibling alike (no safety checker: a
    trainer's samples are checked by whoever trains)."""
    return {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "unet": components.unet,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def components_of(pipe: StableDiffusionPipeline) -> Components:
    """The components of a loaded ``StableDiffusionPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet)


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under."""
    return {"vae": components.vae, "text_encoder": components.text_encoder}


def encoders(components: Components) -> Encoders:
    """The autoencoder and the prompt encoding, for the data layer."""
    text_encoder, tokenizer = components.text_encoder, components.tokenizer
    return Encoders(
        vae=components.vae,
        encode_text=fp32_encoding(encode_prompts, components, text_encoder.device),
        text_identity=lambda: {"text_encoder": model_hash(text_encoder), "max_length": tokenizer.model_max_length},
    )


FAMILY = Family(
    name="sd",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    txt2img=StableDiffusionPipeline,
    img2img=StableDiffusionImg2ImgPipeline,
    denoiser="unet",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    objectives=("ddpm",),
    text_encoders=("text_encoder",),
    tokenize=tokenize,
    encode_tokens=encode_tokens,
    embedding_keys=("emb_params",),
    load_tokenizers=load_tokenizers,
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    single_file=sd_tensors,
)

"""Lumina 2 (Lumina-Image 2.0 and its fine-tunes): Gemma 2 as the text encoder, FLUX.1's 16-channel AutoencoderKL, the
``Lumina2Transformer2DModel`` (the Next-DiT: refiner layers for the noise and the caption, then one stream of both),
trained by rectified flow matching, exported as a ``Lumina2Pipeline``.

Conditioning, as ``Lumina2Pipeline.encode_prompt`` builds it: the pipeline's system prompt, ``" <Prompt Start> "`` and
the prompt, ``max_sequence_length`` tokens (the pipeline's 256 unless ``model.text_encoder.max_length`` says
otherwise), Gemma's second-to-last hidden state with the ``encoder_attention_mask`` of the real tokens (both caches
store the two). The empty prompt is encoded as the pipeline encodes its negative, without the system prompt: caption
dropout trains the unconditional prediction classifier-free guidance samples against. The transformer takes the
latents as they are, the time as ``1 - sigma`` (the pipeline's ``1 - t / 1000``) and the mask, and returns the
negated velocity, which :func:`predict` turns back into the velocity the objective trains. Sampling guides as the
pipeline does (classifier-free guidance with its renormalisation). diffusers has no image-to-image pipeline for it.

LoRA adapters go on the attention projections and feed-forward layers of every block (the refiners' too), saved in
diffusers' layout (``Lumina2Pipeline.load_lora_weights``) and, for ComfyUI, under the names its Lumina 2 mapping
reads (``comfy.utils.z_image_to_diffusers``: ``attention.to_q`` … and ``feed_forward.w1`` …, which it slices into its
fused ``qkv``): ``lora/lora_comfyui.safetensors`` (:func:`comfyui_names`). Built from scratch (``model.transformer``:
``num_layers`` blocks, ``num_attention_heads`` x ``attention_head_dim`` wide, patch 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import downsample_factor, load_vae

TOKENS = 256  # Lumina2Pipeline's max_sequence_length
SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts."
)  # Lumina2Pipeline.system_prompt
COMFYUI_NAMES = (
    (".attn.", ".attention."),
    (".feed_forward.linear_1.", ".feed_forward.w1."),
    (".feed_forward.linear_2.", ".feed_forward.w2."),
    (".feed_forward.linear_3.", ".feed_forward.w3."),
)  # diffusers' Lumina 2 names -> the Z-Image names ComfyUI's Lumina 2 mapping reads


@dataclass
class Components:
    """The autoencoder, Gemma 2 and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: Lumina2Transformer2DModel


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and Gemma 2, and load the transformer from ``model.pretrained`` (or its own path)
    or build it from ``model.transformer``."""
    m = config.model
    te = m.text_encoder
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError("model.family=lumina2 needs model.text_encoder.path or model.pretrained (a Lumina 2 "
                          "pipeline)")  # fmt: skip
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    encoder, tokenizer = load_text_encoder(path, sub, te.max_length or TOKENS, te.dtype, te.trust_remote_code)
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    if downsample_factor(vae) != 8:
        raise ConfigError(f"{vae_path}: Lumina2Pipeline samples at 8 pixels per latent, whatever the autoencoder; "
                          f"this one has {downsample_factor(vae)}")  # fmt: skip
    transformer = None
    if denoiser and (m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)):
        transformer = build_transformer(m.transformer, vae.config.latent_channels, hidden_size(encoder))
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = Lumina2Transformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, encoder, tokenizer, transformer)


def build_transformer(knobs, latent_channels: int, text_width: int) -> Lumina2Transformer2DModel:
    """A fresh Next-DiT of ``model.transformer``'s shape (patch 2, two refiner layers as Lumina 2's), its rotary axes
    (caption, row, column) splitting the head's channels in thirds as Lumina 2's 96 into 32 / 32 / 32."""
    head = knobs.attention_head_dim
    if knobs.patch_size != 2:
        raise ConfigError("model.family=lumina2: model.transformer.patch_size must be 2 (the pipeline's)")
    if head % 6:
        raise ConfigError(f"model.transformer.attention_head_dim={head}: Lumina 2's three rotary axes need a multiple "
                          "of 6")  # fmt: skip
    return Lumina2Transformer2DModel(
        patch_size=2,
        in_channels=latent_channels,
        hidden_size=knobs.num_attention_heads * head,
        num_layers=knobs.num_layers,
        num_refiner_layers=2,
        num_attention_heads=knobs.num_attention_heads,
        num_kv_heads=knobs.num_attention_heads,
        cap_feat_dim=text_width,
        axes_dim_rope=(head // 3,) * 3,
    )


def max_tokens(components: Components) -> int:
    """The prompt's tokens (the tokenizer's length, at most the pipeline's 512)."""
    return min(int(components.tokenizer.model_max_length), 512)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``Lumina2Pipeline.encode_prompt`` encodes them (the system prompt before each, Gemma's
    second-to-last hidden state), the empty prompt as its negative (without it): ``encoder_hidden_states`` and the
    ``encoder_attention_mask`` of the real tokens."""
    c = components
    texts = [f"{SYSTEM_PROMPT} <Prompt Start> {p}" if p else p for p in prompts]
    tokens = c.tokenizer(texts, padding="max_length", max_length=max_tokens(c), truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    out = c.text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    states = out.hidden_states[-2]
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask.to(states.dtype)}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The velocity for noisy ``B x C x H x W`` latents at ``timesteps`` (``1000 sigma``) under ``cond``: the
    transformer's call as the pipeline makes it (the time ``1 - sigma``, the mask of the real tokens), negated."""
    out = transformer(
        hidden_states=noisy,
        timestep=1 - timesteps.to(noisy.dtype) / 1000,
        encoder_hidden_states=cond["encoder_hidden_states"],
        encoder_attention_mask=(cond["encoder_attention_mask"] > 0).long(),
        return_dict=False,
    )[0]
    return -out


def comfyui_names(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of ``pytorch_lora_weights.safetensors`` under the names ComfyUI's Lumina 2 mapping reads
    (``transformer.layers.0.attention.to_q.lora_A.weight`` …, :data:`COMFYUI_NAMES`)."""
    renamed = {}
    for key, value in adapters.items():
        for ours, theirs in COMFYUI_NAMES:
            key = key.replace(ours, theirs)
        renamed[key] = value
    return renamed


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``Lumina2Pipeline``."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer}


def components_of(pipe: Lumina2Pipeline) -> Components:
    """The components of a loaded ``Lumina2Pipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.transformer)


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under."""
    return {"vae": components.vae, "text_encoder": components.text_encoder}


def encoders(components: Components) -> Encoders:
    """The autoencoder and the prompt encoding, for the data layer."""
    c = components
    return Encoders(
        vae=c.vae,
        encode_text=fp32_encoding(encode_prompts, c, c.text_encoder.device),
        text_identity=lambda: {
            "text_encoder": model_hash(c.text_encoder),
            "max_length": max_tokens(c),
            "system_prompt": SYSTEM_PROMPT,
        },
    )


FAMILY = Family(
    name="lumina2",
    pipeline_classes=("Lumina2Pipeline",),
    txt2img=Lumina2Pipeline,
    img2img=None,
    denoiser="transformer",
    lora_targets=(
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "feed_forward.linear_1",
        "feed_forward.linear_2",
        "feed_forward.linear_3",
    ),  # fmt: skip
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=lambda components: {"max_sequence_length": max_tokens(components)},
    comfyui_lora=comfyui_names,
)

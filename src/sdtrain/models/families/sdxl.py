"""Stable Diffusion XL: two CLIP text encoders (``text_encoder``, a CLIPTextModel, and ``text_encoder_2``, a
CLIPTextModelWithProjection: OpenCLIP ViT-bigG in SDXL), an AutoencoderKL, a ``UNet2DConditionModel`` with the
``text_time`` addition embedding, the DDPM objective, exported as a ``StableDiffusionXLPipeline``.

Conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` builds it: ``encoder_hidden_states`` is both encoders'
penultimate hidden states concatenated, ``text_embeds`` the second encoder's pooled, projected output, and
``time_ids`` each sample's original size, crop top-left and target size (SDXL's micro-conditioning), which the data
layer reads from every sample (:class:`~sdtrain.models.families.Encoders.encode_sizes`).

Caption dropout, and the empty prompt, are zeros: SDXL's reference training (Stability's generative-models, whose
text embedders drop captions by zeroing their output at ``ucg_rate``) conditions unconditional samples on zero text
embeddings and pooled vector, and the pipeline samples them that way (``force_zeros_for_empty_prompt``). The size
ids are never dropped, as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.single_file import sdxl_tensors
from sdtrain.models.text import hidden_size, load_text_encoder, load_tokenizer
from sdtrain.models.unet import build_unet, load_unet
from sdtrain.models.vae import downsample_factor, load_vae


@dataclass
class Components:
    """The autoencoder, the two text encoders and their tokenizers, and the UNet; only ``unet`` trains."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    unet: UNet2DConditionModel


def _source(config, index: int) -> tuple[str, str | None]:
    """Where text encoder ``index`` (1 or 2) is: its own path, else the pipeline's subfolder."""
    m = config.model
    te = m.text_encoder if index == 1 else m.text_encoder_2
    subfolder = "text_encoder" if index == 1 else "text_encoder_2"
    own = te.path not in ("", "minilm") or te.subfolder is not None  # "minilm" is SD's default, not SDXL's
    if not own and not m.pretrained:
        raise ConfigError(
            f"model.family=sdxl needs model.{'text_encoder' if index == 1 else 'text_encoder_2'}.path (a CLIP "
            "folder or hub id) or model.pretrained (an SDXL pipeline)"
        )
    return (te.path, te.subfolder) if own else (m.pretrained, subfolder)


def _encoder(config, index: int) -> tuple[Any, Any]:
    """Text encoder ``index`` (1 or 2) and its tokenizer."""
    te = config.model.text_encoder if index == 1 else config.model.text_encoder_2
    cls = CLIPTextModel if index == 1 else CLIPTextModelWithProjection
    return load_text_encoder(*_source(config, index), te.max_length, te.dtype, te.trust_remote_code, model_class=cls)


def load_tokenizers(config) -> dict[str, Any]:
    """Both tokenizers the config names, alone (the pre-flight's check of new tokens)."""
    m = config.model
    return {"text_encoder": load_tokenizer(*_source(config, 1), m.text_encoder.trust_remote_code),
            "text_encoder_2": load_tokenizer(*_source(config, 2), m.text_encoder_2.trust_remote_code)}  # fmt: skip


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and text encoders, and build or load the UNet, as the config says (``denoiser``
    False: no UNet, for encoding a dataset)."""
    m = config.model
    text_encoder, tokenizer = _encoder(config, 1)
    text_encoder_2, tokenizer_2 = _encoder(config, 2)
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    width = hidden_size(text_encoder) + hidden_size(text_encoder_2)
    unet = None
    if denoiser and not m.unet.from_scratch and (m.unet.pretrained or m.pretrained):
        unet = load_unet(m.unet.pretrained or m.pretrained, m.unet.subfolder if m.unet.pretrained else "unet")
    elif denoiser:
        text_time = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": m.unet.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": 6 * m.unet.addition_time_embed_dim + _pooled(text_encoder_2),
        }
        sample_size = config.data.resolution // downsample_factor(vae)
        unet = build_unet(m.unet, vae.config.latent_channels, sample_size, width, **text_time)
    if unet is not None:
        _check(unet, width, _pooled(text_encoder_2))
    return Components(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet)


def _pooled(text_encoder_2) -> int:
    return int(text_encoder_2.config.projection_dim)


def _check(unet: UNet2DConditionModel, width: int, pooled: int) -> None:
    """The UNet takes what the encoders give: their hidden states' width, their pooled vector and six size ids."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        raise ConfigError(f"an SDXL UNet has addition_embed_type 'text_time', this one {config.addition_embed_type!r}")
    if config.cross_attention_dim != width:
        raise ConfigError(
            f"the UNet's cross_attention_dim ({config.cross_attention_dim}) differs from the two text encoders' "
            f"hidden sizes together ({width})"
        )
    expected = 6 * config.addition_time_embed_dim + pooled
    if config.projection_class_embeddings_input_dim != expected:
        given = config.projection_class_embeddings_input_dim
        raise ConfigError(
            f"the UNet's projection_class_embeddings_input_dim ({given}) is not 6 size ids x "
            f"{config.addition_time_embed_dim} + the pooled text embedding's {pooled}"
        )


def tokenize(components: Components, prompts: list[str]) -> Conditioning:
    """Both tokenizers' ids of the prompts, and ``keep``: 0 for an empty prompt, whose encoding is zeros."""
    tokens = {}
    for key, tokenizer in (("input_ids", components.tokenizer), ("input_ids_2", components.tokenizer_2)):
        tokens[key] = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
    return tokens | {"keep": torch.tensor([float(bool(p)) for p in prompts])}


def encode_tokens(text_encoders: dict[str, torch.nn.Module], cond: Conditioning) -> Conditioning:
    """``cond``'s tokens replaced by SDXL's conditioning: both encoders' penultimate hidden states concatenated, the
    second's projected pooled output (``text_embeds``), zeros where ``keep`` is 0."""
    cond = dict(cond)
    ids, ids_2, keep = cond.pop("input_ids"), cond.pop("input_ids_2"), cond.pop("keep")
    first = text_encoders["text_encoder"](ids, output_hidden_states=True)
    second = text_encoders["text_encoder_2"](ids_2, output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second[0]  # the second encoder's projected pooled output: text_embeds
    return cond | {
        "encoder_hidden_states": states * keep.view(-1, 1, 1).to(states.dtype),
        "text_embeds": pooled * keep.view(-1, 1).to(pooled.dtype),
    }


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``StableDiffusionXLPipeline.encode_prompt`` encodes them (no clip_skip); an empty prompt is
    zeros (see the module docstring)."""
    tokens = {k: v.to(device) for k, v in tokenize(components, prompts).items()}
    encoders = {"text_encoder": components.text_encoder, "text_encoder_2": components.text_encoder_2}
    return encode_tokens(encoders, tokens)


def encode_sizes(originals: list, crops: list, target: tuple[int, int]) -> Conditioning:
    """SDXL's ``time_ids`` of each sample: original (height, width), crop (top, left), target (height, width), as
    ``StableDiffusionXLPipeline._get_add_time_ids`` lays them out."""
    rows = [list(original) + list(crop) + list(target) for original, crop in zip(originals, crops)]
    return {"time_ids": torch.tensor(rows, dtype=torch.float32)}


def predict(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's output under SDXL's conditioning (hidden states by cross-attention, pooled text and size ids
    added to the timestep embedding)."""
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionXLPipeline`` (or its img2img sibling): no watermarker, no image
    encoder, empty prompts as zeros."""
    kwargs = {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "text_encoder_2": components.text_encoder_2,
        "tokenizer": components.tokenizer,
        "tokenizer_2": components.tokenizer_2,
        "unet": components.unet,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }
    return kwargs | ({"requires_aesthetics_score": False} if img2img else {})


def components_of(pipe: StableDiffusionXLPipeline) -> Components:
    """The components of a loaded ``StableDiffusionXLPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, pipe.unet)


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under."""
    return {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "text_encoder_2": components.text_encoder_2,
    }


def encoders(components: Components) -> Encoders:
    """The autoencoder, the prompt encoding and the size ids, for the data layer."""
    c = components
    return Encoders(
        vae=c.vae,
        encode_text=fp32_encoding(encode_prompts, c, c.text_encoder.device),
        text_identity=lambda: {
            "text_encoder": model_hash(c.text_encoder),
            "text_encoder_2": model_hash(c.text_encoder_2),
            "max_length": [c.tokenizer.model_max_length, c.tokenizer_2.model_max_length],
        },
        encode_sizes=encode_sizes,
    )


FAMILY = Family(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    txt2img=StableDiffusionXLPipeline,
    img2img=StableDiffusionXLImg2ImgPipeline,
    denoiser="unet",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    objectives=("ddpm",),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenize=tokenize,
    encode_tokens=encode_tokens,
    embedding_keys=("clip_l", "clip_g"),
    load_tokenizers=load_tokenizers,
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    single_file=sdxl_tensors,
)

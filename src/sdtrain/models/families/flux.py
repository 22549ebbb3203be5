"""Flux (FLUX.1 dev / schnell and their fine-tunes): a CLIP text encoder (its pooled output), a T5 encoder (its last
hidden state), an AutoencoderKL with 16 latent channels and a ``shift_factor``, a ``FluxTransformer2DModel`` (double-
and single-stream blocks with rotary positions), trained by rectified flow matching, exported as a ``FluxPipeline``.

Conditioning, as ``FluxPipeline.encode_prompt`` builds it: ``pooled_projections`` is CLIP's pooled output,
``encoder_hidden_states`` T5's last hidden state (``max_sequence_length`` tokens: the pipeline's 512 unless
``model.text_encoder_2.max_length`` says otherwise). The transformer sees the latents packed into 2 x 2 patches with
their (0, row, column) position ids and the text at position ids 0, at timestep ``sigma`` (the pipeline's
``t / 1000``); :func:`predict` packs the latents, calls it and unpacks the velocity, so the objective and the data
never see packing.
A guidance-distilled transformer (``guidance_embeds``: FLUX.1 dev) is trained with its guidance embedding at
:data:`TRAIN_GUIDANCE`, as SimpleTuner and ai-toolkit train it; sampling passes ``guidance_scale`` to that embedding
(no classifier-free guidance, as the pipeline does without ``true_cfg_scale``). Caption dropout encodes the empty
prompt.

LoRA adapters go on the attention projections of both streams, saved in diffusers' layout (``transformer.…``), which
ComfyUI loads for Flux. Built from scratch (``model.transformer``: its ``num_layers`` double-stream and
``num_single_layers`` single-stream blocks), without a guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import load_vae

T5_TOKENS = 512  # FluxPipeline's default max_sequence_length
TRAIN_GUIDANCE = 1.0  # the guidance embedding's value while training a guidance-distilled model


@dataclass
class Components:
    """The autoencoder, CLIP and T5 and their tokenizers, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    transformer: FluxTransformer2DModel


def _encoder(config, index: int) -> tuple[Any, Any]:
    """CLIP (1) or T5 (2) and its tokenizer: its own path, else the pipeline's subfolder."""
    m = config.model
    name, cls = ("text_encoder", CLIPTextModel) if index == 1 else ("text_encoder_2", T5EncoderModel)
    te = getattr(m, name)
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError(f"model.family=flux needs model.{name}.path or model.pretrained (a Flux pipeline)")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, name)
    max_length = te.max_length if index == 1 else te.max_length or T5_TOKENS
    return load_text_encoder(path, sub, max_length, te.dtype, te.trust_remote_code, model_class=cls)


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and text encoders, and load the transformer from ``model.pretrained`` (or its own
    path) or build it from ``model.transformer``."""
    m = config.model
    (clip, clip_tokenizer), (t5, t5_tokenizer) = _encoder(config, 1), _encoder(config, 2)
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    transformer = None
    if denoiser and (m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)):
        transformer = build_transformer(m.transformer, vae.config.latent_channels, hidden_size(t5), hidden_size(clip))
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = FluxTransformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, clip, t5, clip_tokenizer, t5_tokenizer, transformer)


def build_transformer(knobs, latent_channels: int, text_width: int, pooled_width: int) -> FluxTransformer2DModel:
    """A fresh Flux transformer of ``model.transformer``'s shape over packed latents (4 x the latent channels), its
    rotary axes split as FLUX.1's (:func:`rotary_axes`)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=knobs.num_layers,
        num_single_layers=knobs.num_single_layers,
        attention_head_dim=knobs.attention_head_dim,
        num_attention_heads=knobs.num_attention_heads,
        joint_attention_dim=text_width,
        pooled_projection_dim=pooled_width,
        guidance_embeds=False,
        axes_dims_rope=rotary_axes(knobs.attention_head_dim),
    )


def rotary_axes(head: int) -> tuple[int, int, int]:
    """The rotary channels of each position axis (index, row, column) for heads of ``head`` channels, split as FLUX.1
    splits its 128 (16 / 56 / 56), each an even number."""
    side = head * 7 // 16 // 2 * 2
    axes = (head - 2 * side, side, side)
    if min(axes) < 2:
        raise ConfigError(f"model.transformer.attention_head_dim={head} is too small for Flux's three rotary axes")
    return axes


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``FluxPipeline.encode_prompt`` encodes them: CLIP's pooled output, T5's last hidden state."""
    c = components
    clip_ids = c.tokenizer(
        prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = c.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5_ids = c.tokenizer_2(
        prompts, padding="max_length", max_length=c.tokenizer_2.model_max_length, truncation=True,
        return_length=False, return_overflowing_tokens=False, return_tensors="pt",
    ).input_ids  # fmt: skip
    states = c.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``B x C x H x W`` latents as Flux's sequence of 2 x 2 patches, ``B x (H / 2 * W / 2) x 4C``."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width`` (the pipeline's unpacking, which takes pixel
    sizes and the autoencoder's factor, at factor 1)."""
    return FluxPipeline._unpack_latents(packed, height, width, 1)


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's velocity for noisy ``B x C x H x W`` latents at ``timesteps`` (``1000 sigma``) under
    ``cond``: packed, with the position ids and guidance the pipeline gives, and unpacked."""
    b, _, h, w = noisy.shape
    states = cond["encoder_hidden_states"]
    config = getattr(transformer, "module", transformer).config  # DDP and DeepSpeed wrap the model
    guidance = torch.full((b,), TRAIN_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
    out = transformer(
        hidden_states=pack(noisy),
        timestep=timesteps.to(noisy.dtype) / 1000,
        guidance=guidance,
        pooled_projections=cond["pooled_projections"],
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
    ).sample
    return unpack(out, h, w)


def pipeline_latents(pipe, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """The ``B x C x H x W`` latents of what the pipeline returned with ``output_type="latent"`` (packed) for an image
    of ``height`` x ``width`` pixels (None: the pipeline's default size)."""
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    return FluxPipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``FluxPipeline`` and its img2img sibling (no image encoder)."""
    c = components
    return {
        "vae": c.vae, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2, "tokenizer": c.tokenizer,
        "tokenizer_2": c.tokenizer_2, "transformer": c.transformer, "image_encoder": None, "feature_extractor": None,
    }  # fmt: skip


def components_of(pipe: FluxPipeline) -> Components:
    """The components of a loaded ``FluxPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                      pipe.transformer)  # fmt: skip


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2}


def encoders(components: Components) -> Encoders:
    """The autoencoder and the prompt encoding, for the data layer."""
    c = components
    return Encoders(
        vae=c.vae,
        encode_text=fp32_encoding(encode_prompts, c, c.text_encoder.device),
        text_identity=lambda: {
            "text_encoder": model_hash(c.text_encoder),
            "text_encoder_2": model_hash(c.text_encoder_2),
            "max_length": [c.tokenizer.model_max_length, c.tokenizer_2.model_max_length],
        },
    )


FAMILY = Family(
    name="flux",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    txt2img=FluxPipeline,
    img2img=FluxImg2ImgPipeline,
    denoiser="transformer",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=lambda components: {"max_sequence_length": components.tokenizer_2.model_max_length},
    pipeline_latents=pipeline_latents,
)

"""Z-Image (Z-Image, Z-Image-Turbo and their fine-tunes): a Qwen3 language model as the text encoder, FLUX.1's
16-channel AutoencoderKL, the single-stream S3-DiT ``ZImageTransformer2DModel`` (refiner layers for the noise and the
caption, then one stream of both), trained by rectified flow matching, exported as a ``ZImagePipeline``.

Conditioning, as ``ZImagePipeline.encode_prompt`` builds it: each prompt in the tokenizer's chat template (a user turn,
the generation prompt, thinking enabled), ``max_sequence_length`` tokens (the pipeline's 512 unless
``model.text_encoder.max_length`` says otherwise), the encoder's second-to-last hidden state with the padding masked.
The pipeline hands the transformer each prompt's real tokens alone, a list of tensors of their own lengths; here the
conditioning is batch first, ``encoder_hidden_states`` padded to the length and ``attention_mask`` saying which tokens
are real (the caches store both), and :func:`predict` cuts each prompt's real tokens out again. The transformer
takes a list of ``C x 1 x H x W`` latents (a frame axis), the time as ``1 - sigma`` (the pipeline's
``(1000 - t) / 1000``) and returns the negated velocity, which :func:`predict` turns back into the velocity the
objective trains, so the loop, the data and both caches see what they see for every flow-matching family. Caption
dropout encodes the empty prompt in the same template.

LoRA adapters go on the attention projections and the feed-forward layers of every block (the refiners' too), saved in
diffusers' layout (``transformer.…``, what ``ZImagePipeline.load_lora_weights`` reads). Built from scratch
(``model.transformer``: ``num_layers`` blocks, ``num_attention_heads`` x ``attention_head_dim`` wide, patch 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline, ZImageTransformer2DModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import load_vae

TOKENS = 512  # ZImagePipeline's default max_sequence_length


@dataclass
class Components:
    """The autoencoder, the Qwen3 encoder and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: ZImageTransformer2DModel


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and Qwen3, and load the transformer from ``model.pretrained`` (or its own path) or
    build it from ``model.transformer``."""
    m = config.model
    te = m.text_encoder
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError("model.family=zimage needs model.text_encoder.path or model.pretrained (a Z-Image pipeline)")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    encoder, tokenizer = load_text_encoder(path, sub, te.max_length or TOKENS, te.dtype, te.trust_remote_code)
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    transformer = None
    if denoiser and (m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)):
        transformer = build_transformer(m.transformer, vae.config.latent_channels, hidden_size(encoder))
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = ZImageTransformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, encoder, tokenizer, transformer)


def build_transformer(knobs, latent_channels: int, text_width: int) -> ZImageTransformer2DModel:
    """A fresh S3-DiT of ``model.transformer``'s shape (patch 2, two refiner layers as Z-Image's), its rotary axes
    (frame, row, column) splitting the head's channels as Z-Image's 128 split into 32 / 48 / 48."""
    head = knobs.attention_head_dim
    side = head * 3 // 8 // 2 * 2
    axes = [head - 2 * side, side, side]
    if min(axes) < 2:
        raise ConfigError(f"model.transformer.attention_head_dim={head} is too small for Z-Image's three rotary axes")
    if knobs.patch_size != 2:
        raise ConfigError("model.family=zimage: model.transformer.patch_size must be 2 (the pipeline's)")
    return ZImageTransformer2DModel(
        in_channels=latent_channels,
        dim=knobs.num_attention_heads * head,
        n_layers=knobs.num_layers,
        n_refiner_layers=2,
        n_heads=knobs.num_attention_heads,
        n_kv_heads=knobs.num_attention_heads,
        cap_feat_dim=text_width,
        axes_dims=axes,
    )


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``ZImagePipeline.encode_prompt`` encodes them (the chat template, the second-to-last hidden state
    with the padding masked), padded: ``encoder_hidden_states`` and the ``attention_mask`` of the real tokens."""
    c = components
    templated = [
        c.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=True)
        for prompt in prompts
    ]  # fmt: skip
    tokens = c.tokenizer(
        templated, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = tokens.attention_mask.to(device).bool()
    states = c.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    return {"encoder_hidden_states": states.hidden_states[-2], "attention_mask": mask.to(states.hidden_states[-2])}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The velocity for noisy ``B x C x H x W`` latents at ``timesteps`` (``1000 sigma``) under ``cond``: the
    transformer's call as the pipeline makes it (each latent with a frame axis, each prompt's real tokens, the time
    ``1 - sigma``), its output negated back and stacked."""
    states, mask = cond["encoder_hidden_states"], cond["attention_mask"] > 0
    out = transformer(
        list(noisy.unsqueeze(2).unbind(0)),
        (1000 - timesteps.to(noisy.dtype)) / 1000,
        [s[m] for s, m in zip(states, mask)],
        return_dict=False,
    )[0]
    return -torch.stack(out).squeeze(2)


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``ZImagePipeline`` and its img2img sibling."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer}


def components_of(pipe: ZImagePipeline) -> Components:
    """The components of a loaded ``ZImagePipeline``."""
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
            "max_length": c.tokenizer.model_max_length,
            "chat_template": c.tokenizer.chat_template,
        },
    )


FAMILY = Family(
    name="zimage",
    pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline"),
    txt2img=ZImagePipeline,
    img2img=ZImageImg2ImgPipeline,
    denoiser="transformer",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"),
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=lambda components: {"max_sequence_length": components.tokenizer.model_max_length},
)

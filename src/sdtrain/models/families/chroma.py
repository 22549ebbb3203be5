"""Chroma (Chroma1-HD, Chroma1-Base and their fine-tunes): Flux's architecture with its CLIP encoder and guidance
embedding removed (timestep modulation from a small approximator network), a T5 encoder whose padding is masked, the
16-channel AutoencoderKL of Flux, trained by rectified flow matching, exported as a ``ChromaPipeline``.

Conditioning, as ``ChromaPipeline.encode_prompt`` builds it: ``encoder_hidden_states`` is T5's last hidden state run
with the tokenizer's attention mask (``max_sequence_length`` tokens: the pipeline's 512 unless
``model.text_encoder.max_length`` says otherwise), ``attention_mask`` the text tokens the transformer attends to: every
real token and the first padding token (Chroma's rule), as 0 / 1 in the embeddings' dtype (the caches store it as
any other conditioning). :func:`predict` packs the latents into 2 x 2 patches with Flux's position ids, extends the
mask over the image tokens as the pipeline does, hands it to attention as booleans (the padding excluded, as Chroma
was trained and ComfyUI samples it) and unpacks the velocity. Given prompt strings, diffusers' ``ChromaPipeline``
hands its mask to attention as floats, which only bias the scores (diffusers issues 11724, 12116, 13619, open in the
diffusers sdtrain installs), so sampling calls the plain pipeline with the prompts' embeddings and boolean masks
(:func:`pipeline_prompts`), which it takes as they are. Sampling uses real classifier-free guidance
(``guidance_scale`` with a negative prompt), as the pipeline does; caption dropout encodes the empty prompt.

LoRA adapters go on the attention projections of both streams, saved in diffusers' layout (``transformer.…``), which
ComfyUI loads for Chroma through its Flux mapping (its Chroma model is a Flux model). Built from scratch
(``model.transformer``: its ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ChromaImg2ImgPipeline, ChromaPipeline, ChromaTransformer2DModel
from transformers import T5EncoderModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.families.flux import pack, pipeline_latents, rotary_axes, unpack
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import load_vae

T5_TOKENS = 512  # ChromaPipeline's default max_sequence_length


@dataclass
class Components:
    """The autoencoder, T5 and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: ChromaTransformer2DModel


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and T5, and load the transformer from ``model.pretrained`` (or its own path) or
    build it from ``model.transformer``."""
    m = config.model
    te = m.text_encoder
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError("model.family=chroma needs model.text_encoder.path or model.pretrained (a Chroma pipeline)")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    t5, tokenizer = load_text_encoder(path, sub, te.max_length or T5_TOKENS, te.dtype, te.trust_remote_code,
                                      model_class=T5EncoderModel)  # fmt: skip
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    transformer = None
    if denoiser and (m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)):
        transformer = build_transformer(m.transformer, vae.config.latent_channels, hidden_size(t5))
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = ChromaTransformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, t5, tokenizer, transformer)


def build_transformer(knobs, latent_channels: int, text_width: int) -> ChromaTransformer2DModel:
    """A fresh Chroma transformer of ``model.transformer``'s shape over packed latents (4 x the latent channels), its
    rotary axes split as Flux's, its modulation approximator Chroma1's (5 layers of 4 x the model's width)."""
    width = knobs.num_attention_heads * knobs.attention_head_dim
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=knobs.num_layers,
        num_single_layers=knobs.num_single_layers,
        attention_head_dim=knobs.attention_head_dim,
        num_attention_heads=knobs.num_attention_heads,
        joint_attention_dim=text_width,
        axes_dims_rope=rotary_axes(knobs.attention_head_dim),
        approximator_num_channels=64,
        approximator_hidden_dim=width * 5 // 3,  # Chroma1: 5120 for a 3072-wide model
        approximator_layers=5,
    )


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``ChromaPipeline.encode_prompt`` encodes them: T5 run with the padding masked, and the text mask
    the transformer uses (real tokens and the first padding token)."""
    c = components
    tokens = c.tokenizer(
        prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
        return_length=False, return_overflowing_tokens=False, return_tensors="pt",
    )  # fmt: skip
    mask = tokens.attention_mask.to(device)
    states = c.text_encoder(tokens.input_ids.to(device), output_hidden_states=False, attention_mask=mask)[0]
    positions = torch.arange(mask.shape[1], device=device).unsqueeze(0)
    attends = (positions <= mask.sum(dim=1, keepdim=True)).to(states.dtype)
    return {"encoder_hidden_states": states, "attention_mask": attends}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's velocity for noisy ``B x C x H x W`` latents at ``timesteps`` (``1000 sigma``) under
    ``cond``: packed, with the position ids and the text mask extended over the image tokens as the pipeline gives
    them, and unpacked."""
    b, _, h, w = noisy.shape
    states, text_mask = cond["encoder_hidden_states"], cond["attention_mask"]
    image_mask = torch.ones(b, (h // 2) * (w // 2), device=noisy.device, dtype=torch.bool)
    out = transformer(
        hidden_states=pack(noisy),
        timestep=timesteps.to(noisy.dtype) / 1000,
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
        attention_mask=torch.cat([text_mask > 0, image_mask], dim=1),  # boolean: the padding excluded
    ).sample
    return unpack(out, h, w)


@torch.no_grad()
def pipeline_prompts(pipe: ChromaPipeline, prompts: list[str], negatives: list[str] | None) -> dict[str, Any]:
    """The prompts as ``ChromaPipeline``'s embedding arguments with boolean masks. Given strings, the pipeline hands
    its 0 / 1 mask to attention as floats, which SDPA adds to the scores instead of excluding the padding (diffusers
    issues 11724, 12116, 13619); a boolean mask excludes it, as Chroma was trained, as ComfyUI samples it and as
    :func:`predict` trains."""
    length = pipe.tokenizer.model_max_length
    states, _, mask, negative, _, negative_mask = pipe.encode_prompt(
        prompts, negatives, do_classifier_free_guidance=True, max_sequence_length=length
    )
    return {"prompt_embeds": states, "prompt_attention_mask": mask.bool(), "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask.bool()}  # fmt: skip


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``ChromaPipeline`` and its img2img sibling (no image encoder)."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer,
            "image_encoder": None, "feature_extractor": None}  # fmt: skip


def components_of(pipe: ChromaPipeline) -> Components:
    """The components of a loaded ``ChromaPipeline``."""
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
            "masked": True,  # T5 run with the padding masked, unlike Flux's
        },
    )


FAMILY = Family(
    name="chroma",
    pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"),
    txt2img=ChromaPipeline,
    img2img=ChromaImg2ImgPipeline,
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
    sampling_kwargs=lambda components: {"max_sequence_length": components.tokenizer.model_max_length},
    pipeline_latents=pipeline_latents,
    pipeline_prompts=pipeline_prompts,
)

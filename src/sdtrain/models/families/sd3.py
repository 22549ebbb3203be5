"""Stable Diffusion 3 / 3.5: three text encoders (CLIP-L and CLIP-G with projection, T5), an AutoencoderKL with
16 latent channels and a ``shift_factor``, an ``SD3Transformer2DModel`` (MMDiT), trained by rectified flow matching
(:class:`sdtrain.objective.FlowMatching`), exported as a ``StableDiffusion3Pipeline``.

Conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it: ``encoder_hidden_states`` is both CLIPs'
penultimate hidden states concatenated and zero-padded to T5's width, followed along the sequence by T5's last hidden
state (``max_sequence_length`` tokens, the pipeline's 256 unless ``model.text_encoder_3.max_length`` says otherwise);
``pooled_projections`` is both CLIPs' pooled, projected outputs concatenated. Caption dropout encodes the empty
prompt, as SD3's training script and its pipeline's unconditional branch do.

LoRA adapters go on the attention projections of both streams; they are saved in diffusers' layout
(``transformer.…``), which ComfyUI loads for SD3. From scratch, the transformer is built from ``model.transformer``
with the family named (``model.family=sd3``) and the three encoders given as folders or hub ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import downsample_factor, load_vae

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


@dataclass
class Components:
    """The autoencoder, three text encoders and their tokenizers, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    text_encoder_3: Any
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    transformer: SD3Transformer2DModel


_ENCODERS = {1: ("text_encoder", CLIPTextModelWithProjection), 2: ("text_encoder_2", CLIPTextModelWithProjection),
             3: ("text_encoder_3", T5EncoderModel)}  # fmt: skip


def _encoder(config, index: int) -> tuple[Any, Any]:
    """Text encoder ``index`` and its tokenizer: its own path, else the pipeline's subfolder."""
    m, (name, cls) = config.model, _ENCODERS[index]
    te = getattr(m, name)
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError(f"model.family=sd3 needs model.{name}.path or model.pretrained (an SD3 pipeline)")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, name)
    max_length = te.max_length if index < 3 else te.max_length or T5_TOKENS
    return load_text_encoder(path, sub, max_length, te.dtype, te.trust_remote_code, model_class=cls)


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and text encoders, and the transformer, from ``model.pretrained`` (or the
    components' own paths)."""
    m = config.model
    encoders = [_encoder(config, i) for i in (1, 2, 3)]
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    (te1, tok1), (te2, tok2), (te3, tok3) = encoders
    transformer = None
    if denoiser and (m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)):
        sample_size = config.data.resolution // downsample_factor(vae)
        pooled = te1.config.projection_dim + te2.config.projection_dim
        channels = vae.config.latent_channels
        transformer = build_transformer(m.transformer, channels, sample_size, hidden_size(te3), pooled)
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = SD3Transformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, te1, te2, te3, tok1, tok2, tok3, transformer)


def build_transformer(
    knobs, latent_channels: int, sample_size: int, text_width: int, pooled_width: int
) -> SD3Transformer2DModel:
    """A fresh MMDiT of ``model.transformer``'s shape over ``sample_size``-sided latents: the text stream projected
    from T5's width (the CLIP states are padded to it), the pooled vector of both CLIPs; positions for up to 96
    patches a side, as SD3 (or the latent's own, if larger)."""
    if sample_size % knobs.patch_size:
        raise ConfigError(f"latents of side {sample_size} do not split into {knobs.patch_size}-sided patches")
    width = knobs.num_attention_heads * knobs.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=knobs.patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=knobs.num_layers,
        attention_head_dim=knobs.attention_head_dim,
        num_attention_heads=knobs.num_attention_heads,
        joint_attention_dim=text_width,
        caption_projection_dim=width,
        pooled_projection_dim=pooled_width,
        pos_embed_max_size=max(96, sample_size // knobs.patch_size),
    )


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``StableDiffusion3Pipeline.encode_prompt`` encodes them (no clip_skip)."""
    c = components
    hidden, pooled = [], []
    for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        output = encoder(ids.to(device), output_hidden_states=True)
        pooled.append(output[0])
        hidden.append(output.hidden_states[-2])
    ids = c.tokenizer_3(
        prompts, padding="max_length", max_length=c.tokenizer_3.model_max_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    t5 = c.text_encoder_3(ids.to(device))[0]
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    states = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
    return {"encoder_hidden_states": states, "pooled_projections": torch.cat(pooled, dim=-1)}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's velocity for noisy latents at ``timesteps`` (``1000 sigma``) under ``cond``."""
    return transformer(hidden_states=noisy, timestep=timesteps, **cond).sample


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusion3Pipeline`` and its img2img sibling (no image encoder)."""
    c = components
    return {
        "vae": c.vae, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2,
        "text_encoder_3": c.text_encoder_3, "tokenizer": c.tokenizer, "tokenizer_2": c.tokenizer_2,
        "tokenizer_3": c.tokenizer_3, "transformer": c.transformer,
    }  # fmt: skip


def components_of(pipe: StableDiffusion3Pipeline) -> Components:
    """The components of a loaded ``StableDiffusion3Pipeline``."""
    return Components(
        pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.tokenizer, pipe.tokenizer_2,
        pipe.tokenizer_3, pipe.transformer,
    )  # fmt: skip


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2,
            "text_encoder_3": c.text_encoder_3}  # fmt: skip


def encoders(components: Components) -> Encoders:
    """The autoencoder and the prompt encoding, for the data layer."""
    c = components
    return Encoders(
        vae=c.vae,
        encode_text=fp32_encoding(encode_prompts, c, c.text_encoder.device),
        text_identity=lambda: {
            **{name: model_hash(getattr(c, name)) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")},
            "max_length": [t.model_max_length for t in (c.tokenizer, c.tokenizer_2, c.tokenizer_3)],
        },
    )


FAMILY = Family(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    txt2img=StableDiffusion3Pipeline,
    img2img=StableDiffusion3Img2ImgPipeline,
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
    sampling_kwargs=lambda components: {"max_sequence_length": components.tokenizer_3.model_max_length},
)

"""Sana: a Gemma 2 text encoder (its last hidden state and attention mask), a deep-compression autoencoder
(``AutoencoderDC``, 32 x downsampling), a ``SanaTransformer2DModel`` (linear-attention DiT), trained by rectified flow
matching, exported as a ``SanaPipeline``.

Prompts are encoded by ``SanaPipeline.encode_prompt`` itself (no copy of it here): the pipeline prepends its complex
human instruction to every prompt, and keeps the first token and the last ``max_sequence_length - 1`` of the result,
which training must see as sampling does. Its default instruction and length (300 tokens, or
``model.text_encoder.max_length``) are used for both. Caption dropout encodes the empty prompt as the pipeline's
unconditional branch does: without the instruction. The transformer is called at ``1000 sigma`` times its
``timestep_scale``; a learned-variance half of its output, where it has one, is left untrained. diffusers has no Sana
image-to-image pipeline, so ``reconstruct`` is refused. LoRA adapters on the attention projections are saved in
diffusers' layout, which ``SanaPipeline.load_lora_weights`` reads. From scratch (``model.family=sana``), the
transformer is built from ``model.transformer`` over any transformers text encoder given by path.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import SanaPipeline, SanaTransformer2DModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import downsample_factor, load_vae

TOKENS = 300  # SanaPipeline's default max_sequence_length
# the instruction SanaPipeline prepends to every prompt unless told otherwise
INSTRUCTION: list[str] = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


@dataclass
class Components:
    """The autoencoder, Gemma and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: SanaTransformer2DModel


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and text encoder, and the transformer, from ``model.pretrained`` (or their own
    paths)."""
    m = config.model
    te = m.text_encoder
    scratch = m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)
    # the bundled MiniLM conditions a transformer built from scratch with nothing pretrained (the demo's)
    own = te.path not in ("", "minilm") or te.subfolder is not None or (te.path == "minilm" and not m.pretrained)
    if not own and not m.pretrained:
        raise ConfigError("model.family=sana needs model.text_encoder.path (a Gemma 2) or model.pretrained")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    text_encoder, tokenizer = load_text_encoder(path, sub, te.max_length or TOKENS, te.dtype, te.trust_remote_code)
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    transformer = None
    if denoiser and scratch:
        sample_size = config.data.resolution // downsample_factor(vae)
        width = hidden_size(text_encoder)
        transformer = build_transformer(m.transformer, vae.config.latent_channels, sample_size, width)
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = SanaTransformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, text_encoder, tokenizer, transformer)


def build_transformer(knobs, latent_channels: int, sample_size: int, caption_channels: int) -> SanaTransformer2DModel:
    """A fresh Sana transformer of ``model.transformer``'s shape over ``sample_size``-sided latents, its
    cross-attention as wide and as many-headed as its self-attention (Sana 1600M: 70 x 32 linear-attention heads,
    20 x 112 cross-attention heads)."""
    if sample_size % knobs.patch_size:
        raise ConfigError(f"latents of side {sample_size} do not split into {knobs.patch_size}-sided patches")
    width = knobs.num_attention_heads * knobs.attention_head_dim
    return SanaTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=knobs.num_attention_heads,
        attention_head_dim=knobs.attention_head_dim,
        num_layers=knobs.num_layers,
        num_cross_attention_heads=knobs.num_attention_heads,
        cross_attention_head_dim=knobs.attention_head_dim,
        cross_attention_dim=width,
        caption_channels=caption_channels,
        dropout=knobs.dropout,
        sample_size=sample_size,
        patch_size=knobs.patch_size,
    )


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``SanaPipeline.encode_prompt`` encodes them (its instruction prepended, no caption cleaning), the
    empty prompt as it encodes its negative (without the instruction: caption dropout trains the unconditional
    prediction that classifier-free guidance samples against): Gemma's last hidden state and the attention mask over
    its tokens."""
    c = components
    encoder = SanaPipeline(c.tokenizer, c.text_encoder, vae=None, transformer=None, scheduler=None)
    kwargs = dict(do_classifier_free_guidance=False, device=torch.device(device), clean_caption=False,
                  max_sequence_length=c.tokenizer.model_max_length)  # fmt: skip
    # the instruction is prepended, and the first token and the last max_sequence_length - 1 kept
    states, mask, _, _ = encoder.encode_prompt(prompts, complex_human_instruction=INSTRUCTION, **kwargs)
    blank = [i for i, p in enumerate(prompts) if not p]
    if blank:  # the negative's encoding: max_sequence_length tokens of the prompt alone, all of them kept
        empty, empty_mask, _, _ = encoder.encode_prompt([""], complex_human_instruction=None, **kwargs)
        states[blank], mask[blank] = empty[0], empty_mask[0]
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's velocity (its learned-variance half left out) at ``timesteps`` (``1000 sigma``), scaled by
    its ``timestep_scale`` as the pipeline scales it."""
    config = getattr(transformer, "module", transformer).config  # DDP and DeepSpeed wrap the model
    out = transformer(noisy, timestep=timesteps * config.timestep_scale, **cond).sample
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``SanaPipeline``."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer}


def components_of(pipe: SanaPipeline) -> Components:
    """The components of a loaded ``SanaPipeline``."""
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
            "empty_prompt": "negative",  # since 2026-12-07: a cache holding it with the instruction is refused
        },
    )


def sampling_kwargs(components: Components) -> dict[str, Any]:
    """Sana's pipeline is called with the length sdtrain trained with, without caption cleaning, and at the size
    asked for (no resolution binning)."""
    tokens = components.tokenizer.model_max_length
    return {"max_sequence_length": tokens, "clean_caption": False, "use_resolution_binning": False}


FAMILY = Family(
    name="sana",
    pipeline_classes=("SanaPipeline",),
    txt2img=SanaPipeline,
    img2img=None,  # diffusers has no Sana img2img pipeline: reconstruct says so
    denoiser="transformer",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=sampling_kwargs,
    flow_samplers=("dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler"),  # Sana's own scheduler first
)

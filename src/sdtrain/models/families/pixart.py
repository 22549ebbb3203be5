"""PixArt-Sigma: one T5 text encoder (its last hidden state and attention mask), an AutoencoderKL, a
``PixArtTransformer2DModel`` (DiT with adaLN-single and cross-attention), exported as a ``PixArtSigmaPipeline``.
It trains with DDPM as PixArt-Sigma does, or with flow matching (``train.objective.kind=flow``, as Sana trains the
same kind of transformer), then sampled with the multistep solvers on flow sigmas, the flow samplers that PixArt's
pipeline can run. Built from scratch (``model.transformer``), any transformers encoder conditions it.

The transformer outputs the noise and, in its other half, a learned variance (``out_channels`` twice the latent's).
sdtrain trains the noise half with the DDPM objective and leaves the variance half as the checkpoint has it
(untrained): the pipeline's samplers read only the noise half, as PixArt's own DPM-Solver sampling does. Prompts are
lower-cased and stripped, as the pipeline does without ``clean_caption``, which sdtrain's sampling passes as False (the
caption cleaner needs bs4 and ftfy, and training must see what sampling sees). Caption dropout encodes the empty
prompt, as the pipeline's unconditional branch does. diffusers has no image-to-image PixArt pipeline, so
``reconstruct`` is refused for it. LoRA adapters are added by peft directly (the transformer has no diffusers adapter
mixin) and saved in diffusers' transformer layout; the pipeline has no LoRA loader, so the export merges them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from transformers import T5EncoderModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import downsample_factor, load_vae

T5_TOKENS = 300  # PixArtSigmaPipeline's default max_sequence_length


@dataclass
class Components:
    """The autoencoder, T5 and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: PixArtTransformer2DModel


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and text encoder, and load the transformer from ``model.pretrained`` (or its own
    path) or build it from ``model.transformer`` (from scratch: any transformers encoder conditions it, the folder's
    T5, another one named by ``model.text_encoder.path``, or the demo's MiniLM where nothing is pretrained)."""
    m = config.model
    te = m.text_encoder
    scratch = m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)
    # the bundled MiniLM conditions a transformer built from scratch with nothing pretrained (the demo's); a new
    # transformer on a pretrained folder keeps the folder's T5
    own = te.path not in ("", "minilm") or te.subfolder is not None or (te.path == "minilm" and not m.pretrained)
    if not own and not m.pretrained:
        raise ConfigError("model.family=pixart needs model.text_encoder.path (a T5) or model.pretrained")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    t5 = not (own and scratch)  # a new transformer takes any encoder (its own max length); a pretrained one, T5
    text_encoder, tokenizer = load_text_encoder(
        path, sub, te.max_length or (T5_TOKENS if t5 else None), te.dtype, te.trust_remote_code,
        model_class=T5EncoderModel if t5 else None,
    )  # fmt: skip
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    transformer = None
    if denoiser and scratch:
        sample_size = config.data.resolution // downsample_factor(vae)
        width = hidden_size(text_encoder)
        transformer = build_transformer(m.transformer, vae.config.latent_channels, sample_size, width)
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = PixArtTransformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, text_encoder, tokenizer, transformer)


def build_transformer(
    knobs, latent_channels: int, sample_size: int, caption_channels: int
) -> PixArtTransformer2DModel:
    """A fresh PixArt transformer of ``model.transformer``'s shape over ``sample_size``-sided latents, conditioned on
    a text encoder of width ``caption_channels``: PixArt-Sigma's architecture (adaLN-single, cross-attention, 2D
    sin-cos positions), without the learned-variance half (sdtrain would not train it) or the size conditioning."""
    if sample_size % knobs.patch_size:
        raise ConfigError(f"latents of side {sample_size} do not split into {knobs.patch_size}-sided patches")
    width = knobs.num_attention_heads * knobs.attention_head_dim
    return PixArtTransformer2DModel(
        num_attention_heads=knobs.num_attention_heads,
        attention_head_dim=knobs.attention_head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=knobs.num_layers,
        dropout=knobs.dropout,
        cross_attention_dim=width,
        sample_size=sample_size,
        patch_size=knobs.patch_size,
        caption_channels=caption_channels,
        use_additional_conditions=False,
        interpolation_scale=max(sample_size // 64, 1),
    )


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``PixArtSigmaPipeline.encode_prompt`` encodes them without caption cleaning: T5's last hidden
    state and the attention mask over its tokens."""
    tokenizer = components.tokenizer
    inputs = tokenizer(
        [p.lower().strip() for p in prompts], padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, add_special_tokens=True, return_tensors="pt",
    )  # fmt: skip
    mask = inputs.attention_mask.to(device)
    states = components.text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The transformer's noise prediction (its learned-variance half left out) under ``cond``."""
    out = transformer(
        noisy, timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **cond
    ).sample
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``PixArtSigmaPipeline``."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer}


def components_of(pipe: PixArtSigmaPipeline) -> Components:
    """The components of a loaded ``PixArtSigmaPipeline``."""
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
        text_identity=lambda: {"text_encoder": model_hash(c.text_encoder), "max_length": c.tokenizer.model_max_length},
    )


def sampling_kwargs(components: Components) -> dict[str, Any]:
    """PixArt's pipeline is called with the T5 length sdtrain trained with, without caption cleaning, and at the
    size asked for (no resolution binning: sdtrain decodes the latents itself, at the size the model drew them)."""
    tokens = components.tokenizer.model_max_length
    return {"max_sequence_length": tokens, "clean_caption": False, "use_resolution_binning": False}


FAMILY = Family(
    name="pixart",
    pipeline_classes=("PixArtSigmaPipeline",),
    txt2img=PixArtSigmaPipeline,
    img2img=None,  # diffusers has no PixArt img2img pipeline: reconstruct says so
    denoiser="transformer",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    objectives=("ddpm", "flow"),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=sampling_kwargs,
    # the pipeline calls scale_model_input: the multistep solvers on flow sigmas
    flow_samplers=("dpmpp_2m", "dpmpp_2m_sde", "unipc"),
)

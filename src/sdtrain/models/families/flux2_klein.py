"""FLUX.2 [klein] (the 4 B and 9 B klein models, base and step-distilled, and their fine-tunes): a Qwen3 language model
as the text encoder, FLUX.2's 32-channel ``AutoencoderKLFlux2`` (latents normalised by the running statistics of its
batch norm over 2 x 2 patches), the ``Flux2Transformer2DModel`` (double- and single-stream blocks, four rotary axes),
trained by rectified flow matching, exported as a ``Flux2KleinPipeline``.

Conditioning, as ``Flux2KleinPipeline.encode_prompt`` builds it: each prompt in the tokenizer's chat template (a user
turn, the generation prompt, thinking off), padded to ``max_sequence_length`` tokens (the pipeline's 512 unless
``model.text_encoder.max_length`` says otherwise), the hidden states of Qwen3's layers :data:`LAYERS` stacked along
the channels; the transformer sees every token (no mask), as the pipeline gives them. Caption dropout encodes the
empty prompt, the pipeline's negative.

Latents are the autoencoder's ``B x 32 x H/8 x W/8``, normalised as the pipeline normalises them (``models/vae.py``:
patchified 2 x 2, minus the batch norm's running mean, over its deviation, unpatchified again), so the data, the
caches and the objective see them as every family's. :func:`predict` patchifies them into the pipeline's
``B x 128 x H/16 x W/16``, packs them with their (time, row, column, layer) position ids, calls the transformer at
``sigma`` (the pipeline's ``t / 1000``) and undoes the packing. The pipeline returns the autoencoder's own latents
with ``output_type="latent"``, so it decodes its samples itself (``Family.latent_output``). A step-distilled model
(``is_distilled`` in ``model_index.json``) keeps that flag in its export, and its pipeline then ignores the guidance.

LoRA adapters go on the attention projections of both streams and the single-stream blocks' fused input projection
(their output projection shares its name with the double-stream blocks' ``to_out`` list, which peft cannot adapt;
``train.lora.target_modules`` names it by block where wanted), saved in diffusers' layout (``transformer.…``, what
``Flux2KleinPipeline.load_lora_weights`` reads). Built from scratch (``model.transformer``: its ``num_layers``
double-stream and ``num_single_layers`` single-stream blocks), without a guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3ForCausalLM

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding, pipeline_index
from sdtrain.models.families.flux2 import (
    LORA_TARGETS,
    encode_references,
    frozen,
    load_autoencoder,
    load_transformer,
    max_tokens,
    pipeline_prompts,
    predict,
)
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder

TOKENS = 512  # Flux2KleinPipeline's max_sequence_length
LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers: Qwen3's hidden states it stacks


@dataclass
class Components:
    """The autoencoder, Qwen3 and its tokenizer, the transformer (only it trains), and whether the model is
    step-distilled (the pipeline's ``is_distilled``)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: Flux2Transformer2DModel
    is_distilled: bool = False


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and Qwen3, and load the transformer from ``model.pretrained`` (or its own path) or
    build it from ``model.transformer``."""
    m = config.model
    te = m.text_encoder
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError("model.family=flux2-klein needs model.text_encoder.path or model.pretrained (a FLUX.2 klein "
                          "pipeline)")  # fmt: skip
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    encoder, tokenizer = load_text_encoder(path, sub, te.max_length or TOKENS, te.dtype, te.trust_remote_code,
                                           model_class=Qwen3ForCausalLM)  # fmt: skip
    if encoder.config.num_hidden_layers < max(LAYERS):
        raise ConfigError(f"{path}: FLUX.2 klein stacks Qwen3's hidden states {LAYERS}; this encoder has "
                          f"{encoder.config.num_hidden_layers} layers")  # fmt: skip
    vae = load_autoencoder(config)
    width = len(LAYERS) * hidden_size(encoder)
    transformer = load_transformer(config, vae.config.latent_channels, width) if denoiser else None
    index = pipeline_index(m.pretrained) if m.pretrained else {}
    return Components(vae, encoder, tokenizer, transformer, bool(index.get("is_distilled", False)))


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``Flux2KleinPipeline.encode_prompt`` encodes them, by the pipeline's own function: the chat template
    (thinking off), padded to :func:`max_tokens`, Qwen3's hidden states :data:`LAYERS` side by side per token."""
    c = components
    states = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        c.text_encoder, c.tokenizer, prompts, device=device, max_sequence_length=max_tokens(c),
        hidden_states_layers=LAYERS,
    )  # fmt: skip
    return {"encoder_hidden_states": states}


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``Flux2KleinPipeline``."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer,
            "is_distilled": c.is_distilled}  # fmt: skip


def components_of(pipe: Flux2KleinPipeline) -> Components:
    """The components of a loaded ``Flux2KleinPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.transformer, bool(pipe.config.is_distilled))


def encoders(components: Components) -> Encoders:
    """The autoencoder and the prompt encoding, for the data layer."""
    c = components
    return Encoders(
        vae=c.vae,
        encode_text=fp32_encoding(encode_prompts, c, c.text_encoder.device),
        text_identity=lambda: {
            "text_encoder": model_hash(c.text_encoder),
            "max_length": max_tokens(c),
            "chat_template": c.tokenizer.chat_template,
            "layers": list(LAYERS),
        },
        encode_conditions=lambda images: encode_references(c.vae, images),
    )


FAMILY = Family(
    name="flux2-klein",
    pipeline_classes=("Flux2KleinPipeline",),
    txt2img=Flux2KleinPipeline,
    img2img=None,  # its image argument is a reference to edit from, not an image to noise (no SDEdit pipeline)
    denoiser="transformer",
    lora_targets=LORA_TARGETS,
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=lambda components: {"max_sequence_length": max_tokens(components)},
    pipeline_prompts=pipeline_prompts,
    latent_output=False,
    condition="reference",
    references_own_size=True,
    condition_required=False,
    shared_references=True,
)

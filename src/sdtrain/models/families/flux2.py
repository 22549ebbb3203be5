"""FLUX.2 [dev] (and its fine-tunes): Mistral Small 3.1 (``Mistral3ForConditionalGeneration``) as the text encoder,
FLUX.2's 32-channel ``AutoencoderKLFlux2`` (latents normalised by its batch norm's running statistics over 2 x 2
patches), the guidance-distilled ``Flux2Transformer2DModel``, trained by rectified flow matching, exported as a
``Flux2Pipeline``. FLUX.2 [klein] (``flux2_klein.py``) shares the transformer's call and the latents.

Conditioning, as ``Flux2Pipeline.encode_prompt`` builds it (its own ``_get_mistral_3_small_prompt_embeds``, called
here): each prompt after the pipeline's system message in Mistral's chat format, padded to ``max_sequence_length``
tokens (the pipeline's 512 unless ``model.text_encoder.max_length`` says otherwise), the hidden states of the
encoder's layers :data:`LAYERS` side by side per token, every token seen by the transformer. The pipeline folder's
``tokenizer`` is a ``PixtralProcessor``; its tokenizer and chat template are what text needs, so that is what loads
here (the processor itself needs torchvision, for images, which the text path does not). Caption dropout encodes the
empty prompt.

Latents and the transformer's call are FLUX.2's (:mod:`sdtrain.models.vae`, :func:`predict`): the autoencoder's
``B x 32 x H/8 x W/8`` normalised as the pipeline normalises them, patchified, packed with their (time, row, column,
layer) position ids inside :func:`predict`, the time ``sigma``. The guidance embedding trains at
:data:`TRAIN_GUIDANCE` (as for FLUX.1 dev) and samples with ``guidance_scale`` (no classifier-free guidance, as the
pipeline does). The pipeline returns the autoencoder's own latents with ``output_type="latent"``, so it decodes its
samples itself (``Family.latent_output``); it takes no negative prompt.

LoRA adapters go on the attention projections of both streams and the single-stream blocks' fused input projection
(every module one that ComfyUI's FLUX.2 mapping reads), in diffusers' layout (``Flux2Pipeline.load_lora_weights``).
Built from scratch (``model.transformer``: its ``num_layers`` double-stream and ``num_single_layers`` single-stream
blocks), without a guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3ForConditionalGeneration

from sdtrain.config import ConfigError
from sdtrain.errors import Unsupported
from sdtrain.models.families import REFERENCES, Conditioning, Encoders, Family, fp32_encoding, split_references
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import load_text_encoder
from sdtrain.models.vae import load_vae, mean_latents

TOKENS = 512  # Flux2Pipeline's max_sequence_length
LAYERS = (10, 20, 30)  # the pipeline's text_encoder_out_layers
TRAIN_GUIDANCE = 1.0  # the guidance embedding's value while training a guidance-distilled transformer (as Flux's)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "to_qkv_mlp_proj")  # fmt: skip  # a single block's to_out shares its name with a double block's list


@dataclass
class Components:
    """The autoencoder, Mistral 3 and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: Flux2Transformer2DModel


def load_autoencoder(config) -> AutoencoderKLFlux2:
    """FLUX.2's autoencoder from ``model.vae`` or ``model.pretrained`` (another kind is refused: the pipelines
    normalise and decode FLUX.2's own)."""
    m = config.model
    path, sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(path, sub, m.vae.dtype)
    if not isinstance(vae, AutoencoderKLFlux2):
        raise ConfigError(f"FLUX.2 samples with its own autoencoder (AutoencoderKLFlux2); {path} is a "
                          f"{type(vae).__name__}")  # fmt: skip
    return vae


def load_transformer(config, latent_channels: int, text_width: int) -> Flux2Transformer2DModel:
    """The transformer from ``model.pretrained`` (or its own path), or built from ``model.transformer``."""
    m = config.model
    if m.unet.from_scratch or not (m.unet.pretrained or m.pretrained):
        return build_transformer(m.transformer, latent_channels, text_width)
    source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
    return Flux2Transformer2DModel.from_pretrained(source, subfolder=sub)


def build_transformer(knobs, latent_channels: int, text_width: int) -> Flux2Transformer2DModel:
    """A fresh FLUX.2 transformer of ``model.transformer``'s shape over patchified latents (4 x the latent channels),
    its four rotary axes (time, row, column, layer) splitting the head's channels evenly as FLUX.2's 128."""
    head = knobs.attention_head_dim
    if head % 8:
        raise ConfigError(
            f"model.transformer.attention_head_dim={head}: FLUX.2's four rotary axes need a multiple of 8"
        )
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=knobs.num_layers,
        num_single_layers=knobs.num_single_layers,
        attention_head_dim=head,
        num_attention_heads=knobs.num_attention_heads,
        joint_attention_dim=text_width,
        axes_dims_rope=(head // 4,) * 4,
        guidance_embeds=False,
    )


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and Mistral 3, and load or build the transformer."""
    m = config.model
    te = m.text_encoder
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError("model.family=flux2 needs model.text_encoder.path or model.pretrained (a FLUX.2 pipeline)")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    encoder, tokenizer = load_text_encoder(path, sub, te.max_length or TOKENS, te.dtype, te.trust_remote_code,
                                           model_class=Mistral3ForConditionalGeneration)  # fmt: skip
    text = encoder.config.get_text_config()
    if text.num_hidden_layers < max(LAYERS):
        raise ConfigError(f"{path}: FLUX.2 stacks the encoder's hidden states {LAYERS}; this one has "
                          f"{text.num_hidden_layers} layers")  # fmt: skip
    if not tokenizer.chat_template:
        raise ConfigError(f"{path}: the tokenizer has no chat template (FLUX.2 encodes prompts in Mistral's chat "
                          "format); give the pipeline's tokenizer folder")  # fmt: skip
    vae = load_autoencoder(config)
    width = len(LAYERS) * text.hidden_size
    transformer = load_transformer(config, vae.config.latent_channels, width) if denoiser else None
    return Components(vae, encoder, tokenizer, transformer)


def max_tokens(components) -> int:
    """The prompt's tokens (the tokenizer's length, at most the pipeline's 512)."""
    return min(int(components.tokenizer.model_max_length), TOKENS)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``Flux2Pipeline.encode_prompt`` encodes them, by the pipeline's own function: the system message
    and the prompt in the chat format, padded to :func:`max_tokens`, the hidden states :data:`LAYERS` side by side."""
    c = components
    states = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        c.text_encoder, c.tokenizer, prompts, device=device, max_sequence_length=max_tokens(c),
        system_message=SYSTEM_MESSAGE, hidden_states_layers=LAYERS,
    )  # fmt: skip
    return {"encoder_hidden_states": states}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The velocity for noisy ``B x C x H x W`` latents at ``timesteps`` (``1000 sigma``) under ``cond``: patchified,
    packed with FLUX.2's position ids and called as its pipelines call the transformer (the guidance embedding, where
    it has one, at :data:`TRAIN_GUIDANCE`), then unpacked and unpatchified."""
    pipe = Flux2Pipeline
    b, _, h, w = noisy.shape
    cond, references = split_references(cond)
    patches = pipe._patchify_latents(noisy)
    image_ids = pipe._prepare_latent_ids(patches).to(noisy.device)
    tokens, ids = pipe._pack_latents(patches), image_ids
    if references:  # the references' tokens after the noisy ones, at time 10, 20, ... (the pipeline's ids)
        parts = [pipe._patchify_latents(r.to(noisy)) for r in references]
        reference_ids = pipe._prepare_image_ids([p[:1] for p in parts]).to(noisy.device).expand(b, -1, -1)
        tokens = torch.cat([tokens, *(pipe._pack_latents(p) for p in parts)], dim=1)
        ids = torch.cat([image_ids, reference_ids.to(image_ids.dtype)], dim=1)
    states = cond["encoder_hidden_states"]
    config = getattr(transformer, "module", transformer).config  # DDP and DeepSpeed wrap the model
    guidance = torch.full((b,), TRAIN_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
    out = transformer(
        hidden_states=tokens,
        timestep=timesteps.to(noisy.dtype) / 1000,
        guidance=guidance,
        encoder_hidden_states=states,
        txt_ids=pipe._prepare_text_ids(states).to(noisy.device),
        img_ids=ids,
        return_dict=False,
    )[0][:, : image_ids.shape[1]]
    # klein's pipeline's unpacking, which is dev's given the size (no device-to-host read of the largest id)
    unpacked = Flux2KleinPipeline._unpack_latents_with_ids(out, image_ids, h // 2, w // 2)
    return pipe._unpatchify_latents(unpacked)


REFERENCE = REFERENCES  # the conditioning keys of the references' latents, by index (``..._0``, ...)


def encode_references(vae, images: list[torch.Tensor]) -> Conditioning:
    """The reference images (one batch per data.conditions name) as the pipeline's ``_encode_vae_image`` encodes
    them: the posterior mean, normalised by the batch norm's statistics (kept in the autoencoder's shape, as the
    latents are)."""
    return {f"{REFERENCE}{i}": mean_latents(vae, image) for i, image in enumerate(images)}


def pipeline_prompts(pipe, prompts: list[str], negatives: list[str] | None) -> dict[str, Any]:
    """The prompts; FLUX.2's pipelines take no negative prompt."""
    if negatives:
        raise Unsupported(f"{type(pipe).__name__} takes no negative prompt")
    return {"prompt": prompts}


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``Flux2Pipeline``."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer}


def components_of(pipe: Flux2Pipeline) -> Components:
    """The components of a loaded ``Flux2Pipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.transformer)


def frozen(components) -> dict[str, torch.nn.Module]:
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
            "chat_template": c.tokenizer.chat_template,
            "system_message": SYSTEM_MESSAGE,
            "layers": list(LAYERS),
        },
        encode_conditions=lambda images: encode_references(c.vae, images),
    )


FAMILY = Family(
    name="flux2",
    pipeline_classes=("Flux2Pipeline",),
    txt2img=Flux2Pipeline,
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

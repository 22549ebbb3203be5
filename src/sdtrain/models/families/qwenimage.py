"""Qwen-Image (Qwen-Image and its fine-tunes): Qwen2.5-VL as the text encoder, its own 16-channel video autoencoder
``AutoencoderKLQwenImage`` (latents normalised by per-channel means and deviations), the double-stream MMDiT
``QwenImageTransformer2DModel``, trained by rectified flow matching, exported as a ``QwenImagePipeline``.

Conditioning, as ``QwenImagePipeline.encode_prompt`` builds it: each prompt in the pipeline's system template
(:data:`TEMPLATE`, "Describe the image by detailing the color, shape, ..."), the encoder's last hidden state of the
real tokens with the template's first :data:`DROP` tokens dropped, at most ``max_sequence_length`` of them (the
pipeline's 1024 unless ``model.text_encoder.max_length`` says otherwise). The pipeline pads them to the longest prompt
of its call with a mask; here they are padded to the length with the ``attention_mask`` of the real tokens (what both
caches store), and :func:`predict` hands the transformer the batch cut to its longest prompt, so the transformer sees
what the pipeline gives it. The transformer takes the latents packed in 2 x 2 patches (as Flux's), their shape for its
rotary positions, and the time ``sigma`` (the pipeline's ``t / 1000``). The empty prompt is encoded as the negative
prompt sampling guides against (:data:`NEGATIVE`, " "), so caption dropout trains that unconditional prediction.

Sampling guidance is the pipeline's ``true_cfg_scale`` (real classifier-free guidance; Qwen-Image has no guidance
embedding) against the negative prompt, " " where none is given (the pipeline's recommendation; without one it does
not guide at all).

LoRA adapters go on the attention projections of both streams, saved in diffusers' layout (``transformer.…``), which
``QwenImagePipeline.load_lora_weights`` and ComfyUI (whose Qwen-Image modules carry diffusers' names) read. Built from
scratch (``model.transformer``: ``num_layers`` blocks, ``num_attention_heads`` x ``attention_head_dim`` wide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    QwenImageImg2ImgPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, fp32_encoding
from sdtrain.models.families.flux import pack, rotary_axes, unpack
from sdtrain.models.hashing import model_hash
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.vae import latent_channels, load_vae

TOKENS = 1024  # QwenImagePipeline's max_sequence_length (and its most)
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)  # QwenImagePipeline.prompt_template_encode
DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx: the template's tokens before the prompt
NEGATIVE = " "  # the negative prompt where none is given (QwenImagePipeline's documented choice)


@dataclass
class Components:
    """The autoencoder, Qwen2.5-VL and its tokenizer, and the transformer; only ``transformer`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    transformer: QwenImageTransformer2DModel


def load_components(config, denoiser: bool = True) -> Components:
    """Load the frozen autoencoder and Qwen2.5-VL, and load the transformer from ``model.pretrained`` (or its own
    path) or build it from ``model.transformer``."""
    m = config.model
    te = m.text_encoder
    own = te.path not in ("", "minilm") or te.subfolder is not None
    if not own and not m.pretrained:
        raise ConfigError("model.family=qwenimage needs model.text_encoder.path or model.pretrained (a Qwen-Image "
                          "pipeline)")  # fmt: skip
    if te.max_length is not None and not 0 < te.max_length <= TOKENS:
        raise ConfigError(f"model.text_encoder.max_length={te.max_length}: Qwen-Image takes 1 to {TOKENS} tokens")
    path, sub = (te.path, te.subfolder) if own else (m.pretrained, "text_encoder")
    encoder, tokenizer = load_text_encoder(path, sub, te.max_length or TOKENS, te.dtype, te.trust_remote_code,
                                           model_class=Qwen2_5_VLForConditionalGeneration)  # fmt: skip
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
    if not isinstance(vae, AutoencoderKLQwenImage):
        raise ConfigError(f"model.family=qwenimage samples with Qwen-Image's autoencoder (AutoencoderKLQwenImage); "
                          f"{vae_path} is a {type(vae).__name__}")  # fmt: skip
    transformer = None
    if denoiser and (m.unet.from_scratch or not (m.unet.pretrained or m.pretrained)):
        transformer = build_transformer(m.transformer, latent_channels(vae), hidden_size(encoder))
    elif denoiser:
        source, sub = (m.unet.pretrained, m.unet.subfolder) if m.unet.pretrained else (m.pretrained, "transformer")
        transformer = QwenImageTransformer2DModel.from_pretrained(source, subfolder=sub)
    return Components(vae, encoder, tokenizer, transformer)


def build_transformer(knobs, channels: int, text_width: int) -> QwenImageTransformer2DModel:
    """A fresh Qwen-Image transformer of ``model.transformer``'s shape over packed latents (4 x the latent channels),
    its rotary axes (frame, row, column) split as Qwen-Image's 128 into 16 / 56 / 56."""
    if knobs.patch_size != 2:
        raise ConfigError("model.family=qwenimage: model.transformer.patch_size must be 2 (the pipeline's)")
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * channels,
        out_channels=channels,
        num_layers=knobs.num_layers,
        attention_head_dim=knobs.attention_head_dim,
        num_attention_heads=knobs.num_attention_heads,
        joint_attention_dim=text_width,
        guidance_embeds=False,
        axes_dims_rope=rotary_axes(knobs.attention_head_dim),
    )


def max_tokens(components: Components) -> int:
    """The prompt tokens kept after the template's (the tokenizer's length, at most the pipeline's 1024)."""
    return min(int(components.tokenizer.model_max_length), TOKENS)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Prompts as ``QwenImagePipeline.encode_prompt`` encodes them (the template, the last hidden state of the real
    tokens after the template's first :data:`DROP`), padded to :func:`max_tokens`: ``encoder_hidden_states`` and the
    ``attention_mask`` of the real tokens. The empty prompt is encoded as :data:`NEGATIVE`."""
    c, length = components, max_tokens(components)
    tokens = c.tokenizer(
        [TEMPLATE.format(p or NEGATIVE) for p in prompts], max_length=length + DROP, padding=True, truncation=True,
        return_tensors="pt",
    )  # fmt: skip  # padded to the longest, as the pipeline pads them: the encoder sees what it sees there
    real = tokens.attention_mask.to(device).bool()
    out = c.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=real, output_hidden_states=True)
    states = out.hidden_states[-1]
    padded = states.new_zeros(len(prompts), length, states.shape[-1])
    mask = torch.zeros(len(prompts), length, device=states.device, dtype=states.dtype)
    for i, (row, keep) in enumerate(zip(states, real)):
        kept = row[keep][DROP:]
        padded[i, : len(kept)], mask[i, : len(kept)] = kept, 1
    return {"encoder_hidden_states": padded, "attention_mask": mask}


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    references: list[torch.Tensor] = (),
) -> torch.Tensor:
    """The velocity for noisy ``B x C x H x W`` latents at ``timesteps`` (``1000 sigma``) under ``cond``: the
    transformer's call as the pipeline makes it (the latents packed, their shape, the prompts cut to the longest with
    their mask, none where every token is real), unpacked. ``references``: latents whose packed tokens follow the
    noisy ones, each with its own shape (Qwen-Image-Edit's reference images); the output is the noisy tokens'."""
    b, _, h, w = noisy.shape
    mask = cond["attention_mask"] > 0
    # the meta device (the memory estimate's) has no values: every token counts there
    longest = mask.shape[1] if mask.is_meta else max(int(mask.sum(1).max()), 1)
    states, mask = cond["encoder_hidden_states"][:, :longest], mask[:, :longest]
    tokens = (h // 2) * (w // 2)
    out = transformer(
        hidden_states=torch.cat([pack(noisy), *(pack(r.to(noisy)) for r in references)], dim=1),
        timestep=timesteps.to(noisy.dtype) / 1000,
        encoder_hidden_states=states,
        encoder_hidden_states_mask=mask if mask.is_meta or not bool(mask.all()) else None,
        img_shapes=[[(1, h // 2, w // 2), *((1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references)]] * b,
        return_dict=False,
    )[0]
    return unpack(out[:, :tokens], h, w)


def pipeline_latents(pipe, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """The ``B x C x H x W`` latents of what the pipeline returned with ``output_type="latent"`` (packed) for an image
    of ``height`` x ``width`` pixels (None: the pipeline's default size)."""
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    return QwenImagePipeline._unpack_latents(latents, height, width, pipe.vae_scale_factor).squeeze(2)


def pipeline_prompts(pipe, prompts: list[str], negatives: list[str] | None) -> dict[str, Any]:
    """The prompts, and the negative prompts (:data:`NEGATIVE` where none are given: the pipeline does not guide
    without one)."""
    return {"prompt": prompts, "negative_prompt": negatives or [NEGATIVE] * len(prompts)}


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``QwenImagePipeline`` and its img2img sibling."""
    c = components
    return {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "transformer": c.transformer}


def components_of(pipe: QwenImagePipeline) -> Components:
    """The components of a loaded ``QwenImagePipeline``."""
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
            "template": [TEMPLATE, DROP],
        },
    )


FAMILY = Family(
    name="qwenimage",
    pipeline_classes=("QwenImagePipeline", "QwenImageImg2ImgPipeline"),
    txt2img=QwenImagePipeline,
    img2img=QwenImageImg2ImgPipeline,
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
    sampling_kwargs=lambda components: {"max_sequence_length": max_tokens(components)},
    pipeline_latents=pipeline_latents,
    pipeline_prompts=pipeline_prompts,
    guidance="true_cfg_scale",
    unused_parameters=True,  # the last block's text stream (its query, output and feed-forward) feeds nothing
)

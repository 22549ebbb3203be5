"""Qwen-Image-Edit: Qwen-Image's transformer editing a reference image under an instruction. The reference enters
twice, as ``QwenImageEditPipeline`` gives it:

- **to the prompt's encoder**: Qwen2.5-VL reads the instruction in the edit template (:data:`TEMPLATE`, "Describe the
  key features of the input image ...") with the reference's vision tokens in the user turn, through the pipeline's
  ``Qwen2VLProcessor`` (which resizes it for the vision tower); the last hidden state of the real tokens with the
  template's first :data:`DROP` dropped is the conditioning. So a sample's prompt encoding depends on its reference:
  ``Encoders.encode_text_seeing``, which both caches and the validation set use (each sample's caption options and
  empty prompt encoded with its own reference);
- **as latents**: the reference's posterior mean, normalised by the autoencoder's per-channel statistics (the
  pipeline's ``_encode_vae_image``), packed into 2 x 2 patches after the noisy latents' tokens, its own shape in
  ``img_shapes``; the transformer's output for the noisy tokens is the velocity.

The pipeline resizes the reference to about 1024 x 1024 pixels at its own aspect for both; train with
``data.condition_resolution=1024`` (its own bucket, any aspect) to see what it sees. Everything else is Qwen-Image's
(:mod:`sdtrain.models.families.qwenimage`): the objective, true classifier-free guidance against " ", LoRA's targets.

Loads a Qwen-Image-Edit folder (``QwenImageEditPipeline``: its processor beside the tokenizer), or with
``model.family=qwenimage-edit`` a Qwen-Image folder and the processor of ``model.text_encoder.path`` (a Qwen2.5-VL
folder or hub id, whose processor files lie at its root). Exported as a ``QwenImageEditPipeline``.

The processor needs torchvision (transformers builds its video processor with it, which the edit pipelines never
call): there is no CPU build of torchvision beside this project's torch, so the tests build the processor's class
from its image processor and tokenizer without that check (``tests/conftest.py``), and every call goes through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image

from sdtrain.config import ConfigError
from sdtrain.errors import MissingPackage
from sdtrain.models.families import Conditioning, Encoders, Family, qwenimage
from sdtrain.models.hashing import model_hash
from sdtrain.models.vae import encode_moments

TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)  # QwenImageEditPipeline.prompt_template_encode
DROP = 64  # QwenImageEditPipeline.prompt_template_encode_start_idx
REFERENCE = "reference_latents"  # the conditioning key of the reference's latents


@dataclass
class Components(qwenimage.Components):
    """Qwen-Image's, and the processor that prepares the reference for Qwen2.5-VL's vision tower."""

    processor: Any = None


def load_processor(path: str, subfolder: str | None = None):
    """The pipeline's ``Qwen2VLProcessor`` from a folder or hub id."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    where = f"{path}/{subfolder}" if subfolder else path
    try:
        return Qwen2VLProcessor.from_pretrained(path, **({"subfolder": subfolder} if subfolder else {}))
    except Exception as e:
        if not is_torchvision_available():  # transformers builds the processor's video part with it
            raise MissingPackage(
                f"model.family=qwenimage-edit: Qwen2.5-VL's processor ({where}) needs torchvision, "
                "which is not installed: pip install torchvision (the build matching your torch)"
            ) from e
        if isinstance(e, (OSError, ValueError)):  # no processor files there
            raise ConfigError(f"model.family=qwenimage-edit needs Qwen2.5-VL's processor, which could not be loaded "
                              f"from {where}: {e}") from e  # fmt: skip
        raise


def load_components(config, denoiser: bool = True) -> Components:
    """Qwen-Image's components (the transformer from ``model.pretrained``, or built), and the processor: the
    pipeline's own (``processor/``), else ``model.text_encoder.path``'s."""
    m = config.model
    base = qwenimage.load_components(config, denoiser)
    if m.pretrained and (not Path(m.pretrained).is_dir() or Path(m.pretrained, "processor").is_dir()):
        processor = load_processor(m.pretrained, "processor")
    elif m.text_encoder.path not in ("", "minilm"):
        processor = load_processor(m.text_encoder.path)
    else:
        raise ConfigError("model.family=qwenimage-edit needs Qwen2.5-VL's processor: model.pretrained a "
                          "Qwen-Image-Edit folder, or model.text_encoder.path a Qwen2.5-VL folder")  # fmt: skip
    return Components(base.vae, base.text_encoder, base.tokenizer, base.transformer, processor)


def pictures(images: torch.Tensor) -> list[Image.Image]:
    """``B x 3 x H x W`` pixels in [-1, 1] (decoded from 8-bit images) as the 8-bit RGB images they came from."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def vision_tokens(components: Components, height: int, width: int) -> int:
    """How many vision tokens the processor gives a ``height`` x ``width`` reference (its patches, merged)."""
    p = components.processor.image_processor
    return p.get_number_of_image_patches(height, width) // p.merge_size**2


@torch.no_grad()
def encode_seeing(
    components: Components, texts: list[str], pictures: list[Image.Image], device: torch.device | str
) -> Conditioning:
    """Templated ``texts`` with their ``pictures`` (in the order of their vision tokens, every text's the same count
    and sizes) as the edit pipelines' ``_get_qwen_prompt_embeds`` encode them: through the processor and Qwen2.5-VL,
    the last hidden state of the real tokens after the template's first :data:`DROP`, padded to the prompt length
    (:func:`qwenimage.max_tokens`) plus each text's vision tokens, with the ``attention_mask`` of the real tokens."""
    c = components
    per_text = len(pictures) // len(texts)
    length = qwenimage.max_tokens(c) + sum(vision_tokens(c, p.height, p.width) for p in pictures[:per_text])
    inputs = c.processor(text=texts, images=pictures, padding=True, return_tensors="pt").to(device)
    out = c.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                         output_hidden_states=True)  # fmt: skip
    states, real = out.hidden_states[-1], inputs["attention_mask"].bool()
    padded = states.new_zeros(len(texts), length, states.shape[-1])
    mask = torch.zeros(len(texts), length, device=states.device, dtype=states.dtype)
    for i, (row, keep) in enumerate(zip(states, real)):
        kept = row[keep][DROP:][:length]  # a prompt longer than model.text_encoder.max_length is cut
        padded[i, : len(kept)], mask[i, : len(kept)] = kept, 1
    return {"encoder_hidden_states": padded, "attention_mask": mask}


def encode_prompts(
    components: Components, prompts: list[str], device: torch.device | str, images: list[torch.Tensor] | None = None
) -> Conditioning:
    """Prompts as ``QwenImageEditPipeline.encode_prompt`` encodes them with their references (``images``: one
    ``B x 3 x H x W`` batch in [-1, 1], a reference per prompt): the edit template with the reference's vision
    tokens (:func:`encode_seeing`). The empty prompt is encoded as the negative prompt, " "."""
    if not images or len(images) != 1:
        raise ConfigError("Qwen-Image-Edit encodes each prompt with its one reference image: data.conditions names "
                          f"{len(images or [])}")  # fmt: skip
    texts = [TEMPLATE.format(p or qwenimage.NEGATIVE) for p in prompts]
    return encode_seeing(components, texts, pictures(images[0]), device)


def normalized_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as the edit pipelines' ``_encode_vae_image`` encodes them: the posterior mode (its mean), normalised by
    the per-channel statistics (a division, as the pipelines compute it)."""
    mean = encode_moments(vae, pixels)[0]
    c = vae.config
    shift, scale = (torch.tensor(v, device=mean.device, dtype=mean.dtype).view(1, -1, 1, 1)
                    for v in (c.latents_mean, c.latents_std))  # fmt: skip
    return (mean - shift) / scale


def encode_references(vae, images: list[torch.Tensor]) -> Conditioning:
    """The reference as the pipeline's ``_encode_vae_image`` encodes it (:func:`normalized_latents`)."""
    if len(images) != 1:
        raise ConfigError(f"Qwen-Image-Edit edits one reference image; data.conditions names {len(images)}")
    return {REFERENCE: normalized_latents(vae, images[0])}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """Qwen-Image's call with the reference's packed latents after the noisy ones, as the edit pipeline calls it."""
    cond = dict(cond)
    reference = cond.pop(REFERENCE)
    return qwenimage.predict(transformer, noisy, timesteps, cond, [reference])


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``QwenImageEditPipeline``: Qwen-Image's and the processor."""
    return qwenimage.pipeline_components(components) | {"processor": components.processor}


def components_of(pipe: QwenImageEditPipeline) -> Components:
    """The components of a loaded ``QwenImageEditPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.transformer, pipe.processor)


def _text_alone(prompts: list[str]) -> Conditioning:
    raise ConfigError("Qwen-Image-Edit encodes each prompt with its reference images, never alone")


def _settings(image_processor) -> dict[str, Any]:
    """What the vision tokens depend on, as JSON holds it (the disk cache's fingerprint)."""
    names = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
    return json.loads(json.dumps({k: getattr(image_processor, k, None) for k in names}, default=str))


def edit_encoders(components: Components, encode, references, template: str) -> Encoders:
    """The autoencoder, the prompts encoded with their references (``encode``: a family's ``encode_prompts``), and
    the references' latents (``references(vae, images)``); ``template`` goes into the caches' fingerprint."""
    c = components
    device = c.text_encoder.device
    processor = c.processor.image_processor
    return Encoders(
        vae=c.vae,
        encode_text=_text_alone,
        text_identity=lambda: {
            "text_encoder": model_hash(c.text_encoder),
            "max_length": qwenimage.max_tokens(c),
            "template": [template, DROP],
            "processor": _settings(processor),
        },
        encode_conditions=lambda images: references(c.vae, images),
        encode_text_seeing=lambda texts, images: {k: v.float() for k, v in encode(c, texts, device, images).items()},
    )


def encoders(components: Components) -> Encoders:
    """The autoencoder, the prompts encoded with their reference, and the reference's latents."""
    return edit_encoders(components, encode_prompts, encode_references, TEMPLATE)


FAMILY = Family(
    name="qwenimage-edit",
    pipeline_classes=("QwenImageEditPipeline",),
    txt2img=QwenImageEditPipeline,
    img2img=None,
    denoiser="transformer",
    lora_targets=qwenimage.FAMILY.lora_targets,
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=qwenimage.frozen,
    encoders=encoders,
    sampling_kwargs=qwenimage.FAMILY.sampling_kwargs,
    pipeline_latents=qwenimage.pipeline_latents,
    pipeline_prompts=qwenimage.pipeline_prompts,
    guidance="true_cfg_scale",
    unused_parameters=True,
    condition="reference",
    references_own_size=True,
    one_prompt_per_call=True,
)

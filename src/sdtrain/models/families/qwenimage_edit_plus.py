"""Qwen-Image-Edit-Plus (Qwen-Image-Edit-2509 and later): Qwen-Image-Edit with one or more references
(``data.conditions=[ref1, ref2, ...]``), as ``QwenImageEditPlusPipeline`` gives them:

- **to the prompt's encoder**, each reference resized to about 384 x 384 pixels at its own aspect (the pipeline's
  ``CONDITION_IMAGE_SIZE``, its ``calculate_dimensions`` and Lanczos resize) and introduced as "Picture 1: ...",
  "Picture 2: ..." before the instruction in the user turn (:data:`PICTURE`), through the processor and Qwen2.5-VL
  (:func:`sdtrain.models.families.qwenimage_edit.encode_seeing`);
- **as latents**, each at the size the data gives it (the pipeline's are about 1024 x 1024 pixels at their own
  aspect: train with ``data.condition_resolution=1024``), normalised as ``_encode_vae_image`` does, their packed
  tokens after the noisy ones in order, each shape in ``img_shapes``.

The vision tower's picture is resized from the reference as it arrives (the pipeline resizes it from the image it is
given): the same pixels where the reference arrives at the pipeline's 1024-pixel size. The pipeline's ``image`` is the
call's list of references, every prompt's, and it encodes one prompt a call. The rest is Qwen-Image-Edit's
(:mod:`sdtrain.models.families.qwenimage_edit`): loading with the processor, the objective, guidance, LoRA.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
from PIL import Image

from sdtrain.config import ConfigError
from sdtrain.models.families import REFERENCES, Conditioning, Encoders, qwenimage, qwenimage_edit, split_references
from sdtrain.models.families.qwenimage_edit import Components, edit_encoders, encode_seeing, normalized_latents

TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)  # QwenImageEditPlusPipeline.prompt_template_encode
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # each reference's, before the instruction
REFERENCE = REFERENCES  # the conditioning keys of the references' latents, by index (``..._0``, ...)
_RESIZE = VaeImageProcessor()  # the pipeline's resize of a picture (Lanczos); its scale factor plays no part


def for_vision(picture: Image.Image) -> Image.Image:
    """A reference as the pipeline hands it to the vision tower: about 384 x 384 pixels at its own aspect."""
    width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, picture.width / picture.height)
    return _RESIZE.resize(picture, height, width)


@torch.no_grad()
def encode_prompts(
    components: Components, prompts: list[str], device: torch.device | str, images: list[torch.Tensor] | None = None
) -> Conditioning:
    """Prompts as ``QwenImageEditPlusPipeline.encode_prompt`` encodes them with their references (``images``: one
    ``B x 3 x H x W`` batch in [-1, 1] per data.conditions name, a row per prompt): "Picture i: " and the i-th
    reference's vision tokens before each instruction, each reference resized for the vision tower
    (:func:`for_vision`). The empty prompt is encoded as the negative prompt, " "."""
    if not images:
        raise ConfigError("Qwen-Image-Edit-Plus encodes each prompt with its reference images: name them in "
                          "data.conditions")  # fmt: skip
    lead = "".join(PICTURE.format(i + 1) for i in range(len(images)))
    texts = [TEMPLATE.format(lead + (p or qwenimage.NEGATIVE)) for p in prompts]
    per_reference = [qwenimage_edit.pictures(batch) for batch in images]
    pictures = [for_vision(per_reference[j][i]) for i in range(len(prompts)) for j in range(len(images))]
    return encode_seeing(components, texts, pictures, device)


def encode_references(vae, images: list[torch.Tensor]) -> Conditioning:
    """Each reference as the pipeline's ``_encode_vae_image`` encodes it, by its index."""
    return {f"{REFERENCE}{i}": normalized_latents(vae, image) for i, image in enumerate(images)}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """Qwen-Image's call with the references' packed latents after the noisy ones, in order."""
    return qwenimage.predict(transformer, noisy, timesteps, *split_references(cond))


def encoders(components: Components) -> Encoders:
    """The autoencoder, the prompts encoded with their references, and the references' latents."""
    return edit_encoders(components, encode_prompts, encode_references, TEMPLATE + PICTURE)


# Qwen-Image-Edit's family with several references, the call's list (every prompt's), and Edit-Plus's pipeline
FAMILY = dataclasses.replace(
    qwenimage_edit.FAMILY,
    name="qwenimage-edit-plus",
    pipeline_classes=("QwenImageEditPlusPipeline",),
    txt2img=QwenImageEditPlusPipeline,
    encode_prompts=encode_prompts,
    predict=predict,
    encoders=encoders,
    shared_references=True,
)

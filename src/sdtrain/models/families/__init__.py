"""Model families: what differs between Stable Diffusion 1.x / 2.x, SDXL, SD3, Flux, FLUX.2 (dev and klein), PixArt,
Sana, Chroma, Z-Image, Qwen-Image, Lumina 2, the edit models InstructPix2Pix and FLUX.1 Kontext, and the
ControlNets of Stable Diffusion, SDXL, SD3 and Flux, one module each.

A :class:`Family` says, declaratively, which diffusers pipeline classes it samples and exports with, which component
trains and which adapters LoRA adds, and, as functions, how its components load, how prompts become conditioning (a
dict of tensors: SD's ``encoder_hidden_states``; SDXL adds pooled embeddings and time ids) and how the denoiser is
called. Everything else (data, caches, checkpoints, EMA, precision, sharding, resume, logging) is shared and never asks
which family it runs. ``docs/families.md`` says how to add one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdtrain.errors import Unsupported

IN_MEMORY = "<in memory>"  # model.pretrained of a run whose components the Python API hands over
Conditioning = dict[str, torch.Tensor]  # keyword arguments of the denoiser beside the noisy latents and timesteps


@dataclass(frozen=True)
class Encoders:
    """What the data layer needs of a model's frozen parts: the autoencoder, and prompts -> conditioning.

    Attributes:
        vae: the frozen autoencoder (pixels <-> latents).
        encode_text: ``prompts -> Conditioning`` on the text encoders' device, in fp32, batch first.
        text_identity: what that encoding depends on, exactly (the disk cache's fingerprint holds it).
        encode_sizes: where the family conditions on each sample's geometry (SDXL's time ids),
            ``(original sizes, crop top-lefts, target size) -> Conditioning``, sizes ``(height, width)``,
            crops ``(top, left)``, one per sample; None where it does not.
        encode_conditions: where the family takes condition images (an edit model's references, a ControlNet's
            control), ``(one B x 3 x H x W batch in [-1, 1] per data.conditions name) -> Conditioning``,
            deterministic (both caches store it; zeros are the null condition); None where it takes none.
        encode_text_seeing: where the prompts' encoding reads their samples' condition images (Qwen-Image-Edit's
            vision-language encoder sees the reference), ``(prompts, one B x 3 x H x W batch in [-1, 1] per
            data.conditions name) -> Conditioning``, one prompt per sample, used instead of ``encode_text``
            wherever a sample's prompt is encoded (every stream, both caches, the validation set); None: the
            prompts alone.
    """

    vae: Any
    encode_text: Callable[[list[str]], Conditioning]
    text_identity: Callable[[], dict[str, Any]]
    encode_sizes: Callable[[list, list, tuple[int, int]], Conditioning] | None = None
    encode_conditions: Callable[[list[torch.Tensor]], Conditioning] | None = None
    encode_text_seeing: Callable[[list[str], list[torch.Tensor]], Conditioning] | None = None


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the family's name (``sd``).
        pipeline_classes: ``model_index.json`` class names of the folders this family loads (the first exports).
        txt2img: the diffusers pipeline class that samples and exports it.
        img2img: its image-to-image sibling (``reconstruct``); None where diffusers has none.
        denoiser: the name of the trained component in a pipeline folder (``unet``, ``transformer``).
        lora_targets: the denoiser's modules LoRA adapts by default.
        objectives: the objectives its pipelines sample, the default first (``("ddpm",)``; ``flow``: flow matching).
        load: ``Config -> components`` (frozen encoders and autoencoder, a built or loaded denoiser).
        encode_prompts: ``(components, prompts, device) -> Conditioning``.
        predict: ``(denoiser, noisy latents, timesteps, Conditioning) -> model output``.
        pipeline_components: ``(components, img2img) -> the keyword arguments of txt2img, or of img2img`` (without
            the scheduler).
        components_of: ``a loaded txt2img pipeline -> components``.
        frozen: ``components -> {name: frozen module}`` (the autoencoder and text encoders).
        encoders: ``components -> Encoders`` for the data layer.
        single_file: ``pipeline folder -> (tensors under the single-file names A1111 / ComfyUI load, a config to
            write beside them or None)``; None for a family without a single-file layout.
        sampling_kwargs: ``components -> what the family's pipelines are called with beside the prompts`` (SD3: the
            T5 length it trained with); None: nothing.
        flow_samplers: the names of ``sample.pipeline.FLOW_SCHEDULERS`` its pipelines can run a flow-matching model
            with (PixArt's call ``scale_model_input``, which the ``FlowMatch*`` schedulers lack).
        text_encoders: the names of its text encoders among the components (each tokenized by the tokenizer of the
            same suffix: ``text_encoder_2`` by ``tokenizer_2``), for training them; empty: they only stay frozen.
        tokenize: ``(components, prompts) -> token tensors`` (CPU, integer or mask tensors), what the data layer
            serves when the text encoders train.
        encode_tokens: ``(text encoders by name, conditioning with tokens) -> Conditioning``: the tokens replaced by
            their encoding, differentiably; ``encode_prompts`` is the two under no_grad.
        embedding_keys: by text encoder, the key of its vectors in a textual-inversion file as A1111 and ComfyUI load
            it (``emb_params``; SDXL's ``clip_l`` / ``clip_g``), in the order of ``text_encoders``.
        load_tokenizers: ``config -> {text encoder name: its tokenizer}``, loaded alone (cheap) for the pre-flight.
        pipeline_latents: ``(pipeline, latents it returned with output_type="latent", height, width) -> B x C x H x W
            latents`` where the pipeline returns them otherwise (Flux: packed); None: as they are.
        pipeline_prompts: ``(pipeline, prompts, negative prompts or None) -> the pipeline's prompt arguments`` where
            the strings alone would be encoded otherwise than the model trains (Chroma: embeddings with a boolean
            mask); None: the strings.
        guidance: the pipeline argument the sampling guidance scale goes to (``guidance_scale``; Qwen-Image's
            ``true_cfg_scale``).
        unused_parameters: the denoiser has parameters its output does not depend on (Qwen-Image's last block's
            text stream), which DDP must be told to look for.
        latent_output: whether its pipelines return the model's latents with ``output_type="latent"`` (then sdtrain
            decodes them); False: they return the autoencoder's own (FLUX.2's), and the pipeline decodes.
        comfyui_lora: ``adapters in diffusers' layout -> the same under the names ComfyUI's mapping reads``, where
            they differ (Lumina 2's ``attn`` is ComfyUI's ``attention``); None: ComfyUI reads diffusers' names.
        condition: the condition images it takes (``data.conditions``; ``generate``'s images, to its pipeline's
            ``condition_argument``): ``"reference"`` (an edit model: the image to edit), ``"control"`` (a
            ControlNet's); None: none, a text-to-image model.
        condition_argument: the pipeline argument its condition images go to (``image``; SD3's and Flux's
            ControlNet pipelines' ``control_image``).
        image_guidance: the pipeline argument of the guidance towards the reference image (InstructPix2Pix's
            ``image_guidance_scale``, ``sample.image_guidance_scale``); None: it has none.
        condition_required: whether every sample and sampling call needs its condition images (an edit model's);
            False: a model that draws from text alone too (FLUX.2, whose references are optional).
        shared_references: the pipeline's ``image`` is the list of references of the whole call, every prompt's
            (FLUX.2's), not one image per prompt.
        one_prompt_per_call: its pipeline takes one prompt a call (Qwen-Image-Edit's: it resizes a reference given
            alone for its vision tower, not one in a list; Edit-Plus's processor pairs each prompt with every
            reference), so sampling calls it once per image.
        references_own_size: its references may be of another size and aspect than the image (their tokens beside
            the image's: FLUX.1 Kontext, FLUX.2), so ``data.condition_resolution`` may size them; False: its
            condition is read pixel for pixel beside the image (channels concatenated, a ControlNet's residuals).
        base_inside: the trained model holds the frozen denoiser it steers, loaded from a folder (a ControlNet's):
            held as a LoRA run's base is (in the compute dtype), checkpoints hold the trained weights alone, and the
            export reads the base again as its files hold it.
    """

    name: str
    pipeline_classes: tuple[str, ...]
    txt2img: type
    img2img: type | None
    denoiser: str
    lora_targets: tuple[str, ...]
    objectives: tuple[str, ...]
    load: Callable[[Any], Any]
    encode_prompts: Callable[[Any, list[str], torch.device | str], Conditioning]
    predict: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    pipeline_components: Callable[..., dict[str, Any]]
    components_of: Callable[[Any], Any]
    frozen: Callable[[Any], dict[str, torch.nn.Module]]
    encoders: Callable[[Any], Encoders]
    single_file: Callable[[Path], tuple[dict[str, torch.Tensor], dict | None]] | None = None
    sampling_kwargs: Callable[[Any], dict[str, Any]] | None = None
    flow_samplers: tuple[str, ...] = ("euler", "heun")
    text_encoders: tuple[str, ...] = ()
    tokenize: Callable[[Any, list[str]], Conditioning] | None = None
    encode_tokens: Callable[[dict[str, torch.nn.Module], Conditioning], Conditioning] | None = None
    embedding_keys: tuple[str, ...] = ()
    load_tokenizers: Callable[[Any], dict[str, Any]] | None = None
    pipeline_latents: Callable[[Any, torch.Tensor, int | None, int | None], torch.Tensor] | None = None
    pipeline_prompts: Callable[[Any, list[str], list[str] | None], dict[str, Any]] | None = None
    guidance: str = "guidance_scale"
    unused_parameters: bool = False
    latent_output: bool = True
    comfyui_lora: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    condition: str | None = None
    condition_argument: str = "image"
    image_guidance: str | None = None
    condition_required: bool = True
    shared_references: bool = False
    references_own_size: bool = False
    one_prompt_per_call: bool = False
    base_inside: bool = False

    def denoiser_of(self, components) -> torch.nn.Module:
        """The trained model among ``components``."""
        return getattr(components, self.denoiser)

    def with_denoiser(self, components, model: torch.nn.Module):
        """``components`` with ``model`` as the trained model (the others shared, not copied)."""
        return dataclasses.replace(components, **{self.denoiser: model})


def fp32_encoding(
    encode_prompts: Callable[[Any, list[str], Any], Conditioning], components, device
) -> Callable[[list[str]], Conditioning]:
    """A family's prompt encoding of ``components`` on ``device``, every tensor in fp32: ``Encoders.encode_text``."""
    return lambda prompts: {k: v.float() for k, v in encode_prompts(components, prompts, device).items()}


REFERENCES = "reference_latents_"  # the conditioning keys of several references' latents, by index (``..._0``, ...)


def split_references(cond: Conditioning) -> tuple[Conditioning, list[torch.Tensor]]:
    """``cond`` without the references' latents (:data:`REFERENCES` keys), and those latents in their order."""
    keys = sorted((k for k in cond if k.startswith(REFERENCES)), key=lambda k: int(k.removeprefix(REFERENCES)))
    return {k: v for k, v in cond.items() if k not in keys}, [cond[k] for k in keys]


def families() -> dict[str, Family]:
    """Every family sdtrain trains, by name (imported here, not at package import: they import diffusers)."""
    from sdtrain.models.families import (
        chroma,
        flux,
        flux2,
        flux2_klein,
        flux_controlnet,
        flux_kontext,
        instruct_pix2pix,
        lumina2,
        pixart,
        qwenimage,
        qwenimage_edit,
        qwenimage_edit_plus,
        sana,
        sd,
        sd3,
        sd3_controlnet,
        sd_controlnet,
        sdxl,
        sdxl_controlnet,
        zimage,
    )

    modules = (sd, sdxl, sd3, flux, pixart, sana, chroma, zimage, qwenimage, flux2, flux2_klein, lumina2,
               instruct_pix2pix, flux_kontext, qwenimage_edit, qwenimage_edit_plus, sd_controlnet, sdxl_controlnet,
               sd3_controlnet, flux_controlnet)  # fmt: skip
    return {m.FAMILY.name: m.FAMILY for m in modules}


def pipeline_class_name(path: str | Path) -> str | None:
    """``_class_name`` of a pipeline folder's (or hub id's) ``model_index.json``; None where it has none."""
    return pipeline_index(path).get("_class_name")


def pipeline_index(path: str | Path) -> dict[str, Any]:
    """A pipeline folder's (or hub id's) ``model_index.json``; empty where it has none."""
    index = Path(path, "model_index.json")
    if not index.is_file() and not Path(path).exists():  # a hub id: the index is one small file
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(str(path), "model_index.json"))
        except Exception:  # offline, private, or not a pipeline: the caller decides
            return {}
    if not index.is_file():
        return {}
    return json.loads(index.read_text())


def detect(path: str | Path | None) -> Family:
    """The family of a pipeline folder or hub id, from its ``model_index.json`` (Stable Diffusion where it has none).

    Raises:
        ValueError: the folder is a pipeline of a family sdtrain does not train, naming the ones it does.
    """
    known = families()
    name = pipeline_class_name(path) if path else None
    if name is None:
        return known["sd"]
    for family in known.values():
        if name in family.pipeline_classes:
            return family
    trained = ", ".join(f"{f.name} ({' / '.join(f.pipeline_classes)})" for f in known.values())
    raise Unsupported(f"{path} is a {name} folder; sdtrain trains these families: {trained}")


def for_config(model) -> Family:
    """The family a ``ModelConfig`` trains: ``model.family`` where set, else the family of ``model.pretrained``'s
    folder, else Stable Diffusion."""
    if model.family:
        return families()[model.family]
    return detect(model.pretrained if model.pretrained and model.pretrained != IN_MEMORY else None)

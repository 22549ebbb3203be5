"""A ControlNet for SDXL: Stable Diffusion's ControlNet (:mod:`sdtrain.models.families.sd_controlnet`: a
``ControlNetModel`` beside the frozen UNet, the control image in pixels in [0, 1]) on SDXL's UNet and conditioning
(:mod:`sdtrain.models.families.sdxl`: two text encoders, pooled text and size ids, which the ControlNet reads too, as
``StableDiffusionXLControlNetPipeline`` gives them); exported as that pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLControlNetPipeline

from sdtrain.models.families import Conditioning, Encoders, Family, sdxl
from sdtrain.models.families.sd_controlnet import CONTROL, ControlledUNet, check_base, controlled, encode_controls


@dataclass
class Components:
    """SDXL's, and the ControlNet with its frozen UNet (``controlnet``, what trains)."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    controlnet: ControlledUNet

    def base(self) -> sdxl.Components:
        """SDXL's components, the frozen UNet as its UNet."""
        unet = self.controlnet.unet if self.controlnet is not None else None
        return sdxl.Components(
            self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2, unet
        )


def load_components(config, denoiser: bool = True) -> Components:
    """SDXL's frozen parts and UNet (frozen here), and the ControlNet: loaded, or made from the UNet."""
    check_base(config)
    b = sdxl.load_components(config, denoiser)
    model = controlled(config, b.unet, b.vae) if denoiser else None
    return Components(b.vae, b.text_encoder, b.text_encoder_2, b.tokenizer, b.tokenizer_2, model)


def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """SDXL's prompt encoding."""
    return sdxl.encode_prompts(components.base(), prompts, device)


def predict(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """SDXL's UNet steered by the ControlNet, both reading the pooled text and size ids."""
    added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], controlnet_cond=cond[CONTROL],
                 added_cond_kwargs=added)  # fmt: skip


def encoders(components: Components) -> Encoders:
    """SDXL's, and the control images' encoding (their pixels)."""
    return dataclasses.replace(sdxl.encoders(components.base()), encode_conditions=encode_controls)


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionXLControlNetPipeline``: SDXL's, the ControlNet apart."""
    return sdxl.pipeline_components(components.base()) | {"controlnet": components.controlnet.controlnet}


def components_of(pipe: StableDiffusionXLControlNetPipeline) -> Components:
    """The components of a loaded ``StableDiffusionXLControlNetPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                      ControlledUNet(pipe.controlnet, pipe.unet))  # fmt: skip


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under (the UNet is inside the trained model)."""
    return {
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "text_encoder_2": components.text_encoder_2,
    }


FAMILY = Family(
    name="sdxl-controlnet",
    pipeline_classes=("StableDiffusionXLControlNetPipeline",),
    txt2img=StableDiffusionXLControlNetPipeline,
    img2img=None,
    denoiser="controlnet",
    lora_targets=(),
    objectives=("ddpm",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    condition="control",
    base_inside=True,
)

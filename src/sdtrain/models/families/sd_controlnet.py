"""A ControlNet for Stable Diffusion 1.x / 2.x: a ``ControlNetModel`` trains beside the frozen UNet it steers, reading
a control image (edges, depth, a pose, a mask: ``data.conditions=[control]``) in pixels in [0, 1], as
``StableDiffusionControlNetPipeline`` prepares it; its residuals are added to the UNet's skip connections and middle
block. Text encoder, autoencoder and objective are Stable Diffusion's (:mod:`sdtrain.models.families.sd`); exported
as a ``StableDiffusionControlNetPipeline`` (the frozen UNet with the trained ControlNet), sampled by
``sdtrain generate --control IMAGE``.

What trains is :class:`ControlledUNet`, the ControlNet with the frozen UNet inside (the loop sees one denoiser; its
trainable weights, the ControlNet's, are the optimizer's and the EMA's). The ControlNet is loaded
(``model.controlnet``, or the pipeline's own) or made from the base UNet as diffusers' ``train_controlnet.py`` does:
its encoder copied, the zero convolutions at zero (so training starts from the base's own prediction), the control
image's embedding downsampling by the autoencoder's factor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, sd
from sdtrain.models.vae import downsample_factor

CONTROL = "controlnet_cond"  # the conditioning key of the control image (the pipeline's name for it)
EMBEDDING_CHANNELS = (16, 32, 96, 256)  # the control embedding's widths (diffusers' default, for a factor-8 VAE)


class Controlled(torch.nn.Module):
    """A ControlNet and the frozen denoiser it steers (its ``base``, under the attribute ``base_name``: the names
    checkpoints record its weights under), called as the family's ControlNet pipeline calls them; the ControlNets of
    every family subclass it with their ``forward``."""

    base_name = "unet"

    def __init__(self, controlnet: torch.nn.Module, base: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet
        setattr(self, self.base_name, base.requires_grad_(False))

    @property
    def base(self) -> torch.nn.Module:
        """The frozen denoiser."""
        return getattr(self, self.base_name)

    @property
    def config(self):
        """The denoiser's config: the model's shape and default size, as the pipeline reads them."""
        return self.base.config

    def __eq__(self, other) -> bool:  # the same parts: the same model (a pipeline's components come back equal)
        return type(other) is type(self) and (other.controlnet, other.base) == (self.controlnet, self.base)

    def __hash__(self) -> int:
        return hash((id(self.controlnet), id(self.base)))

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()
        self.base.enable_gradient_checkpointing()


class ControlledUNet(Controlled):
    """A ControlNet and the frozen UNet it steers, called as the pipeline calls them."""

    def forward(self, noisy, timesteps, encoder_hidden_states, controlnet_cond, **kwargs) -> torch.Tensor:
        down, middle = self.controlnet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states,
                                       controlnet_cond=controlnet_cond, return_dict=False, **kwargs)  # fmt: skip
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": middle}
        return self.unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, **residuals, **kwargs).sample


@dataclass
class Components:
    """Stable Diffusion's, and the ControlNet with its frozen UNet (``controlnet``, what trains)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    controlnet: ControlledUNet

    def base(self) -> sd.Components:
        """Stable Diffusion's components, the frozen UNet as its UNet."""
        unet = self.controlnet.unet if self.controlnet is not None else None
        return sd.Components(self.vae, self.text_encoder, self.tokenizer, unet)


def load_components(config, denoiser: bool = True) -> Components:
    """Stable Diffusion's frozen parts and UNet (frozen here), and the ControlNet: loaded, or made from the UNet."""
    check_base(config)
    base = sd.load_components(config, denoiser)
    model = controlled(config, base.unet, base.vae) if denoiser else None
    return Components(base.vae, base.text_encoder, base.tokenizer, model)


def check_base(config, denoiser: str = "UNet") -> None:
    """A ControlNet steers a trained denoiser (``denoiser``: what the family calls it): one loaded, not built.

    Raises:
        ConfigError: a denoiser built from scratch, or none named.
    """
    m = config.model
    if m.unet.from_scratch or not (m.unet.pretrained or m.pretrained):
        raise ConfigError(f"a ControlNet steers a trained {denoiser}: set model.pretrained (or "
                          "model.unet.pretrained), not model.unet.from_scratch")  # fmt: skip


def controlnet_source(config) -> tuple[str, dict[str, str]] | None:
    """Where the config's ControlNet loads from, as ``from_pretrained``'s path and keyword arguments:
    ``model.controlnet``, else ``model.pretrained``'s own (a ControlNet pipeline's subfolder); None: none, one is made
    from the base."""
    m = config.model
    if m.controlnet:
        return m.controlnet, {}
    return (m.pretrained, {"subfolder": "controlnet"}) if _has_controlnet(m.pretrained) else None


def controlled(config, unet: UNet2DConditionModel, vae) -> ControlledUNet:
    """``unet`` (frozen) with the ControlNet the config names (:func:`controlnet_source`), else one made from
    ``unet`` as diffusers makes it (the control embedding sized to ``vae``'s factor)."""
    source = controlnet_source(config)
    if source:
        controlnet = ControlNetModel.from_pretrained(source[0], **source[1])
    else:
        levels = downsample_factor(vae).bit_length()  # the control image's embedding: one level per halving, + 1
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS[:levels])
    return ControlledUNet(controlnet, unet)


def _has_controlnet(path: str | None) -> bool:
    from sdtrain.models.families import pipeline_index

    return bool(path) and "controlnet" in pipeline_index(path)


def the_control(images: list[torch.Tensor]) -> torch.Tensor:
    """The one control image batch of ``data.conditions``' batches.

    Raises:
        ConfigError: data.conditions names more than one.
    """
    if len(images) != 1:
        raise ConfigError(f"a ControlNet reads one control image; data.conditions names {len(images)}")
    return images[0]


def encode_controls(images: list[torch.Tensor]) -> Conditioning:
    """The control image as the pipeline's ``prepare_image`` gives it to the ControlNet: pixels in [0, 1]."""
    return {CONTROL: (the_control(images) + 1) / 2}


def predict(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's output steered by the ControlNet's residuals for the control image."""
    return model(noisy, timesteps, **cond)


def encoders(components: Components) -> Encoders:
    """Stable Diffusion's, and the control images' encoding (their pixels)."""
    return dataclasses.replace(sd.encoders(components.base()), encode_conditions=encode_controls)


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionControlNetPipeline``: Stable Diffusion's, the ControlNet apart."""
    return sd.pipeline_components(components.base()) | {"controlnet": components.controlnet.controlnet}


def components_of(pipe: StableDiffusionControlNetPipeline) -> Components:
    """The components of a loaded ``StableDiffusionControlNetPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, ControlledUNet(pipe.controlnet, pipe.unet))


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under (the UNet is inside the trained model)."""
    return {"vae": components.vae, "text_encoder": components.text_encoder}


FAMILY = Family(
    name="sd-controlnet",
    pipeline_classes=("StableDiffusionControlNetPipeline",),
    txt2img=StableDiffusionControlNetPipeline,
    img2img=None,
    denoiser="controlnet",
    lora_targets=(),
    objectives=("ddpm",),
    load=load_components,
    encode_prompts=sd.encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    condition="control",
    base_inside=True,
)

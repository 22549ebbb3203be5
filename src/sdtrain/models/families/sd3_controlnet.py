"""A ControlNet for Stable Diffusion 3 / 3.5: an ``SD3ControlNetModel`` trains beside the frozen MMDiT it steers,
reading the control image (``data.conditions=[control]``) as the autoencoder's latents, as
``StableDiffusion3ControlNetPipeline`` encodes it; the outputs of its blocks are added to the hidden states of the
transformer's joint blocks. Text encoders, autoencoder and objective are SD3's (:mod:`sdtrain.models.families.sd3`);
exported as a ``StableDiffusion3ControlNetPipeline``, sampled by ``sdtrain generate --control IMAGE``.

The ControlNet is loaded (``model.controlnet``, or the pipeline's own) or made from the transformer as diffusers'
``train_controlnet_sd3.py`` makes it (``SD3ControlNetModel.from_transformer``: the first ``model.controlnet_layers``
joint blocks copied, the control image's patch embedding and the output layers at zero, so training starts from the
base's own prediction). A ControlNet made here reads the pooled text and the shifted latents, as the transformer does;
InstantX's ControlNets (``force_zeros_for_pooled_projection``) read zeros for the pooled text and latents without the
shift, and SD3.5's own no text and the transformer's position embedding: each is called as the pipeline calls it.

The control latents train as the posterior mean (deterministic, so both caches hold them); the pipeline encodes a
sample of the posterior, which differs by the autoencoder's posterior deviation (small for a trained autoencoder).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3ControlNetPipeline
from diffusers.configuration_utils import FrozenDict

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, sd3
from sdtrain.models.families.sd_controlnet import CONTROL, Controlled, check_base, controlnet_source, the_control
from sdtrain.models.vae import encode_moments, scale_latents

LAYERS = 12  # the joint blocks SD3ControlNetModel.from_transformer copies by default


class ControlledTransformer(Controlled):
    """An ``SD3ControlNetModel`` and the frozen ``SD3Transformer2DModel`` it steers, called as the pipeline calls
    them."""

    base_name = "transformer"

    def __init__(self, controlnet: SD3ControlNetModel, transformer: SD3Transformer2DModel):
        super().__init__(controlnet, transformer)
        if controlnet.pos_embed is None:  # SD3.5's ControlNets: the transformer's, as the pipeline gives them
            controlnet.pos_embed = controlnet._get_pos_embed_from_transformer(transformer)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, controlnet_cond):
        c = self.controlnet.config
        pooled = torch.zeros_like(pooled_projections) if c.force_zeros_for_pooled_projection else pooled_projections
        blocks = self.controlnet(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states if c.joint_attention_dim is not None else None,
            pooled_projections=pooled,
            controlnet_cond=controlnet_cond,
            return_dict=False,
        )[0]
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            block_controlnet_hidden_states=blocks,
            return_dict=False,
        )[0]


@dataclass
class Components:
    """SD3's, and the ControlNet with its frozen transformer (``controlnet``, what trains)."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    text_encoder_3: Any
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    controlnet: ControlledTransformer

    def base(self) -> sd3.Components:
        """SD3's components, the frozen transformer as its transformer."""
        transformer = self.controlnet.transformer if self.controlnet is not None else None
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "controlnet"}
        return sd3.Components(**fields, transformer=transformer)


def load_components(config, denoiser: bool = True) -> Components:
    """SD3's frozen parts and transformer (frozen here), and the ControlNet: loaded, or made from the transformer."""
    check_base(config, "SD3 transformer")
    b = sd3.load_components(config, denoiser)
    model = controlled(config, b.transformer) if denoiser else None
    fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.name != "transformer"}
    return Components(**fields, controlnet=model)


def controlled(config, transformer: SD3Transformer2DModel) -> ControlledTransformer:
    """``transformer`` (frozen) with the ControlNet the config names, else one made from it as diffusers makes it,
    reading the pooled text as the transformer does."""
    source = controlnet_source(config)
    if source:
        return ControlledTransformer(SD3ControlNetModel.from_pretrained(source[0], **source[1]), transformer)
    # the transformer's last block reads the text without updating it, which no ControlNet block does: not copied
    copyable = transformer.config.num_layers - 1
    if copyable < 1:
        raise ConfigError("a ControlNet copies the first blocks of an SD3 transformer but its last: this one has one")
    layers = min(config.model.controlnet_layers or LAYERS, copyable)
    # from_transformer writes its settings into the config it reads: it is given a view with a config of its own
    view = copy.copy(transformer)
    view._internal_dict = FrozenDict(transformer.config)
    controlnet = SD3ControlNetModel.from_transformer(view, num_layers=layers, num_extra_conditioning_channels=0)
    controlnet.register_to_config(force_zeros_for_pooled_projection=False)
    return ControlledTransformer(controlnet, transformer)


def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """SD3's prompt encoding."""
    return sd3.encode_prompts(components.base(), prompts, device)


def predict(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity steered by the ControlNet's block outputs for the control latents."""
    return model(hidden_states=noisy, timestep=timesteps, **cond)


def encoders(components: Components) -> Encoders:
    """SD3's, and the control images' encoding: the posterior mean, shifted (unless the ControlNet is InstantX's,
    which the pipeline gives unshifted latents) and scaled."""
    vae = components.vae
    shifted = not components.controlnet.controlnet.config.force_zeros_for_pooled_projection

    def encode(images: list[torch.Tensor]) -> Conditioning:
        mean = encode_moments(vae, the_control(images))[0]
        return {CONTROL: scale_latents(vae, mean) if shifted else mean * vae.config.scaling_factor}

    encode.__qualname__ = f"encoders.encode(shifted={shifted})"  # the disk cache's fingerprint tells them apart
    return dataclasses.replace(sd3.encoders(components.base()), encode_conditions=encode)


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusion3ControlNetPipeline``: SD3's, the ControlNet apart."""
    return sd3.pipeline_components(components.base()) | {"controlnet": components.controlnet.controlnet}


def components_of(pipe: StableDiffusion3ControlNetPipeline) -> Components:
    """The components of a loaded ``StableDiffusion3ControlNetPipeline``."""
    return Components(
        pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.tokenizer, pipe.tokenizer_2,
        pipe.tokenizer_3, ControlledTransformer(pipe.controlnet, pipe.transformer),
    )  # fmt: skip


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under (the transformer is inside the trained model)."""
    return sd3.frozen(components.base())


FAMILY = Family(
    name="sd3-controlnet",
    pipeline_classes=("StableDiffusion3ControlNetPipeline",),
    txt2img=StableDiffusion3ControlNetPipeline,
    img2img=None,
    denoiser="controlnet",
    lora_targets=(),
    objectives=("flow",),
    load=load_components,
    encode_prompts=encode_prompts,
    predict=predict,
    pipeline_components=pipeline_components,
    components_of=components_of,
    frozen=frozen,
    encoders=encoders,
    sampling_kwargs=lambda components: {"max_sequence_length": components.tokenizer_3.model_max_length},
    condition="control",
    base_inside=True,
    condition_argument="control_image",
)

"""A ControlNet for FLUX.1: a ``FluxControlNetModel`` trains beside the frozen Flux transformer it steers, reading
the control image (``data.conditions=[control]``) as the autoencoder's latents packed into 2 x 2 patches, as
``FluxControlNetPipeline`` encodes it for InstantX-style ControlNets; the outputs of its double- and single-stream
blocks are added to the transformer's. Encoders, objective and guidance embedding are Flux's
(:mod:`sdtrain.models.families.flux`); exported as a ``FluxControlNetPipeline``, sampled by
``sdtrain generate --control IMAGE``.

The ControlNet is loaded (``model.controlnet``, or the pipeline's own) or made from the transformer as diffusers'
``train_controlnet_flux.py`` makes it (``FluxControlNetModel.from_transformer``: the first ``model.controlnet_layers``
double-stream and ``model.controlnet_single_layers`` single-stream blocks copied, the control input layer and the
output layers at zero, so training starts from the base's own prediction). XLabs' ControlNets (an ``input_hint_block``
reading pixels) and union ControlNets (a control mode per image) are refused: neither is what this family trains.

The control latents train as the posterior mean (deterministic, so both caches hold them); the pipeline encodes a
sample of the posterior, which differs by the autoencoder's posterior deviation (small for a trained autoencoder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline, FluxTransformer2DModel

from sdtrain.config import ConfigError
from sdtrain.models.families import Conditioning, Encoders, Family, flux
from sdtrain.models.families.sd_controlnet import CONTROL, Controlled, check_base, controlnet_source, the_control
from sdtrain.models.vae import mean_latents

LAYERS, SINGLE_LAYERS = 4, 4  # the blocks diffusers' train_controlnet_flux.py copies by default


class ControlledTransformer(Controlled):
    """A ``FluxControlNetModel`` and the frozen ``FluxTransformer2DModel`` it steers, called on packed latents as the
    pipeline calls them (each with the guidance embedding where it has one)."""

    base_name = "transformer"

    def forward(self, hidden_states, controlnet_cond, timestep, pooled_projections, encoder_hidden_states, txt_ids,
                img_ids) -> torch.Tensor:  # fmt: skip
        def guidance(model):  # the guidance embedding's input, where the model has one
            if model.config.guidance_embeds:
                return torch.full((len(hidden_states),), flux.TRAIN_GUIDANCE, device=hidden_states.device)
            return None

        common = dict(timestep=timestep, pooled_projections=pooled_projections,
                      encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids)  # fmt: skip
        blocks, single = self.controlnet(hidden_states=hidden_states, controlnet_cond=controlnet_cond,
                                         guidance=guidance(self.controlnet), return_dict=False, **common)  # fmt: skip
        return self.transformer(
            hidden_states=hidden_states, guidance=guidance(self.transformer), controlnet_block_samples=blocks,
            controlnet_single_block_samples=single, controlnet_blocks_repeat=False, return_dict=False, **common,
        )[0]  # fmt: skip


@dataclasses.dataclass
class Components:
    """Flux's, and the ControlNet with its frozen transformer (``controlnet``, what trains)."""

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    controlnet: ControlledTransformer

    def base(self) -> flux.Components:
        """Flux's components, the frozen transformer as its transformer."""
        transformer = self.controlnet.transformer if self.controlnet is not None else None
        return flux.Components(self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2,
                               transformer)  # fmt: skip


def load_components(config, denoiser: bool = True) -> Components:
    """Flux's frozen parts and transformer (frozen here), and the ControlNet: loaded, or made from the transformer."""
    check_base(config, "Flux transformer")
    b = flux.load_components(config, denoiser)
    model = controlled(config, b.transformer) if denoiser else None
    return Components(b.vae, b.text_encoder, b.text_encoder_2, b.tokenizer, b.tokenizer_2, model)


def controlled(config, transformer: FluxTransformer2DModel) -> ControlledTransformer:
    """``transformer`` (frozen) with the ControlNet the config names, else one made from it as diffusers makes it.

    Raises:
        ConfigError: a loaded ControlNet of XLabs' kind (pixels through an input hint block) or a union one.
    """
    m, c = config.model, transformer.config
    source = controlnet_source(config)
    if source:
        controlnet = FluxControlNetModel.from_pretrained(source[0], **source[1])
        if controlnet.input_hint_block is not None or controlnet.union:
            kind = "a union one" if controlnet.union else "XLabs' kind (an input hint block reading pixels)"
            raise ConfigError(f"model.controlnet: {source[0]} is a Flux ControlNet of {kind}; flux-controlnet trains "
                              "ControlNets that read the control image's latents (InstantX's kind)")  # fmt: skip
    else:
        controlnet = FluxControlNetModel.from_transformer(
            transformer,
            num_layers=min(m.controlnet_layers or LAYERS, c.num_layers),
            num_single_layers=min(SINGLE_LAYERS if m.controlnet_single_layers is None else m.controlnet_single_layers,
                                  c.num_single_layers),
            attention_head_dim=c.attention_head_dim,
            num_attention_heads=c.num_attention_heads,
        )  # fmt: skip
    return ControlledTransformer(controlnet, transformer)


def encode_prompts(components: Components, prompts: list[str], device: torch.device | str) -> Conditioning:
    """Flux's prompt encoding."""
    return flux.encode_prompts(components.base(), prompts, device)


def predict(model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The transformer's velocity for noisy ``B x C x H x W`` latents, steered by the ControlNet reading the control
    latents: both packed, at the position ids the pipeline gives, the output unpacked."""
    b, _, h, w = noisy.shape
    states = cond["encoder_hidden_states"]
    out = model(
        hidden_states=flux.pack(noisy),
        controlnet_cond=flux.pack(cond[CONTROL].to(noisy)),
        timestep=timesteps.to(noisy.dtype) / 1000,
        pooled_projections=cond["pooled_projections"],
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
    )
    return flux.unpack(out, h, w)


def encode_controls(vae, images: list[torch.Tensor]) -> Conditioning:
    """The control image as the pipeline encodes it for the ControlNet (before packing): the posterior mean, shifted
    and scaled."""
    return {CONTROL: mean_latents(vae, the_control(images))}


def encoders(components: Components) -> Encoders:
    """Flux's, and the control images' encoding."""
    vae = components.vae
    base = flux.encoders(components.base())
    return dataclasses.replace(base, encode_conditions=lambda images: encode_controls(vae, images))


def pipeline_components(components: Components, img2img: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``FluxControlNetPipeline``: Flux's, the ControlNet apart."""
    return flux.pipeline_components(components.base()) | {"controlnet": components.controlnet.controlnet}


def components_of(pipe: FluxControlNetPipeline) -> Components:
    """The components of a loaded ``FluxControlNetPipeline``."""
    return Components(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                      ControlledTransformer(pipe.controlnet, pipe.transformer))  # fmt: skip


def frozen(components: Components) -> dict[str, torch.nn.Module]:
    """The frozen modules, by the name checkpoints record them under (the transformer is inside the trained model)."""
    return flux.frozen(components.base())


FAMILY = Family(
    name="flux-controlnet",
    pipeline_classes=("FluxControlNetPipeline",),
    txt2img=FluxControlNetPipeline,
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
    sampling_kwargs=lambda components: {"max_sequence_length": components.tokenizer_2.model_max_length},
    pipeline_latents=flux.pipeline_latents,
    condition="control",
    base_inside=True,
    condition_argument="control_image",
)

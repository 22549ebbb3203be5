"""Single-file Stable Diffusion checkpoints: the original LDM layout that A1111, ComfyUI and most model sites use,
for Stable Diffusion 1.x / 2.x and for SDXL (Stability's generative-models layout, ``sdxl_tensors``).

``save_single_file`` writes a diffusers pipeline folder (our exports) as one ``.safetensors`` file with the LDM key
names: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), and the text encoder as SD 1.x files hold
it (``cond_stage_model.transformer.*``, OpenAI's CLIP) or as SD 2.x files do (``cond_stage_model.model.*``,
OpenCLIP). ``load_single_file`` reads such a file back into a diffusers pipeline through diffusers' own
``from_single_file``, with the component configs taken from a diffusers folder or hub id (the file holds weights
only). Our direction is the inverse of diffusers' ``convert_ldm_*_checkpoint`` / ``convert_open_clip_checkpoint``;
the tests check that diffusers maps every exported tensor back to the one it came from. Beside the file goes the
original LDM config (``MODEL.yaml``: architecture, scaling factor, betas, parameterization), which A1111 reads.

An SDXL file holds the UNet and the VAE under the same names (the UNet's ``text_time`` embedding as ``label_emb``),
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L in transformers' names) and ``conditioner.embedders.1.model.*``
(OpenCLIP ViT-bigG in open_clip's names, q / k / v fused, ``text_projection`` as open_clip holds it); no config goes
beside it (A1111 and ComfyUI recognise SDXL by its keys).

What the LDM layout cannot hold is refused rather than dropped: UNet blocks other than SD's (cross-attention / plain
down and up blocks, a cross-attention mid block), extra embeddings (sdtrain's ``text_time_embedding``, class
embeddings; SDXL's ``text_time`` has its place), per-level ``layers_per_block``, VQ autoencoders, and text encoders
other than CLIP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from sdtrain.errors import UserError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI's CLIP ViT-L/14, in transformers' names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14, in open_clip's names
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L/14, in transformers' names
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG/14, in open_clip's names
SD_SCALING_FACTOR = 0.18215  # what SD 1.x single-file loaders assume when no config says otherwise
SDXL_SCALING_FACTOR = 0.13025  # and SDXL's

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UNetMidBlock2DCrossAttn"}
_VAE_FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


class SingleFileError(UserError, ValueError):
    """The model has something the single-file (LDM) layout has no place for."""


def _prefixed(diffusers: str, ldm: str, renames: dict[str, str] = _VAE_RESNET) -> dict[str, str]:
    """The names of one residual block's layers under both prefixes."""
    return {f"{diffusers}.{d}": f"{ldm}.{m}" for d, m in renames.items()}


def _rename(state_dict: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename every key by the longest mapping entry that is a whole-component prefix of it; unmatched keys raise."""
    out = {}
    for key, value in state_dict.items():
        matches = [p for p in mapping if key == p or key.startswith(p + ".")]
        if not matches:
            raise SingleFileError(f"no single-file name for the weight {key!r}")
        prefix = max(matches, key=len)
        out[mapping[prefix] + key[len(prefix) :]] = value
    return out


def unet_ldm_names(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a UNet2DConditionModel with SD's block layout."""
    blocks = [*config["down_block_types"], *config["up_block_types"], config.get("mid_block_type")]
    unsupported = sorted({str(b) for b in blocks if b not in _UNET_BLOCKS})
    if unsupported:
        raise SingleFileError(f"UNet blocks {unsupported} have no single-file (LDM) layout")
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type", "time_embedding_type"):
        if config.get(key) not in (None, "positional") and (key, config.get(key)) != (
            "addition_embed_type",
            "text_time",
        ):
            raise SingleFileError(f"UNet {key}={config[key]!r} has no single-file (LDM) layout")
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise SingleFileError("per-level layers_per_block has no single-file (LDM) layout")
    levels = len(config["down_block_types"])
    names = dict(_UNET_FIXED)
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text + size ids
        names |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for level, kind in enumerate(config["down_block_types"]):
        for layer in range(per_level):
            slot = 1 + level * (per_level + 1) + layer
            names |= _prefixed(f"down_blocks.{level}.resnets.{layer}", f"input_blocks.{slot}.0", _UNET_RESNET)
            if kind.startswith("CrossAttn"):
                names[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{slot}.1"
        if level < levels - 1:  # the downsampler takes the slot after the level's layers
            slot = 1 + level * (per_level + 1) + per_level
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{slot}.0.op"
    names |= _prefixed("mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    names["mid_block.attentions.0"] = "middle_block.1"
    names |= _prefixed("mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    for level, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for layer in range(per_level + 1):
            slot = level * (per_level + 1) + layer
            names |= _prefixed(f"up_blocks.{level}.resnets.{layer}", f"output_blocks.{slot}.0", _UNET_RESNET)
            if attention:
                names[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{slot}.1"
        if level < levels - 1:  # the upsampler sits in the level's last slot, after its attention if any
            slot = level * (per_level + 1) + per_level
            names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{slot}.{2 if attention else 1}.conv"
    return names


def vae_ldm_names(config: dict[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for an AutoencoderKL."""
    levels = len(config["down_block_types"])
    per_level = config["layers_per_block"]
    names = dict(_VAE_FIXED)
    for level in range(levels):
        for layer in range(per_level):
            names |= _prefixed(f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}")
        names[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        ldm_level = levels - 1 - level  # the decoder's up levels are numbered from the bottom in LDM
        for layer in range(per_level + 1):
            names |= _prefixed(f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{ldm_level}.block.{layer}")
        names[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
    for part in ("encoder", "decoder"):
        for i in range(2):
            names |= _prefixed(f"{part}.mid_block.resnets.{i}", f"{part}.mid.block_{i + 1}")
        for d, m in _VAE_ATTENTION.items():
            names[f"{part}.mid_block.attentions.0.{d}"] = f"{part}.mid.attn_1.{m}"
    return names


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict under single-file names (``model.diffusion_model.*``)."""
    renamed = _rename(state_dict, unet_ldm_names(config))
    return {UNET_PREFIX + k: v for k, v in renamed.items()}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict under single-file names; the mid-block attention's linear weights become the
    1 x 1 convolutions of the LDM layout."""
    out = {}
    for key, value in _rename(state_dict, vae_ldm_names(config)).items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + key] = value
    return out


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str = TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under SD 1.x single-file names (``cond_stage_model.transformer.text_model.*``, or
    SDXL's first encoder under ``prefix``); transformers >= 5.6 drops the ``text_model.`` level from its own names."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def is_open_clip(config: Any) -> bool:
    """SD 2.x's text encoder: OpenCLIP's ViT-H/14 converted to a CLIPTextModel, whose activation is gelu where
    OpenAI's CLIP (SD 1.x) uses quick_gelu."""
    return getattr(config, "hidden_act", None) == "gelu"


def open_clip_text_to_ldm(
    state_dict: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """A CLIPTextModel converted from OpenCLIP (SD 2.x; SDXL's second encoder under ``prefix``, a
    CLIPTextModelWithProjection) under open_clip's names, the attention's q, k, v fused into ``in_proj``, the
    projection as open_clip's ``text_projection`` matrix (the transpose of the linear layer's weight); the inverse
    of diffusers' ``convert_open_clip_checkpoint``.

    SD 2.x reads the penultimate layer, so diffusers' text encoder holds one layer fewer than the original file (23
    of 24) and no ``text_projection``: A1111 and ComfyUI load such files (the missing last layer is never used)."""
    weights = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out = {theirs: weights.pop(ours) for ours, theirs in _OPEN_CLIP_FIXED.items()}
    if "text_projection.weight" in weights:
        out["text_projection"] = weights.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers.")})
    for i in layers:
        ours, theirs = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [weights.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(qkv)
            for name, ldm in _OPEN_CLIP_LAYER.items():
                out[f"{theirs}{ldm}.{kind}"] = weights.pop(f"{ours}{name}.{kind}")
    if weights:
        raise SingleFileError(f"no OpenCLIP name for the text encoder's weights {sorted(weights)[:3]}")
    return {prefix + k: v for k, v in out.items()}


_LDM_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}


def ldm_config(unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any], open_clip: bool) -> dict:
    """The original LDM config (``v1-inference.yaml``'s form) describing a pipeline: A1111 reads it from
    ``MODEL.yaml`` beside ``MODEL.safetensors`` and builds that architecture, scaling factor and parameterization
    instead of SD 1.5's; diffusers' ``from_single_file(original_config=...)`` reads it too.

    Raises:
        SingleFileError: what the LDM config cannot say (per-level head widths that are neither one head count nor
            one head width, a beta schedule LDM does not have).
    """
    channels = list(unet["block_out_channels"])
    heads = unet["attention_head_dim"]  # diffusers' name for the number of heads per level
    unet_params: dict[str, Any] = {
        "image_size": unet["sample_size"],
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": channels[0],
        # LDM lists the downsampling factors at which the levels attend
        "attention_resolutions": [2**i for i, k in enumerate(unet["down_block_types"]) if k.startswith("CrossAttn")],
        "num_res_blocks": unet["layers_per_block"],
        "channel_mult": [c // channels[0] for c in channels],
        "use_spatial_transformer": True,
        "transformer_depth": unet.get("transformer_layers_per_block") or 1,
        "context_dim": unet["cross_attention_dim"],
        "use_linear_in_transformer": bool(unet.get("use_linear_projection")),
        "use_checkpoint": False,
        "legacy": False,
    }
    if isinstance(heads, int):
        unet_params["num_heads"] = heads
    elif len({c // h for c, h in zip(channels, heads)}) == 1:
        unet_params["num_head_channels"] = channels[0] // heads[0]
    else:
        raise SingleFileError(f"attention_head_dim={heads} is neither one head count nor one head width")
    vae_channels = list(vae["block_out_channels"])
    ddconfig = {
        "double_z": True,
        "z_channels": vae["latent_channels"],
        "resolution": vae.get("sample_size", 256),
        "in_channels": vae["in_channels"],
        "out_ch": vae["out_channels"],
        "ch": vae_channels[0],
        "ch_mult": [c // vae_channels[0] for c in vae_channels],
        "num_res_blocks": vae["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    schedule = scheduler.get("beta_schedule", "scaled_linear")
    if schedule not in _LDM_BETA_SCHEDULES:
        raise SingleFileError(f"beta_schedule={schedule!r} has no LDM name")
    params: dict[str, Any] = {
        "linear_start": scheduler.get("beta_start", 0.00085),
        "linear_end": scheduler.get("beta_end", 0.012),
        "beta_schedule": _LDM_BETA_SCHEDULES[schedule],
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": scheduler.get("num_train_timesteps", 1000),
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": unet["sample_size"],
        "channels": unet["in_channels"],
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": vae.get("scaling_factor", SD_SCALING_FACTOR),
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": vae["latent_channels"],
                "monitor": "val/rec_loss",
                "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": (
            {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"},
            }
            if open_clip
            else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
        ),
    }
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        params["parameterization"] = {"v_prediction": "v", "sample": "x0"}[prediction]
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def _unet_and_vae(model: Path) -> tuple[Any, Any]:
    """A pipeline folder's UNet and AutoencoderKL (a VQModel has no single-file layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae_config = AutoencoderKL.load_config(model, subfolder="vae")
    if vae_config.get("_class_name") != "AutoencoderKL":
        raise SingleFileError(f"the single-file layout holds an AutoencoderKL, not a {vae_config.get('_class_name')}")
    return unet, AutoencoderKL.from_pretrained(model, subfolder="vae")


def sd_tensors(model: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A Stable Diffusion 1.x / 2.x pipeline folder's weights under single-file names, and its LDM config (None
    where the config cannot say what the model is; the weights still go into the file)."""
    from transformers import CLIPTextModel

    unet, vae = _unet_and_vae(model)
    kind = _text_encoder_class(model)
    if kind != "CLIPTextModel":
        raise SingleFileError(f"the single-file layout holds a CLIPTextModel, this model's encoder is a {kind}")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_to_ldm = open_clip_text_to_ldm if is_open_clip(text_encoder.config) else text_encoder_to_ldm
    tensors = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
        **text_to_ldm(text_encoder.state_dict()),
    }
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    try:
        config = ldm_config(dict(unet.config), dict(vae.config), scheduler, is_open_clip(text_encoder.config))
    except SingleFileError as e:  # the weights still go into the file; A1111 then assumes SD's config
        logger.warning("no .yaml beside the file: %s", e)
        config = None
    return tensors, config


def sdxl_tensors(model: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """An SDXL pipeline folder's weights under generative-models' single-file names (no config: SDXL is
    recognised by its keys)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet, vae = _unet_and_vae(model)
    first = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    second = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    tensors = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
        **text_encoder_to_ldm(first.state_dict(), SDXL_TEXT_PREFIX),
        **open_clip_text_to_ldm(second.state_dict(), SDXL_OPEN_CLIP_PREFIX),
    }
    return tensors, None


def save_single_file(model: str | Path, out_file: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the pipeline folder ``model`` as one single-file checkpoint (``.safetensors``) in its family's layout,
    and beside it, for Stable Diffusion 1.x / 2.x, the LDM config (``.yaml``, see :func:`ldm_config`).

    Args:
        model: a diffusers pipeline folder (an sdtrain export) of a family that has a single-file layout.
        out_file: the ``.safetensors`` file to write.
        dtype: cast floating-point weights (``torch.float16`` halves the file); None keeps them as saved.
    """
    from safetensors.torch import save_file

    from sdtrain.models.families import detect

    model, out_file = Path(model), Path(out_file)
    if out_file.suffix != ".safetensors":
        raise SingleFileError(f"{out_file}: single files are written as .safetensors")
    family = detect(model)
    if family.single_file is None:
        raise SingleFileError(f"{model} is a {family.name} model, which has no single-file layout here")
    tensors, config = family.single_file(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    vae = json.loads((model / "vae" / "config.json").read_text())
    expected = SD_SCALING_FACTOR if family.name == "sd" else SDXL_SCALING_FACTOR
    if abs(vae.get("scaling_factor", expected) - expected) > 1e-6:
        logger.warning(
            "the VAE's scaling factor is %.5f, the family's is %.5f: A1111 reads it from a .yaml beside the file; "
            "loaders that ignore it (ComfyUI's default checkpoint loader) will decode wrongly",
            vae.get("scaling_factor"),
            expected,
        )
    if scheduler.get("rescale_betas_zero_snr"):
        logger.warning(
            "the model was trained with zero-terminal-SNR betas: no config field says so (A1111 has a setting for "
            "it, ComfyUI a ModelSamplingDiscrete node); sample it with that on"
        )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_file, metadata={"format": "pt"})
    if config is not None:
        with open(out_file.with_suffix(".yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    return out_file


def _text_encoder_class(model: Path) -> str:
    """The transformers class name a pipeline folder's text encoder was saved as."""
    index = json.loads((model / "model_index.json").read_text())
    return index.get("text_encoder", [None, "none"])[1]


def load_single_file(file: str | Path, config: str | Path, local_files_only: bool | None = None):
    """Load a single-file checkpoint as a diffusers pipeline of the family ``config`` is (StableDiffusionPipeline,
    StableDiffusionXLPipeline).

    Args:
        file: the ``.safetensors`` / ``.ckpt`` file.
        config: a diffusers pipeline folder or hub id whose component configs describe the file (for SD 1.5,
            ``stable-diffusion-v1-5/stable-diffusion-v1-5``; for an sdtrain export, the exported folder).
        local_files_only: never reach the hub (default: True when ``config`` is a local folder).
    """
    from sdtrain.models.families import detect

    if local_files_only is None:
        local_files_only = Path(config).is_dir()
    family = detect(config)
    extra = {"safety_checker": None} if family.name == "sd" else {}
    return family.txt2img.from_single_file(str(file), config=str(config), local_files_only=local_files_only, **extra)


def convert(source: str | Path, out: str | Path, config: str | Path | None = None, half: bool = False) -> Path:
    """Either direction: a pipeline folder becomes a single file, a single file becomes a pipeline folder.

    Args:
        source: a diffusers pipeline folder, or a ``.safetensors`` / ``.ckpt`` single file.
        out: the file (from a folder) or folder (from a file) to write.
        config: for a single file, the pipeline folder or hub id describing it (see ``load_single_file``).
        half: write fp16 weights (a folder from a single file is otherwise fp32, whatever the file held).
    """
    source, out = Path(source), Path(out)
    if source.is_dir():
        return save_single_file(source, out, torch.float16 if half else None)
    if not source.is_file():
        raise SingleFileError(f"{source}: no such file or folder")
    if config is None:
        raise SingleFileError(f"{source}: a single file holds weights only: pass --config, the pipeline folder or hub "
                              "id it was made from (its component configs)")  # fmt: skip
    try:
        pipe = load_single_file(source, config)
    except (OSError, ValueError, RuntimeError) as e:  # safetensors' and torch's errors for a damaged file among them
        if isinstance(e, UserError):
            raise
        raise SingleFileError(
            f"{source}: cannot be read as a checkpoint of {config} ({' '.join(str(e).split())})"
        ) from e
    if half:
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    return out

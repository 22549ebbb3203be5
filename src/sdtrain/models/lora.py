"""LoRA adapters on the UNet through peft, saved the way plain diffusers' ``load_lora_weights`` reads them."""

from __future__ import annotations

import copy
from pathlib import Path

from sdtrain.config import LoRAConfig

LORA_FOLDER = "lora"  # inside an export: final/lora/pytorch_lora_weights.safetensors
KOHYA_FILE = "lora_kohya.safetensors"  # beside it: the same adapters for A1111 / ComfyUI


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("train.lora.rank > 0 needs peft: pip install 'sdtrain[lora]' (or pip install peft)") from e
    return peft


def add_lora(unet, config: LoRAConfig, default_targets: tuple[str, ...] = ()) -> None:
    """Freeze the denoiser and add trainable adapters (fp32, Gaussian A, zero B: the model starts unchanged) on
    ``config.target_modules``, or where unset on ``default_targets`` (the model family's)."""
    peft = _peft()
    if not hasattr(unet, "add_adapter"):
        raise ValueError(
            f"train.lora.rank: diffusers' {type(unet).__name__} takes no adapters (no PeftAdapterMixin); train it "
            "fully (train.lora.rank=0)"
        )
    unet.requires_grad_(False)
    unet.add_adapter(
        peft.LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha if config.alpha is not None else config.rank,
            lora_dropout=config.dropout,
            init_lora_weights="gaussian",
            target_modules=list(config.target_modules if config.target_modules is not None else default_targets),
        )
    )


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet, out_dir: str | Path, pipeline_class=None, denoiser: str = "unet") -> Path:
    """Write the adapters twice: ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' format (keys
    ``unet.…lora_A/B``) and ``out_dir/lora_kohya.safetensors`` in kohya-ss' layout, which A1111, ComfyUI and model
    sites load (``lora_unet_….lora_down / lora_up / alpha``).

    ``denoiser`` is the family's name of the adapted model (``unet``, ``transformer``; only a UNet's adapters get
    the kohya file). ``pipeline_class`` is the family's diffusers pipeline, whose ``save_lora_weights`` writes the
    first file (default ``StableDiffusionPipeline``). Neither file carries our alpha (diffusers' holds none, its
    kohya converter writes alpha = rank), so loaders scale the update by 1: the alpha / rank scale is folded into
    every up (B) matrix and both apply the update that trained.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft = _peft()
    config = unet.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = {k: v * scale if "lora_B" in k else v for k, v in peft.get_peft_model_state_dict(unet).items()}
    # a UNet's adapters in diffusers' own (lora.down / lora.up) names, as its examples save them; a transformer's in
    # peft's, as diffusers' SD3 / Flux examples save them (its loaders read nothing else for every module)
    layers = {f"{denoiser}_lora_layers": convert_state_dict_to_diffusers(state) if denoiser == "unet" else state}
    (pipeline_class or StableDiffusionPipeline).save_lora_weights(out_dir, **layers, safe_serialization=True)
    if denoiser == "unet":  # a transformer's LoRA goes in diffusers' layout, which ComfyUI reads for them
        kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
        save_file({k: v.contiguous() for k, v in kohya.items()}, Path(out_dir) / KOHYA_FILE)
    return Path(out_dir)


def merged_copy(unet):
    """A plain UNet (no peft layers) whose weights are base + adapter update, for a standalone export."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged

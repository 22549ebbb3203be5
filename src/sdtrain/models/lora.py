"""LoRA adapters on the UNet through peft, saved the way plain diffusers' ``load_lora_weights`` reads them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sdtrain.config import LoRAConfig

LORA_FOLDER = "lora"  # inside an export: final/lora/pytorch_lora_weights.safetensors
KOHYA_FILE = "lora_kohya.safetensors"  # beside it: the same adapters for A1111 / ComfyUI


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("train.lora.rank > 0 needs peft: pip install 'sdtrain[lora]' (or pip install peft)") from e
    return peft


def add_lora(unet, config: LoRAConfig) -> None:
    """Freeze the UNet and add trainable adapters (fp32, Gaussian A, zero B: the model starts unchanged)."""
    peft = _peft()
    unet.requires_grad_(False)
    unet.add_adapter(
        peft.LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha if config.alpha is not None else config.rank,
            lora_dropout=config.dropout,
            init_lora_weights="gaussian",
            target_modules=list(config.target_modules),
        )
    )


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet, out_dir: str | Path) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' format (keys ``unet.…lora_A/B``).

    The file holds no alpha, and loaders then scale the update by 1 (alpha = rank): the alpha / rank scale is folded
    into every up (B) matrix, so ``load_lora_weights`` (and any loader that defaults alpha to the rank) applies the
    update that trained.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    peft = _peft()
    config = unet.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = peft.get_peft_model_state_dict(unet)
    state = {k: v * scale if "lora_B" in k else v for k, v in state.items()}
    layers = convert_state_dict_to_diffusers(state)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    save_kohya_lora(peft.get_peft_model_state_dict(unet), config.lora_alpha, Path(out_dir) / KOHYA_FILE)
    return Path(out_dir)


def save_kohya_lora(peft_state: dict, alpha: float, out_file: Path) -> Path:
    """The same adapters as one file in kohya-ss' SD 1.x layout, which A1111, ComfyUI and model sites load:
    ``lora_unet_<module path with _>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha`` (the loader
    scales the update by alpha / rank)."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in peft_state.items():  # "down_blocks.0.….to_q.lora_A.weight"
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, out_file, metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha)})
    return out_file


def merged_copy(unet):
    """A plain UNet (no peft layers) whose weights are base + adapter update, for a standalone export."""
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    return merged

"""LoRA adapters on the UNet through peft, saved the way plain diffusers' ``load_lora_weights`` reads them."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch

from sdtrain.config import LoRAConfig
from sdtrain.errors import MissingPackage

LORA_FOLDER = "lora"  # inside an export: final/lora/pytorch_lora_weights.safetensors
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' format, which load_lora_weights reads
KOHYA_FILE = "lora_kohya.safetensors"  # beside it: the same adapters for A1111 / ComfyUI
COMFYUI_FILE = "lora_comfyui.safetensors"  # a family whose ComfyUI names differ from diffusers' (Lumina 2)
ADAPTER_PARAMS = ("lora_", "hada_", "lokr_")  # peft's parameter names of LoRA / DoRA, LoHa and LoKr


def _peft():
    try:
        import peft
    except ImportError as e:
        raise MissingPackage("train.lora.rank > 0 needs peft: pip install 'sdtrain[lora]' (or peft)") from e
    return peft


def add_lora(unet, config: LoRAConfig, default_targets: tuple[str, ...] = ()) -> None:
    """Freeze the denoiser and add trainable adapters (fp32, Gaussian A, zero B: the model starts unchanged) on
    ``config.target_modules``, or where unset on ``default_targets`` (the model family's). A diffusers model without
    its adapter mixin (PixArt's transformer) gets them from peft directly, as the text encoders do."""
    peft = _peft()
    unet.requires_grad_(False)
    lora = _adapter_config(peft, config, list(config.target_modules or default_targets))
    with warnings.catch_warnings():  # peft warns that a torchao layer cannot merge: the export never merges into one
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        if hasattr(unet, "add_adapter"):
            unet.add_adapter(lora)
        else:
            peft.inject_adapter_in_model(lora, unet, adapter_name="default")
            unet.peft_config = {"default": lora}
    for parameter in unet.parameters():
        if parameter.requires_grad:  # peft makes them in the base's dtype: fp32 masters over a bf16 / quantised base
            parameter.data = parameter.data.float()


def _adapter_config(peft, config: LoRAConfig, targets: list[str]):
    """peft's config of ``train.lora``: LoRA (DoRA with ``variant=dora``), or LyCORIS' LoHa / LoKr (peft's ports:
    the update is ``(w1_a w1_b) * (w2_a w2_b)``, a Hadamard product of two low-rank matrices, or ``kron(w1, w2)``;
    both start at zero)."""
    alpha = config.alpha if config.alpha is not None else config.rank
    if config.variant == "loha":
        return peft.LoHaConfig(r=config.rank, alpha=alpha, target_modules=targets)
    if config.variant == "lokr":
        return peft.LoKrConfig(r=config.rank, alpha=alpha, target_modules=targets)
    return peft.LoraConfig(r=config.rank, lora_alpha=alpha, lora_dropout=config.dropout, init_lora_weights="gaussian",
                           target_modules=targets, use_dora=config.variant == "dora")  # fmt: skip


def _scale(config) -> float:
    """The update's alpha / rank of a peft adapter config (LoRA's ``lora_alpha``, LoHa's and LoKr's ``alpha``)."""
    return (config.lora_alpha if hasattr(config, "lora_alpha") else config.alpha) / config.r


def add_text_lora(text_encoder, config) -> None:
    """Freeze a transformers text encoder and add trainable adapters on ``config.target_modules``
    (``train.text_encoder``), initialised as :func:`add_lora` does. peft injects them directly (transformers' own
    integration asks for a newer peft than diffusers does), and the model keeps their config as ``peft_config``, as a
    diffusers model does."""
    peft = _peft()
    text_encoder.requires_grad_(False)
    lora = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha if config.alpha is not None else config.rank,
        init_lora_weights="gaussian",
        target_modules=list(config.target_modules),
    )
    peft.inject_adapter_in_model(lora, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": lora}


def has_lora(module) -> bool:
    return bool(getattr(module, "peft_config", None))


def save_lora(
    modules: dict, out_dir: str | Path, pipeline_class=None, denoiser: str = "unet", comfyui_names=None
) -> Path:
    """Write the adapters of ``modules`` (by component name: the denoiser, and ``text_encoder`` / ``text_encoder_2``
    where they trained) twice: ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' format (keys
    ``unet.…lora_A/B``, ``text_encoder.…``) and, for a UNet, ``out_dir/lora_kohya.safetensors`` in kohya-ss' layout,
    which A1111, ComfyUI and model sites load (``lora_unet_…``, ``lora_te1_…``, ``lora_te2_…`` with
    ``lora_down / lora_up / alpha``). DoRA adapters (``train.lora.variant=dora``: a trained magnitude per output row)
    get the first file alone.

    ``denoiser`` is the family's name of the adapted model (``unet``, ``transformer``; only a UNet's adapters get
    the kohya file). ``pipeline_class`` is the family's diffusers pipeline, whose ``save_lora_weights`` writes the
    first file (default ``StableDiffusionPipeline``). Neither file carries our alpha (diffusers' holds none, its
    kohya converter writes alpha = rank), so loaders scale the update by 1: the alpha / rank scale is folded into
    every up (B) matrix and both apply the update that trained.

    ``comfyui_names``: the family's ``comfyui_lora``, where ComfyUI reads a transformer's adapters under other names
    than diffusers' (Lumina 2): the first file's adapters (or a LoHa / LoKr run's LyCORIS file) renamed by it are
    written as ``out_dir/lora_comfyui.safetensors``.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft = _peft()
    configs = {name: module.peft_config["default"] for name, module in modules.items()}
    if not isinstance(configs[denoiser], peft.LoraConfig):
        out = _save_lycoris(modules[denoiser], configs[denoiser], out_dir, denoiser)
        _save_renamed(out / KOHYA_FILE, comfyui_names)
        return out
    states = {}
    for name, module in modules.items():
        scale = _scale(configs[name])
        states[name] = {
            k: v * scale if "lora_B" in k else v for k, v in peft.get_peft_model_state_dict(module).items()
        }
    # a UNet's and the text encoders' adapters in diffusers' own (lora.down / lora.up) names, as its examples save
    # them; a transformer's in peft's, as diffusers' SD3 / Flux examples save them (its loaders read nothing else)
    peft_named = {denoiser} - {"unet"}
    layers = {
        f"{name}_lora_layers": state if name in peft_named else _diffusers_names(state)
        for name, state in states.items()
    }
    pipeline_class = pipeline_class or StableDiffusionPipeline
    if hasattr(pipeline_class, "save_lora_weights"):
        pipeline_class.save_lora_weights(out_dir, **layers, safe_serialization=True)
    else:  # a pipeline without LoRA loading (PixArt): the same file, written as diffusers writes a transformer's
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        flat = {f"{name}.{k}": v.contiguous() for name, state in states.items() for k, v in state.items()}
        save_file(flat, Path(out_dir) / LORA_WEIGHTS)
    peft_keys = {f"{name}.{k}": v for name, state in states.items() for k, v in state.items()}
    dora = any("lora_magnitude_vector" in k for k in peft_keys)
    # a transformer's LoRA goes in diffusers' layout, which ComfyUI reads for them; DoRA has no kohya file: diffusers
    # neither writes nor reads its magnitudes in that layout, so nothing here could check one
    if denoiser == "unet" and not dora:
        kohya = convert_state_dict_to_kohya(peft_keys)
        save_file({k: v.contiguous() for k, v in kohya.items()}, Path(out_dir) / KOHYA_FILE)
    _save_renamed(Path(out_dir) / "pytorch_lora_weights.safetensors", comfyui_names)
    return Path(out_dir)


def _diffusers_names(state: dict) -> dict:
    """``state`` (peft's names) in diffusers' own names where its converter renames every key: attention adapters
    (``to_q`` …, a text encoder's ``q_proj`` …). Where it renames some (adapters on a UNet's feed-forwards, resnets or
    time embedding too, ``train.lora.target_modules``), peft's names for all: diffusers reads a file of peft's names
    right, and loaded a file mixing both 0.14 off the merged export's pixels (a tiny SD UNet, measured)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    renamed = convert_state_dict_to_diffusers(state)
    return state if any(".lora_A." in k or ".lora_B." in k for k in renamed) else renamed


def _save_renamed(source: Path, comfyui_names) -> None:
    """``source``'s tensors renamed by ``comfyui_names`` as ``lora_comfyui.safetensors`` beside it (nothing without
    one)."""
    if comfyui_names is None:
        return
    from safetensors.torch import load_file, save_file

    save_file(comfyui_names(load_file(source)), source.parent / COMFYUI_FILE)


LYCORIS_FACTORS = ("hada_w1_a", "lokr_w1", "lokr_w1_a")  # the factor of each update that takes its scale


def _save_lycoris(module, config, out_dir: str | Path, denoiser: str) -> Path:
    """A LoHa / LoKr denoiser's adapters: ``adapter_model.safetensors`` and ``adapter_config.json`` in peft's own
    layout (its keys as ``get_peft_model_state_dict`` gives them, which ``set_peft_model_state_dict`` loads), and
    ``lora_kohya.safetensors`` in LyCORIS' parameter names (``.hada_w1_a`` …, ``.lokr_w1`` …, ``.alpha``), which
    ComfyUI and A1111 load: a UNet's modules as ``lora_unet_<module>``, a transformer's as ``transformer.<module>``
    (its diffusers name, the prefix ComfyUI maps for every transformer family it loads: SD3, Flux and its FLUX.2 and
    Chroma, PixArt, Qwen-Image, Lumina 2 and Z-Image). LyCORIS' loaders scale by ``alpha`` over the rank of a
    low-rank factor (1 where there is none): the scale is folded into the first factor and ``alpha`` written as that
    rank."""
    from safetensors.torch import save_file

    peft = _peft()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in peft.get_peft_model_state_dict(module).items()}
    save_file(state, out / "adapter_model.safetensors")
    config.save_pretrained(out)
    scale, layers = _scale(config), {}
    for key, value in state.items():
        path, _, param = key.rpartition(".")
        layers.setdefault(path, {})[param] = value
    lycoris = {}
    for path, params in layers.items():
        prefix = "lora_unet_" + path.replace(".", "_") if denoiser == "unet" else f"{denoiser}.{path}"
        for param, value in params.items():
            lycoris[f"{prefix}.{param}"] = (value * scale if param in LYCORIS_FACTORS else value).contiguous()
        low = params.get("hada_w1_b", params.get("lokr_w2_b", params.get("lokr_w1_b")))
        if low is not None:
            lycoris[f"{prefix}.alpha"] = torch.tensor(float(low.shape[0]))
    save_file(lycoris, out / KOHYA_FILE)
    return out


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Within: every peft adapter in ``model`` (the denoiser's, the text encoders') is bypassed, so ``model`` computes
    what its frozen base computes; the adapters are on again after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_copy(module, base=None):
    """A plain copy of ``module`` (no peft layers) whose weights are base + adapter update, for a standalone export:
    a diffusers model through its ``fuse_lora``, a transformers text encoder by merging peft's layers.

    ``base``: the same model without adapters as its files hold it, where ``module``'s base is held in less
    precision (bf16, quantised); the adapters are merged into it (never into a dequantised copy). It is changed.
    """
    merged = copy.deepcopy(module) if base is None else _with_adapters_of(module, base)
    if hasattr(merged, "fuse_lora") and hasattr(merged, "add_adapter"):
        merged.fuse_lora()
        merged.unload_lora()
        return merged
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(merged.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    merged.peft_config = {}
    merged._hf_peft_config_loaded = False
    return merged


def _with_adapters_of(module, base):
    """``base`` with ``module``'s adapters: the same peft config, the adapter weights copied (fp32)."""
    config = module.peft_config["default"]
    if hasattr(base, "add_adapter"):
        base.add_adapter(copy.deepcopy(config))
    else:
        _peft().inject_adapter_in_model(copy.deepcopy(config), base, adapter_name="default")
        base.peft_config = {"default": config}
    adapters = {k: v for k, v in module.state_dict().items() if any(f".{p}" in k for p in ADAPTER_PARAMS)}
    result = base.load_state_dict({k: v.float() for k, v in adapters.items()}, strict=False)
    if result.unexpected_keys or any(any(f".{p}" in k for p in ADAPTER_PARAMS) for k in result.missing_keys):
        raise RuntimeError(f"adapters do not match the base: {result.unexpected_keys[:3]} {result.missing_keys[:3]}")
    return base

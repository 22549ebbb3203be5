"""Precision and placement of what does not train: one layer between loading the components and training them.

``prepare`` takes the loaded components and the config and holds every frozen module as the run asks: the text
encoders and the autoencoder in their ``dtype`` (``auto``: the compute dtype of ``train.mixed_precision``) or
quantised (``model.text_encoder*.quantize``); the frozen base of a LoRA denoiser in the compute dtype or quantised
(``model.quantize``), its adapters added later in fp32. Families and the loop never ask which mode runs.

A base held in less than its files' precision is never written back: checkpoints of such a run hold the adapters
alone (the base is re-read from ``model.pretrained`` on resume), and the export merges the adapters into the base
re-read in full precision (:func:`full_precision`). Why these modes and libraries: ``docs/memory.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from sdtrain.config import Config, ConfigError, TrainConfig
from sdtrain.models.families import IN_MEMORY, Family, for_config
from sdtrain.models.quantize import check_available, hold_in, quantize
from sdtrain.train import text_encoders

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(tc: TrainConfig, device: torch.device | str = "cuda") -> torch.dtype:
    """The dtype the run's matmuls run in on ``device``: ``train.mixed_precision``'s, float32 without it (and for
    fp16 on a CPU, where accelerate does not autocast: ``sdtrain.train.run`` says so)."""
    if tc.mixed_precision == "fp16" and torch.device(device).type == "cpu":
        return torch.float32
    return COMPUTE_DTYPES[tc.mixed_precision]


def base_reloads(config: Config) -> bool:
    """Whether the denoiser holds a frozen base loaded from a folder or hub id (``model.unet.pretrained`` or
    ``model.pretrained``), which resume and export can read again in full precision: a LoRA run's, or the model a
    ControlNet steers (``Family.base_inside``); not one built from knobs or handed over by the Python API."""
    m = config.model
    loaded = bool(m.unet.pretrained) or (bool(m.pretrained) and m.pretrained != IN_MEMORY)
    frozen_base = bool(config.train.lora.rank) or for_config(m).base_inside
    return frozen_base and loaded and not m.unet.from_scratch


def frozen_base(family: Family, components) -> torch.nn.Module:
    """The frozen base a run re-reads from its folder (:func:`base_reloads`), as checkpoints describe it: a LoRA run's
    denoiser, or the model a ControlNet steers (the trained model's ``base``; the ControlNet's own weights, partly
    drawn at random when it is made, are not the base's)."""
    denoiser = family.denoiser_of(components)
    return denoiser.base if family.base_inside else denoiser


def _frozen_settings(config: Config) -> dict[str, Any]:
    """The model config of each frozen component by its name among the components (``vae``, ``text_encoder``...)."""
    m = config.model
    return {"vae": m.vae, "text_encoder": m.text_encoder, "text_encoder_2": m.text_encoder_2,
            "text_encoder_3": m.text_encoder_3}  # fmt: skip


def check(config: Config) -> None:
    """What :func:`prepare` refuses, checked before any work (``sdtrain.train.preflight``).

    Raises:
        ConfigError: a quantised denoiser without LoRA (a full fine-tune of a quantised model), or a quantised base
            with nowhere to re-read it from in full precision; a quantised text encoder that trains; LoHa / LoKr
            over nf4 or beside text-encoder LoRA.
        MissingPackage: a mode whose library is not installed.
    """
    m, tc = config.model, config.train
    lycoris = tc.lora.rank and tc.lora.variant in ("loha", "lokr")
    if lycoris and m.quantize == "nf4":
        raise ConfigError(f"train.lora.variant={tc.lora.variant} over model.quantize=nf4: peft's LoHa / LoKr layers "
                          "read the base weight's shape, which bitsandbytes packs; use model.quantize=int8 (or fp8), "
                          "or train.lora.variant=lora / dora")  # fmt: skip
    if lycoris and tc.text_encoder.mode == "lora":
        raise ConfigError(f"train.lora.variant={tc.lora.variant} is for the denoiser; the text encoders' adapters "
                          "are LoRA: set train.text_encoder.mode=frozen (or full), or train.lora.variant=lora / "
                          "dora")  # fmt: skip
    if m.quantize != "none":
        if not tc.lora.rank:
            raise ConfigError(f"model.quantize={m.quantize} holds a frozen base for LoRA adapters; a quantised model "
                              "does not train: set train.lora.rank (say 16), or model.quantize=none for a full "
                              "fine-tune")  # fmt: skip
        if not base_reloads(config):
            raise ConfigError(f"model.quantize={m.quantize} needs the base loaded from model.pretrained (or "
                              "model.unet.pretrained), whose full-precision weights the export merges the adapters "
                              "into; this run builds its denoiser")  # fmt: skip
        check_available(m.quantize, "model.quantize")
    trained = for_config(m).text_encoders if text_encoders.trains_text(tc) else ()
    for name, settings in _frozen_settings(config).items():
        mode = getattr(settings, "quantize", "none")
        if mode == "none":
            continue
        if m.pretrained == IN_MEMORY:
            raise ConfigError("model.text_encoder*.quantize: the Python API's components are used as they are; "
                              "quantise through sdtrain train with model.pretrained")  # fmt: skip
        if name in trained:
            raise ConfigError(
                f"model.{name}.quantize={mode}: a trained text encoder is not quantised (train.text_encoder.mode="
                f"{tc.text_encoder.mode}); set model.{name}.quantize=none"
            )
        check_available(mode, f"model.{name}.quantize")


@dataclass(frozen=True)
class Placed:
    """What :func:`prepare` did.

    Attributes:
        base_reloads: the denoiser's frozen base is re-read from its folder on resume and export (checkpoints hold
            the trainable weights alone).
        altered: the frozen components held in another precision than their files (the export re-reads them).
    """

    base_reloads: bool
    altered: tuple[str, ...]


def prepare(
    family: Family, components, config: Config, device: torch.device, sharded: bool, processes: int = 1
) -> Placed:
    """Hold the frozen modules of ``components`` as ``config`` asks, on ``device`` (in place).

    Args:
        sharded: the denoiser is sharded (FSDP2, DeepSpeed): its base stays in fp32 (FSDP2 shards parameters of
            one dtype).
        processes: the run's processes; a quantised base is trained by one (tested so; DDP, FSDP2 and DeepSpeed
            over quantised tensors are not).

    Raises:
        ConfigError: a quantised base in a run of several processes.
    """
    altered = hold_frozen(family, components, config, device)
    dtype = compute_dtype(config.train, device)
    reloads = base_reloads(config)
    denoiser = family.denoiser_of(components)
    if config.model.quantize != "none":
        if sharded or processes > 1:
            raise ConfigError(
                f"model.quantize={config.model.quantize}: a quantised base trains in one process here ({processes} "
                "launched; DDP, FSDP2 and DeepSpeed over quantised weights are not tested): launch one process, or "
                "set model.quantize=none"
            )
        layers = quantize(denoiser, config.model.quantize, dtype, device)
        logger.info("%s: %d linear layers of the frozen base held in %s", family.denoiser, layers,
                    config.model.quantize)  # fmt: skip
    elif reloads and dtype != torch.float32 and not sharded:
        if config.train.lora.rank:
            denoiser.requires_grad_(False)  # the base; fp32 adapters come
        hold_in(denoiser, dtype)  # its frozen weights in the compute dtype (a ControlNet's own train in fp32)
    return Placed(reloads, altered)


def hold_frozen(family: Family, components, config: Config, device: torch.device) -> tuple[str, ...]:
    """Hold the frozen encoders and autoencoder of ``components`` in their dtype or quantised, on ``device``, as a
    run and ``sdtrain cache`` alike encode with them; returns the names of those held otherwise than their files."""
    tc, dtype, altered = config.train, compute_dtype(config.train, device), []
    frozen = text_encoders.frozen(family, components, tc)
    in_memory = config.model.pretrained == IN_MEMORY  # handed over by the Python API: held as they are
    for name, module in frozen.items():
        module.requires_grad_(False).eval()
        settings = _frozen_settings(config)[name]
        mode = getattr(settings, "quantize", "none")
        if in_memory:
            module.to(device)
            continue
        if mode != "none":
            layers = quantize(module, mode, dtype, device, encoder=True)
            logger.info("%s: %d linear layers held in %s", name, layers, mode)
            altered.append(name)
            continue
        target = _frozen_dtype(name, settings.dtype, dtype)
        if module.dtype != target:
            hold_in(module, target, norms=False)
            altered.append(name)
        module.to(device)
    return tuple(altered)


def to_park(family: Family, components, config: Config) -> tuple[str, ...]:
    """The frozen parts a step of ``config`` does not use once the data is encoded: with a latent cache
    (``data.cache_dir``, ``data.cache_latents``) the text encoders that do not train and the autoencoder's encoder
    (``vae.encoder``; its decoder draws samples)."""
    if not (config.data.cache_dir or config.data.cache_latents):
        return ()
    names = [n for n in text_encoders.frozen(family, components, config.train) if n.startswith("text_encoder")]
    return (*names, "vae.encoder")


def park(components, names: tuple[str, ...]) -> None:
    """Move the parts ``names`` (:func:`to_park`) to the CPU. Sampling moves them back to the device for its
    prompts; the loop parks them again after."""
    for name in names:
        if name == "vae.encoder":
            for part in ("encoder", "quant_conv"):
                if getattr(components.vae, part, None) is not None:
                    getattr(components.vae, part).to("cpu")
        else:
            getattr(components, name).to("cpu")


def on_device(family: Family, components, config: Config, parked: tuple[str, ...]) -> list[tuple[Any, str]]:
    """The frozen modules a step holds on the device, each with its quantisation mode: what the memory estimate
    counts (the autoencoder's decoder alone where its encoder is parked)."""
    held = []
    for name, module in text_encoders.frozen(family, components, config.train).items():
        if name in parked:
            continue
        if name == "vae" and "vae.encoder" in parked:
            parts = [getattr(module, p, None) for p in ("decoder", "post_quant_conv")]
            held += [(p, "none") for p in parts if p is not None]
            continue
        held.append((module, getattr(_frozen_settings(config)[name], "quantize", "none")))
    return held


def _frozen_dtype(name: str, setting: str, compute: torch.dtype) -> torch.dtype:
    """The dtype a frozen module is held in: its ``dtype`` setting; ``auto``: the ``compute`` dtype, but fp32 for an
    autoencoder under fp16 (SDXL's overflows)."""
    if setting != "auto":
        return NAMED_DTYPES[setting]
    if name == "vae" and compute == torch.float16:
        return torch.float32
    return compute


def full_precision(family: Family, components, config: Config, placed: Placed) -> tuple[Any, dict[str, Any]]:
    """What an export writes beside the trained weights, as the files hold it: ``components`` with the frozen modules
    that :func:`prepare` altered loaded again, and the denoiser's base where it re-reads (by the denoiser's name, for
    :func:`~sdtrain.train.export.export_pipeline`'s ``bases``). On the CPU; ``auto`` dtypes load float32."""
    if not placed.altered and not placed.base_reloads:
        return components, {}
    fresh = family.load(_as_files(config), denoiser=placed.base_reloads)
    replaced = {name: getattr(fresh, name) for name in placed.altered}
    bases = {family.denoiser: family.denoiser_of(fresh)} if placed.base_reloads else {}
    return dataclasses.replace(components, **replaced), bases


def _as_files(config: Config) -> Config:
    """``config`` loading each component as its file holds it: ``auto`` dtypes (float32 on loading), nothing
    quantised."""
    m = config.model
    model = dataclasses.replace(
        m, quantize="none",
        **{name: dataclasses.replace(s, quantize="none") if hasattr(s, "quantize") else s
           for name, s in _frozen_settings(config).items() if name != "vae"},
    )  # fmt: skip
    return dataclasses.replace(config, model=model)

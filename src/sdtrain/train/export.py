"""Inference artifacts: a trained model as a plain diffusers pipeline folder (``final/``, ``sdtrain export`` of any
checkpoint), with LoRA adapters beside the merged weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sdtrain.config import Config, SampleConfig, load_config
from sdtrain.errors import StorageError, describe_os_error, failed_write
from sdtrain.models.embeddings import EMBEDDINGS_FOLDER, merged_tables, save_embeddings
from sdtrain.models.families import Family, for_config
from sdtrain.models.lora import LORA_FOLDER, add_lora, has_lora, merged_copy, save_lora
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train import checkpoint, placement, text_encoders
from sdtrain.train.ema import caught_up
from sdtrain.train.state import check_frozen, describe_frozen


def export_pipeline(
    family: Family,
    components,
    objective_config,
    out_dir: str | Path,
    sample: SampleConfig | None = None,
    bases: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Save a plain diffusers pipeline folder of the family's class (no safety checker) with ``sample``'s sampler as
    its scheduler and its step count and guidance in ``sampling.json`` (generate's defaults for the model).

    A denoiser (or text encoder) with LoRA adapters is saved twice: merged into the pipeline's component (a standalone
    model), and as the adapters alone in ``out_dir/lora/`` (``pytorch_lora_weights.safetensors`` for
    ``load_lora_weights`` on the base model, and kohya-ss' layout). Textual inversion's new tokens are in the saved
    tokenizers and encoders, and each in ``out_dir/embeddings/TOKEN.safetensors`` for the base model (A1111's and
    ComfyUI's layout, which ``load_textual_inversion`` reads). ``bases``: by component name, the full-precision
    base to merge a component's adapters into, where it trained on a base held in less precision
    (:func:`sdtrain.train.placement.full_precision`); for a model that holds its frozen base (a ControlNet's), the
    same model as its files hold it, given the trained weights (:func:`with_trained`).
    """
    names = (family.denoiser, *family.text_encoders)
    adapted = {name: getattr(components, name) for name in names if has_lora(getattr(components, name))}
    sample = sample or SampleConfig()
    sampling = {"num_inference_steps": sample.num_inference_steps, "guidance_scale": sample.guidance_scale}
    if family.image_guidance:
        sampling["image_guidance_scale"] = sample.image_guidance_scale
    try:
        if adapted:
            save_lora(adapted, Path(out_dir) / LORA_FOLDER, family.txt2img, family.denoiser, family.comfyui_lora)
            bases = bases or {}
            merged = {name: merged_copy(m, bases.get(name)) for name, m in adapted.items()}
            components = dataclasses.replace(components, **merged)
        inside = {name: with_trained(getattr(components, name), base) for name, base in (bases or {}).items()
                  if name not in adapted}  # a model holding its frozen base (a ControlNet's)  # fmt: skip
        components = dataclasses.replace(components, **inside)
        pipe = Pipeline(components, family, sample.scheduler, objective_config, sampling, device="cpu")
        encoders = {name: getattr(components, name) for name in family.text_encoders}
        with merged_tables(list(encoders.values())):  # new tokens' rows in the saved encoders' tables
            path = pipe.save_pretrained(out_dir)
        save_embeddings(encoders, dict(zip(family.text_encoders, family.embedding_keys)), path / EMBEDDINGS_FOLDER)
        return path
    except Exception as e:
        cause = failed_write(e)
        if cause is None:
            raise
        raise StorageError(f"could not write the export {out_dir} ({describe_os_error(cause)})") from e


def with_trained(model: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` (the same model as its files hold it) with ``model``'s trained weights (those ``base`` trains: a
    ControlNet's, beside the frozen model it steers held in less precision); it is changed.

    Raises:
        ValueError: ``model`` lacks one of them.
    """
    weights = model.state_dict()
    names = [n for n, p in base.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"the trained model lacks {len(missing)} of its base's trained weights ({missing[0]}...)")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name])
    return base


def export_checkpoint(
    run_dir: str | Path, step: int | None = None, out_dir: str | Path | None = None, trust_remote_code: bool = False
) -> Path:
    """Export a training checkpoint of a run (EMA weights if it has them) as a diffusers pipeline folder.

    Args:
        run_dir: the run's ``output_dir`` (its ``config.yaml`` says how to build the components).
        step: which checkpoint; None: the newest valid one.
        out_dir: where to write; default ``run_dir/export/step-XXXXXXXX``.
        trust_remote_code: let a text encoder's own code run. The run's ``config.yaml`` is not asked: a folder
            received from elsewhere must not be able to run code by exporting it.
    """
    run_dir, root = Path(run_dir), Path(run_dir) / "checkpoints"
    if not (run_dir / "config.yaml").is_file():
        what = "is not a folder" if not run_dir.is_dir() else "holds no run (no config.yaml)"
        raise checkpoint.CheckpointError(f"{run_dir} {what}: --run takes a run's output_dir (train.output_dir)")
    path = checkpoint.step_dir(root, step) if step is not None else checkpoint.find_latest(root)
    if path is None or not path.is_dir():
        saved = sorted(p.name for p in root.glob(f"{checkpoint.PREFIX}*")) if root.is_dir() else []
        if path is None:
            raise checkpoint.CheckpointError(f"{run_dir} has no checkpoint yet (one every train.save_every steps)")
        held = f"its checkpoints are {', '.join(saved)}" if saved else "it has none yet"
        raise checkpoint.CheckpointError(f"{run_dir} has no checkpoint {path.name}: {held}")
    config = load_config(Config, run_dir / "config.yaml")
    config.model.text_encoder.trust_remote_code = trust_remote_code
    tensors, _, state = checkpoint.load_checkpoint(path)
    family = for_config(config.model)
    reloads = placement.base_reloads(config)  # a LoRA base read from its folder: the checkpoint holds the adapters
    config.model.unet.from_scratch = not reloads  # else the weights come from the checkpoint, not a pretrained UNet
    components = family.load(config)  # as the files hold them: nothing quantised, auto dtypes in float32
    frozen = text_encoders.frozen(family, components, config.train)
    if reloads:
        frozen[family.denoiser] = placement.frozen_base(family, components)
    check_frozen(state.get("frozen"), describe_frozen(frozen), path)
    denoiser = family.denoiser_of(components)
    if config.train.lora.rank:
        add_lora(denoiser, config.train.lora, family.lora_targets)
    model = text_encoders.prepare(family, components, denoiser, config.train)  # as it trained
    weights = dict(tensors[family.denoiser])
    if "ema" in tensors:  # train.ema_every's pending steps
        weights.update(caught_up(tensors["ema"], tensors[family.denoiser], state["ema"]))
    model.load_state_dict(weights, strict=not reloads)
    out = out_dir or run_dir / "export" / path.name
    components = text_encoders.components_with(family, components, model)
    try:
        return export_pipeline(family, components, config.train.objective, out, config.sample)
    except StorageError as e:
        raise StorageError(f"{e}; {path} is intact: free some space and run the same command again") from e

"""DreamBooth's prior preservation (``data.prior``): the class images, drawn by the base model where the folder holds
fewer than asked for, and the source that mixes them into training with their own loss weight.

The images are generated once, before the training components are loaded: image *i* is sampled from the class
prompt with seed ``train.seed + i`` and written as ``class-{i:05d}.png`` with its caption in ``class-{i:05d}.txt``
(each pair written whole, the image last), so an interrupted run and every later one reuse what is there and draw
only what is missing, the same images as an uninterrupted run. Training draws a ``data.prior.share`` of its
micro-batches from them, each sample's loss weighted by ``data.prior.loss_weight``; the captions are the class
prompt as written (no trigger, no tag edits, no mask).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sdtrain.config import Config, ConfigError
from sdtrain.data.sources import IMAGE_SUFFIXES
from sdtrain.train.placement import compute_dtype

logger = logging.getLogger(__name__)

BATCH = 4  # images sampled at once


def existing(folder: Path) -> list[Path]:
    """The class images in ``folder`` (any image with a caption beside it)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").exists())


def missing(config: Config) -> list[int]:
    """Indices of the class images still to draw (``class-{i:05d}``), none where ``count`` are there."""
    prior = config.data.prior
    folder = Path(prior.path)
    have = existing(folder)
    if len(have) >= prior.count:
        return []
    taken = {p.stem for p in have}
    indices = [i for i in range(prior.count + len(have)) if f"class-{i:05d}" not in taken]
    return indices[: prior.count - len(have)]


def check(config: Config, caching: bool = False) -> None:
    """What the pre-flight refuses: class images to draw without a base model to draw them, where this command draws
    them: training, or ``caching`` under a disk cache (whose training then reads their cache)."""
    draws = bool(config.data.prior.path) and (caching or not config.data.cache_dir)
    if draws and missing(config) and not config.model.pretrained:
        raise ConfigError(f"data.prior.path={config.data.prior.path} holds fewer than data.prior.count="
                          f"{config.data.prior.count} class images and this run has no base model to draw the rest: "
                          "set model.pretrained, or put the class images there")  # fmt: skip


def draw_class_images(config: Config, device: torch.device) -> int:
    """Generate the missing class images with the base model (``model.pretrained``); returns how many were drawn."""
    from sdtrain.sample.pipeline import Pipeline

    prior, todo = config.data.prior, missing(config)
    if not todo:
        return 0
    folder = Path(prior.path)
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("prior preservation: drawing %d class images of %r with %s", len(todo), prior.prompt,
                config.model.pretrained)  # fmt: skip
    pipe = Pipeline.from_pretrained(config.model.pretrained, device=device)
    dtype = compute_dtype(config.train, device)
    if dtype != torch.float32:  # drawn in the run's precision (an fp16 autoencoder can overflow: it stays fp32)
        for field in dataclasses.fields(pipe.components):
            module = getattr(pipe.components, field.name)
            if isinstance(module, torch.nn.Module) and not (dtype == torch.float16 and field.name == "vae"):
                module.to(dtype)
    side = config.data.resolution
    for start in range(0, len(todo), BATCH):
        for index in todo[start : start + BATCH]:
            image = pipe.generate(prior.prompt, num_inference_steps=prior.num_inference_steps,
                                  guidance_scale=prior.guidance_scale, height=side, width=side,
                                  seed=config.train.seed + index).images[0]  # fmt: skip
            stem = folder / f"class-{index:05d}"
            stem.with_suffix(".txt").write_text(prior.prompt)
            tmp = stem.with_name(f".{stem.name}.png.tmp")  # no image suffix: never read as a sample
            image.save(tmp, format="PNG")
            tmp.replace(stem.with_suffix(".png"))  # the pair is whole once the image is there
    del pipe
    return len(todo)


def share_weight(weights: list[float], share: float) -> float:
    """The mix weight that gives the class source ``share`` of the micro-batches beside ``weights``."""
    return sum(weights) * share / (1.0 - share)

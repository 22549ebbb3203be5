"""The Python facade, with the source article's API: ``fit / generate / reconstruct / save_pretrained``.

``StableDiffusion`` is a :class:`sdtrain.sample.pipeline.Pipeline` (components, sampler, sampling defaults; generate,
reconstruct, save and load as plain diffusers folders) with the article's constructor and ``fit``, which runs
:func:`sdtrain.train.loop.train` on the components it holds.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from sdtrain.config import Config, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
from sdtrain.data.streams import batch_size_of
from sdtrain.models.families import IN_MEMORY
from sdtrain.models.families.sd import FAMILY, Components
from sdtrain.models.text import freeze
from sdtrain.sample.pipeline import SCHEDULERS, Pipeline
from sdtrain.train.loop import train


class StableDiffusion(Pipeline):
    """A trainable text-to-image latent diffusion model.

    Args:
        vae: frozen AutoencoderKL or VQModel.
        text_encoder: frozen transformers text encoder.
        tokenizer: its tokenizer (``model_max_length`` is the prompt length).
        unet: the trainable UNet2DConditionModel (``image_decoder=`` is accepted as the article's name for it).
        scheduler: a diffusers scheduler, or a name from ``SCHEDULERS``; default Euler on the training schedule.
        device: where to run; default CUDA if available.
        objective: the training objective (prediction type, schedule); default read from ``scheduler`` or epsilon.
        sampling: default ``num_inference_steps`` and ``guidance_scale`` of generate / reconstruct (default 30 and
            7.5; ``from_pretrained`` reads the ones an sdtrain export saved).
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet=None,
        scheduler=None,
        device: str | torch.device | None = None,
        image_decoder=None,
        objective: ObjectiveConfig | None = None,
        sampling: dict[str, float] | None = None,
    ):
        if unet is None and image_decoder is None:
            raise TypeError("StableDiffusion needs a unet (or image_decoder)")
        if unet is not None and image_decoder is not None:
            raise TypeError("give unet or image_decoder, not both")
        components = Components(
            freeze(vae), freeze(text_encoder), tokenizer, unet if unet is not None else image_decoder
        )
        super().__init__(components, FAMILY, scheduler, objective, sampling, device)

    # ----------------------------------------------------------------------------------------------------- training
    def fit(
        self,
        dataloader: Iterable,
        num_steps: int = 100_000,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_norm: float | None = 1.0,
        log_interval: int = 100,
        save_interval: int = 1000,
        save_dir: str | Path = "runs/fit",
        weight_decay: float = 0.0,
        caption_dropout: float = 0.1,
        ema_decay: float | None = None,
        mixed_precision: str = "no",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> StableDiffusion:
        """Train the UNet on batches from ``dataloader`` (re-iterated as needed) for ``num_steps`` optimizer steps.

        Batches are dicts with ``image`` (B x 3 x H x W in [-1, 1], or a list of PIL images) and ``text`` (list of
        str), or ``(images, texts)`` tuples; ``batch_size`` is B (by default ``dataloader.batch_size``, else the size
        of its first batch). A generator is read once: it must yield the ``num_steps`` batches the run needs.
        Checkpoints go to ``save_dir/checkpoints`` every ``save_interval`` steps and the trained pipeline to
        ``save_dir/final``; a second call with the same ``save_dir`` resumes. After training this object holds the
        trained (EMA, if enabled) weights.


        Under ``accelerate launch`` with W processes, every process passes the same ``dataloader`` (same order: seed
        its shuffling) and process r trains on its batches r, r + W, ...: a step takes W batches.
        """
        objective = self.objective
        if batch_size is None:
            batch_size, dataloader = _peek_batch_size(dataloader)
        config = Config(
            # the components are handed over; the config names their family and satisfies validation
            model=ModelConfig(family=self.family.name, pretrained=IN_MEMORY),
            data=DataConfig(caption_dropout=caption_dropout),
            train=TrainConfig(
                output_dir=str(save_dir),
                seed=seed,
                batch_size=batch_size * int(os.environ.get("WORLD_SIZE", "1")),
                num_steps=num_steps,
                mixed_precision=mixed_precision,  # type: ignore[arg-type]
                clip_norm=clip_norm,
                ema_decay=ema_decay,
                log_every=log_interval,
                save_every=save_interval,
                objective=copy.deepcopy(objective),
                optim=OptimConfig(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
            ),
        )
        final = train(config, components=self.components, batches=dataloader)
        if ema_decay is not None:  # adopt the exported EMA weights
            from diffusers import UNet2DConditionModel

            self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(final, subfolder="unet").state_dict())
        self.unet.eval()
        return self


def _peek_batch_size(dataloader: Iterable) -> tuple[int, Iterable]:
    """The per-process batch size of ``dataloader`` (its ``batch_size`` attribute, as a DataLoader has, else the size
    of its first batch) and the batches to train on: a one-shot iterator (a generator) gets its first batch put back
    in front."""
    size = getattr(dataloader, "batch_size", None)
    if isinstance(size, int):
        return size, dataloader
    if iter(dataloader) is dataloader:  # a generator: what is read from it is gone
        first = next(dataloader, None)
        dataloader = itertools.chain([first], dataloader)
    else:
        first = next(iter(dataloader), None)
    if first is None:
        raise ValueError("the dataloader given to fit() yields no batch")
    return batch_size_of(first), dataloader


__all__ = ["StableDiffusion", "SCHEDULERS"]

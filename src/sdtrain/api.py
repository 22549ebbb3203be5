"""The Python facade, with the source article's API: ``fit / generate / reconstruct / save_pretrained``.

``StableDiffusion`` holds the four components plus a sampler and delegates: training to
:func:`sdtrain.train.loop.train`, sampling to diffusers pipelines through :mod:`sdtrain.sample.pipeline`, saving to
diffusers' ``StableDiffusionPipeline.save_pretrained`` (so the folder loads in plain diffusers without sdtrain).
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from sdtrain.config import Config, DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
from sdtrain.data.cache import batch_size_of
from sdtrain.models.text import freeze
from sdtrain.sample.pipeline import (
    FALLBACK_SAMPLING,
    SCHEDULERS,
    Output,
    img2img,
    read_sampling_defaults,
    sampling_scheduler,
    txt2img,
    with_scheduler,
    write_sampling_defaults,
)
from sdtrain.train.loop import Components, train


def objective_from_scheduler(scheduler) -> ObjectiveConfig:
    """The training objective a sampler's config describes (used when loading a saved pipeline)."""
    c = scheduler.config
    return ObjectiveConfig(
        prediction_type=c.get("prediction_type", "epsilon"),
        num_train_timesteps=c.get("num_train_timesteps", 1000),
        beta_schedule=c.get("beta_schedule", "scaled_linear"),
        beta_start=c.get("beta_start", 0.00085),
        beta_end=c.get("beta_end", 0.012),
        rescale_zero_terminal_snr=bool(c.get("rescale_betas_zero_snr", False)),
    )


class StableDiffusion:
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
        self.vae = freeze(vae)
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer
        self.unet = unet if unet is not None else image_decoder
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if objective is None:
            objective = (
                objective_from_scheduler(scheduler)
                if scheduler is not None and not isinstance(scheduler, str)
                else ObjectiveConfig()
            )
        self.objective = objective
        if scheduler is None or isinstance(scheduler, str):
            scheduler = sampling_scheduler(objective, scheduler or "euler")
        self.scheduler = scheduler
        self.sampling = FALLBACK_SAMPLING | (sampling or {})

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
        str), or ``(images, texts)`` tuples; ``batch_size`` is B (by default ``dataloader.batch_size``, else the
        size of its first batch). A generator is read once: it must yield the ``num_steps`` batches the run needs. Checkpoints
        go to ``save_dir/checkpoints`` every ``save_interval`` steps and the trained pipeline to ``save_dir/final``;
        a second call with the same ``save_dir`` resumes. After training this object holds the trained (EMA, if
        enabled) weights.

        Under ``accelerate launch`` with W processes, every process passes the same ``dataloader`` (same order: seed
        its shuffling) and process r trains on its batches r, r + W, ...: a step takes W batches.
        """
        objective = self.objective
        if batch_size is None:
            batch_size, dataloader = _peek_batch_size(dataloader)
        config = Config(
            model=ModelConfig(pretrained="<in memory>"),  # components are passed in; this only satisfies validation
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
        components = Components(self.vae, self.text_encoder, self.tokenizer, self.unet)
        final = train(config, components=components, batches=dataloader)
        if ema_decay is not None:  # adopt the exported EMA weights
            from diffusers import UNet2DConditionModel

            self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(final, subfolder="unet").state_dict())
        self.unet.eval()
        return self

    # ----------------------------------------------------------------------------------------------------- sampling
    def sampling_settings(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """The step count and guidance to sample with: the ones given, else this model's ``sampling``."""
        steps = int(num_inference_steps or self.sampling["num_inference_steps"])
        return steps, self.sampling["guidance_scale"] if guidance_scale is None else guidance_scale

    def _pipeline(self, cls, scheduler: str | None):
        sched = with_scheduler(self.scheduler, scheduler) if scheduler else self.scheduler
        pipe = cls(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        self.unet.eval()
        return pipe.to(self.device)

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        progress: bool = False,
    ) -> Output:
        """Text to image. Image *i* (prompt-major) is sampled with its own generator seeded ``seed + i``; steps and
        guidance default to the model's ``sampling``."""
        pipe = self._pipeline(StableDiffusionPipeline, scheduler)
        return txt2img(
            pipe,
            prompt,
            negative_prompt,
            num_images_per_prompt,
            *self.sampling_settings(num_inference_steps, guidance_scale),
            height,
            width,
            seed,
            progress=progress,
        )

    def reconstruct(
        self,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image],
        strength: float = 0.6,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
        progress: bool = False,
    ) -> Output:
        """Image to image under a prompt (SDEdit): ``strength`` 0 keeps the image, 1 ignores it; steps and guidance
        default to the model's ``sampling``."""
        pipe = self._pipeline(StableDiffusionImg2ImgPipeline, scheduler)
        return img2img(
            pipe,
            prompt,
            image,
            strength,
            negative_prompt,
            *self.sampling_settings(num_inference_steps, guidance_scale),
            seed,
            progress=progress,
        )

    # ----------------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, path: str | Path) -> Path:
        """A plain diffusers StableDiffusionPipeline folder (with this model's sampling defaults)."""
        self._pipeline(StableDiffusionPipeline, None).save_pretrained(path, safe_serialization=True)
        write_sampling_defaults(path, **self.sampling)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, scheduler: str | None = None):
        """Load a pipeline folder (ours or any Stable Diffusion 1.x / 2.x folder or hub id)."""
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        sched = with_scheduler(pipe.scheduler, scheduler) if scheduler else pipe.scheduler
        sampling = read_sampling_defaults(path) if Path(path).is_dir() else None
        return cls(
            pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, scheduler=sched, device=device, sampling=sampling
        )


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

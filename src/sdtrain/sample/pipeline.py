"""Sampling: the :class:`Pipeline` (a model's components, sampler and sampling defaults), the scheduler map,
text-to-image and image-to-image (SDEdit), grids.

diffusers owns the samplers and the denoising loop: we assemble the family's diffusers pipeline (``txt2img`` or its
``img2img`` sibling) from our components, ask it for latents, and decode them ourselves so that VQ autoencoders and
VAEs with a ``shift_factor`` decode correctly (for a plain AutoencoderKL the pixels are identical to the pipeline's own
output). Each image has its own generator seeded ``seed + i``, so image *i* does not depend on the batch size.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
    VQModel,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from tqdm.auto import tqdm

from sdtrain.config import SCHEDULER_NAMES, ConfigError, ObjectiveConfig
from sdtrain.errors import MissingPackage, Unsupported
from sdtrain.models.families import Family, detect
from sdtrain.models.hub import ModelNotFound, check_model_source
from sdtrain.models.lora import LORA_FOLDER, LORA_WEIGHTS
from sdtrain.models.vae import decode_latents, encode_moments, latent_channels, scale_latents
from sdtrain.objective import flow_schedule, from_scheduler, is_flow, schedule

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,  # with algorithm_type sde-dpmsolver++ (SAMPLER_SETTINGS)
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
# the samplers of flow-matching models, by the same names: SD3's and Flux's FlowMatch schedulers, and the multistep
# solvers on flow sigmas (Sana's; what PixArt's pipeline can run, as it calls scale_model_input)
FLOW_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "heun": FlowMatchHeunDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
# what a name sets beyond its class: DPM-Solver++ 2M and its SDE variant (fresh noise at every step, from the image's
# generator) are one class; DDIM's and PNDM's defaults (clip_sample, PRK warm-up steps) are not what Stable Diffusion
# samples with
SAMPLER_SETTINGS: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++"},
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"},
    "ddim": {"clip_sample": False},
    "pndm": {"skip_prk_steps": True},
}
if tuple(SCHEDULERS) != SCHEDULER_NAMES:  # config.SamplerName is the one list of names
    raise ImportError(f"SCHEDULERS {tuple(SCHEDULERS)} differ from config.SCHEDULER_NAMES {SCHEDULER_NAMES}")


# sampling defaults saved beside a pipeline's components (plain diffusers ignores the file; the sampler itself is the
# pipeline's scheduler): what guidance and step count the model was validated with
SAMPLING_FILE = "sampling.json"
FALLBACK_SAMPLING = {"num_inference_steps": 30, "guidance_scale": 7.5}
LORA_SCALE_ADAPTER = "lora_scale"  # the export's adapters loaded again to scale them (Pipeline.set_lora_scale)
IMAGE_GUIDANCE = "image_guidance_scale"  # an edit model's default image guidance, where it has one (1.5: diffusers')


def write_sampling_defaults(
    folder: str | Path, num_inference_steps: int, guidance_scale: float, image_guidance_scale: float | None = None
) -> None:
    data = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    if image_guidance_scale is not None:
        data[IMAGE_GUIDANCE] = image_guidance_scale
    (Path(folder) / SAMPLING_FILE).write_text(json.dumps(data, indent=1) + "\n")


def read_sampling_defaults(folder: str | Path) -> dict[str, float]:
    """A pipeline folder's sampling defaults; diffusers' usual 30 steps at guidance 7.5 where it has none (a hub id,
    a folder not written by sdtrain)."""
    path = Path(folder) / SAMPLING_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return FALLBACK_SAMPLING | {k: v for k, v in saved.items() if k in FALLBACK_SAMPLING or k == IMAGE_GUIDANCE}


@dataclass
class Output:
    """What generate / reconstruct return: PIL images, in prompt-major order."""

    images: list[Image.Image]


def sampling_scheduler(
    config: ObjectiveConfig, name: str = "euler", objective: str = "ddpm", flow_samplers: tuple[str, ...] | None = None
) -> SchedulerMixin:
    """A sampler that matches the training schedule: for DDPM its betas, prediction type and zero terminal SNR; for
    flow matching its shift (``FlowMatchEulerDiscreteScheduler`` as SD3's and Flux's pipelines configure it, or a
    multistep solver on the same flow sigmas), one of ``flow_samplers`` (default: all)."""
    if objective == "flow":
        return flow_sampler(config, name, flow_samplers)
    base = EulerDiscreteScheduler(
        **schedule(config),
        timestep_spacing="trailing",
        steps_offset=1,  # unused with trailing spacing; set because DiffusionPipeline rewrites any other value
    )
    return with_scheduler(base, name)


def flow_sampler(config: ObjectiveConfig, name: str, allowed: tuple[str, ...] | None = None) -> SchedulerMixin:
    """The flow-matching sampler ``name`` on the sigmas, shift and step count of ``config``."""
    allowed = allowed or tuple(FLOW_SCHEDULERS)
    if name not in allowed:
        raise ConfigError(f"this model samples with {', '.join(allowed)} (flow matching), not {name!r}")
    cls, settings = FLOW_SCHEDULERS[name], SAMPLER_SETTINGS.get(name, {})
    if name == "euler":
        return cls(**flow_schedule(config))
    if config.shift_terminal is not None:
        raise ConfigError(f"{cls.__name__} has no shift_terminal (train.objective.shift_terminal): sample with euler")
    if name == "heun":
        if config.dynamic_shift:
            raise ConfigError("FlowMatchHeunDiscreteScheduler has no dynamic shift: sample with euler")
        return cls(num_train_timesteps=config.num_train_timesteps, shift=config.shift)
    if config.dynamic_shift:
        raise ConfigError(f"{cls.__name__} on flow sigmas is sampled here with a constant shift: sample with euler")
    return cls(
        num_train_timesteps=config.num_train_timesteps, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=config.shift, **settings,
    )  # fmt: skip


def with_scheduler(
    scheduler: SchedulerMixin, name: str, flow_samplers: tuple[str, ...] | None = None
) -> SchedulerMixin:
    """The sampler ``name`` built from another scheduler's config (same training schedule); a flow-matching
    scheduler takes the names of ``flow_samplers`` (default: all of ``FLOW_SCHEDULERS``)."""
    if is_flow(scheduler):
        if name in (flow_samplers or FLOW_SCHEDULERS) and _is(scheduler, FLOW_SCHEDULERS[name], name):
            return scheduler
        return flow_sampler(from_scheduler(scheduler), name, flow_samplers)
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if _is(scheduler, SCHEDULERS[name], name):
        return scheduler
    return SCHEDULERS[name].from_config(scheduler.config, **SAMPLER_SETTINGS.get(name, {}))


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The name a scheduler samples as (``dpmpp_2m_sde``), for reports; its class name where it has none."""
    names = FLOW_SCHEDULERS if is_flow(scheduler) else SCHEDULERS
    for name in sorted(names, key=lambda n: n not in SAMPLER_SETTINGS):  # the names with settings first
        if _is(scheduler, names[name], name):
            return name
    return type(scheduler).__name__


def _is(scheduler: SchedulerMixin, cls: type, name: str) -> bool:
    """Whether ``scheduler`` already is the sampler ``name``: its class, with the settings the name implies."""
    settings = SAMPLER_SETTINGS.get(name, {})
    return isinstance(scheduler, cls) and all(scheduler.config.get(k) == v for k, v in settings.items())


def _generators(seed: int, count: int) -> list[torch.Generator]:
    # generators live on the CPU so that a seed gives the same image on every device
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def _as_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _postprocess(
    pipe: DiffusionPipeline, latents: torch.Tensor, unpack=None, height: int | None = None, width: int | None = None
) -> list[Image.Image]:
    """Decode what the pipeline returned with ``output_type="latent"`` (``unpack``: the family's
    ``pipeline_latents``, for an image of ``height`` x ``width``)."""
    if unpack is not None:
        latents = unpack(pipe, latents, height, width)
    images = decode_latents(pipe.vae, latents)
    processor: VaeImageProcessor = pipe.image_processor
    return processor.postprocess(images.float(), output_type="pil")


def _prompts(pipe: DiffusionPipeline, prompts: list[str], negatives: list[str] | None, encode) -> dict[str, Any]:
    """The prompt arguments of one pipeline call: the strings (no negative prompt: the pipeline's own default, None
    or PixArt's ""), or what the family's ``pipeline_prompts`` (``encode``) makes of them."""
    if encode is not None:
        return encode(pipe, prompts, negatives)
    return {"prompt": prompts, **({"negative_prompt": negatives} if negatives else {})}


def txt2img(
    pipe: DiffusionPipeline,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    unpack=None,
    encode=None,
    guidance: str = "guidance_scale",
    latent_output: bool = True,
    images: list[Image.Image] | None = None,
    image_argument: str = "image",
    one_prompt_per_call: bool = False,
    **family: Any,
) -> Output:
    """Text to image with the pipeline's sampler; image *i* (prompt-major) uses the generator seeded ``seed + i``;
    ``unpack``: the family's ``pipeline_latents`` where it has one; ``encode``: its ``pipeline_prompts``;
    ``guidance``: the pipeline's argument for ``guidance_scale``; ``latent_output``: the family's (False: the
    pipeline decodes); ``images``: the condition image of each prompt (one for all), to the pipeline's
    ``image_argument`` (an edit model's reference, a ControlNet's control), the size then the image's where the
    pipeline takes none; ``one_prompt_per_call``: the family's pipeline takes one prompt a call, and its condition
    image alone, not in a list (Qwen-Image-Edit's); ``family``: further arguments of its pipeline."""
    prompts = _as_list(prompt)
    if images is not None and len(images) not in (1, len(prompts)):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
    conditions = None if images is None else [im for im in images * (len(prompts) // len(images))
                                              for _ in range(num_images_per_prompt)]  # fmt: skip
    parameters = inspect.signature(pipe.__call__).parameters.keys()
    size = {"height": height, "width": width} if {"height", "width"} <= parameters else {}
    if "max_area" in parameters and height and width:  # Kontext's: it would rescale the size asked to its 1024^2
        size["max_area"] = height * width
    negatives = _as_list(negative_prompt) if negative_prompt is not None else None
    if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    flat = [p for p in prompts for _ in range(num_images_per_prompt)]
    flat_neg = [n for n in negatives for _ in range(num_images_per_prompt)] if negatives else None
    generators = _generators(seed, len(flat))
    batch_size = 1 if one_prompt_per_call else batch_size
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(flat), batch_size), desc="generate", unit="batch", disable=not progress):
        stop = start + batch_size
        out = pipe(
            **_prompts(pipe, flat[start:stop], flat_neg[start:stop] if flat_neg else None, encode),
            num_inference_steps=num_inference_steps,
            **{guidance: guidance_scale},
            **size,
            **(
                {image_argument: conditions[start] if one_prompt_per_call else conditions[start:stop]}
                if conditions is not None
                else {}
            ),  # fmt: skip
            generator=generators[start:stop],
            output_type="latent" if latent_output else "pil",
            **family,
        ).images
        images += _postprocess(pipe, out, unpack, height, width) if latent_output else out
    return Output(images)


def img2img(
    pipe: DiffusionPipeline,
    prompt: str | list[str],
    image: Image.Image | list[Image.Image],
    strength: float = 0.6,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    unpack=None,
    encode=None,
    guidance: str = "guidance_scale",
    **family: Any,
) -> Output:
    """SDEdit: noise each image's latents to ``strength`` and denoise under its prompt (``unpack``: the family's
    ``pipeline_latents``; ``encode``: its ``pipeline_prompts``; ``guidance``: the pipeline's argument for
    ``guidance_scale``; ``family``: further arguments of its pipeline).

    One prompt for all images, or one per image. The image is resized to a multiple of the autoencoder's factor.
    """
    images_in = [image] if isinstance(image, Image.Image) else list(image)
    prompts = _as_list(prompt)
    if len(prompts) == 1:
        prompts = prompts * len(images_in)
    if len(prompts) != len(images_in):
        raise ValueError(f"{len(prompts)} prompts for {len(images_in)} images: give one prompt, or one per image")
    negatives = _as_list(negative_prompt) * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    generators = _generators(seed, len(images_in))
    processor: VaeImageProcessor = pipe.image_processor
    own_encoding = isinstance(pipe.vae, (AutoencoderKL, VQModel)) and latent_channels(pipe.vae) == 4
    # a pipeline that takes the size (Flux's, SD3's) is given the image's: it would resize to its default otherwise
    sized = {"height", "width"} <= inspect.signature(pipe.__call__).parameters.keys()
    out: list[Image.Image] = []
    for start in tqdm(range(0, len(images_in), batch_size), desc="reconstruct", unit="batch", disable=not progress):
        stop = start + batch_size
        pixels = processor.preprocess(images_in[start:stop])
        if own_encoding:
            # encode ourselves: the posterior sample uses each image's generator, and VQ / shift_factor are handled
            mean, std = encode_moments(pipe.vae, pixels)
            noise = torch.stack([torch.randn(m.shape, generator=g) for m, g in zip(mean, generators[start:stop])])
            init = scale_latents(pipe.vae, mean + std * noise.to(mean))
        else:
            init = pixels  # diffusers encodes (scaling_factor only)
        latents = pipe(
            **_prompts(pipe, prompts[start:stop], negatives[start:stop] if negatives else None, encode),
            image=init,
            strength=strength,
            num_inference_steps=num_inference_steps,
            **{guidance: guidance_scale},
            generator=generators[start:stop],
            output_type="latent",
            **(dict(zip(("height", "width"), pixels.shape[-2:])) if sized else {}),
            **family,
        ).images
        out += _postprocess(pipe, latents, unpack, *pixels.shape[-2:])
    return Output(out)


def sample_images(paths: list[str | Path]) -> list[Image.Image]:
    """Condition images (``sample.images``, ``--reference``, ``--control``) decoded as training decodes images (EXIF
    orientation, alpha on white).

    Raises:
        DataError: one that cannot be read, named with why.
    """
    from sdtrain.data.decode import DataError, Skip, decode_image

    images = []
    for path in paths:
        try:
            images.append(decode_image(path))
        except Skip as skip:
            raise DataError(f"{path}: {skip}") from None
    return images


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images into one picture, row-major."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def save_images(images: list[Image.Image], out_dir: str | Path, prefix: str = "image", columns: int | None = None):
    """Write ``prefix-0000.png ...`` and ``grid.png``; returns the grid's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(out_dir / f"{prefix}-{i:04d}.png")
    grid_path = out_dir / "grid.png"
    make_grid(images, columns).save(grid_path)
    return grid_path


class Pipeline:
    """A text-to-image model ready to sample: its family, components, sampler and sampling defaults.

    ``generate`` and ``reconstruct`` run the family's diffusers pipelines; ``save_pretrained`` writes a plain diffusers
    folder and ``from_pretrained`` reads one (its family detected from ``model_index.json``). Training sees it as
    components; :class:`sdtrain.api.StableDiffusion` adds ``fit``.

    Args:
        components: the family's components (for Stable Diffusion: vae, text_encoder, tokenizer, unet).
        family: the model family; default the family of ``components``' kind, Stable Diffusion.
        scheduler: a diffusers scheduler, or a name from ``SCHEDULERS``; default Euler on the training schedule.
        objective: the training objective (prediction type, schedule); default read from ``scheduler``.
        sampling: default ``num_inference_steps`` and ``guidance_scale`` (default 30 and 7.5).
        device: where to sample; default CUDA if available.
    """

    def __init__(
        self,
        components,
        family: Family | None = None,
        scheduler: SchedulerMixin | str | None = None,
        objective: ObjectiveConfig | None = None,
        sampling: dict[str, float] | None = None,
        device: str | torch.device | None = None,
    ):
        self.components = components
        self.family = family or detect(None)
        if objective is None:
            given = scheduler is not None and not isinstance(scheduler, str)
            objective = from_scheduler(scheduler) if given else ObjectiveConfig()
        self.objective = objective
        if scheduler is None or isinstance(scheduler, str):
            kind = objective.kind or self.family.objectives[0]
            default = self.family.flow_samplers[0] if kind == "flow" else "euler"
            scheduler = sampling_scheduler(objective, scheduler or default, kind, self.family.flow_samplers)
        self.scheduler = scheduler
        self.sampling = FALLBACK_SAMPLING | (sampling or {})
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.folder: Path | None = None  # the folder it was loaded from (from_pretrained), where its LoRA lies

    def __getattr__(self, name: str):
        """The components by name (``pipe.vae``, ``pipe.unet``, ...)."""
        components = self.__dict__.get("components")
        if components is not None and hasattr(components, name):
            return getattr(components, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained model (the family's UNet or transformer)."""
        return self.family.denoiser_of(self.components)

    def default_resolution(self) -> int:
        """The pixel side the denoiser was configured for (its latent ``sample_size`` times the autoencoder's
        downsampling)."""
        from sdtrain.models.vae import downsample_factor

        sample_size = getattr(self.denoiser.config, "sample_size", None) or 128  # Flux has none: its pipeline's 128
        return int(sample_size) * downsample_factor(self.components.vae)

    def sampling_settings(self, num_inference_steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """The step count and guidance to sample with: the ones given, else this model's ``sampling``."""
        steps = int(num_inference_steps or self.sampling["num_inference_steps"])
        return steps, self.sampling["guidance_scale"] if guidance_scale is None else guidance_scale

    def set_lora_scale(self, scale: float) -> None:
        """Draw as if the export's LoRA adapters were merged at ``scale`` (1: as exported, 0: the base model, 0.5:
        half the change): the adapters of ``FOLDER/lora/`` (diffusers' format) are loaded onto the merged model at
        ``scale - 1``, since W + (s - 1) dW = W_base + s dW; no base model is read.

        Raises:
            Unsupported: the model was not loaded from an export with LoRA adapters in diffusers' format.
        """
        file = self.folder / LORA_FOLDER / LORA_WEIGHTS if self.folder else None
        if file is None or not file.is_file():
            raise Unsupported(f"{self.folder or 'this model'} has no LoRA adapters in diffusers' format beside it "
                              f"({LORA_FOLDER}/{LORA_WEIGHTS}): a LoRA scale needs a LoRA run's export")  # fmt: skip
        pipe = self.diffusers_pipeline(device=False)
        if LORA_SCALE_ADAPTER not in pipe.get_list_adapters().get(self.family.denoiser, []):
            pipe.load_lora_weights(file.parent, weight_name=LORA_WEIGHTS, adapter_name=LORA_SCALE_ADAPTER)
            pipe.to(self.device)
        pipe.set_adapters([LORA_SCALE_ADAPTER], [scale - 1.0])

    def diffusers_pipeline(self, img2img: bool = False, scheduler: str | None = None, device: bool = True):
        """The family's diffusers pipeline over these components (``img2img``: its image-to-image sibling), with the
        sampler ``scheduler`` for this call only; on this model's device unless ``device`` is False."""
        sched = with_scheduler(self.scheduler, scheduler, self.family.flow_samplers) if scheduler else self.scheduler
        cls = self.family.img2img if img2img else self.family.txt2img
        if cls is None:
            name = self.family.name
            edits = "; it edits references: generate --reference IMAGE" if self.family.condition == "reference" else ""
            raise Unsupported(f"diffusers has no image-to-image pipeline for {name} models: no reconstruct{edits}")
        pipe = cls(**self.family.pipeline_components(self.components, img2img), scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        getattr(self.components, self.family.denoiser).eval()
        return pipe.to(self.device) if device else pipe

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
        reference: Image.Image | list[Image.Image] | None = None,
        control: Image.Image | list[Image.Image] | None = None,
        image_guidance_scale: float | None = None,
    ) -> Output:
        """Text to image, or for an edit model the ``reference`` image(s) edited under the prompts, for a ControlNet
        drawn to the ``control`` image(s) (one for all prompts, or one per prompt; FLUX.2's references are the
        call's, every prompt drawing from all of them). Image *i* (prompt-major) is sampled
        with its own generator seeded ``seed + i``; steps and guidance (and an edit model's image guidance) default to
        the model's ``sampling``, the size to :meth:`default_resolution` (every family's pipeline default, which Sana's
        pipeline does not fill in itself; an edit model's is its reference's)."""
        steps, guidance = self.sampling_settings(num_inference_steps, guidance_scale)
        height, width = height or self.default_resolution(), width or self.default_resolution()
        images = self._condition_images(reference, control)
        extra = self._family_kwargs()
        if self.family.image_guidance:
            default = self.sampling.get(IMAGE_GUIDANCE, 1.5)
            extra[self.family.image_guidance] = default if image_guidance_scale is None else image_guidance_scale
        pipe = self.diffusers_pipeline(scheduler=scheduler)
        if images is not None and self.family.shared_references:  # the call's references, every prompt's
            extra["image"], images = images, None
        return txt2img(
            pipe, prompt, negative_prompt, num_images_per_prompt, steps, guidance, height, width, seed,
            progress=progress, unpack=self.family.pipeline_latents, encode=self.family.pipeline_prompts,
            guidance=self.family.guidance, latent_output=self.family.latent_output, images=images,
            image_argument=self.family.condition_argument, one_prompt_per_call=self.family.one_prompt_per_call,
            **extra,
        )  # fmt: skip

    def _condition_images(self, reference, control) -> list[Image.Image] | None:
        """The condition images of a generate call, checked against what the model takes.

        Raises:
            Unsupported: a reference for a model that edits none, a control image for one without a ControlNet, or
                none where the model needs one.
        """
        kind = self.family.condition
        for name, given in (("reference", reference), ("control", control)):
            if given is not None and kind != name:
                what = {"reference": "an edit model", "control": "a ControlNet"}[name]
                takes = f"takes a {kind} image" if kind else "is text-to-image"
                raise Unsupported(f"a {name} image is for {what}; this {self.family.name} model {takes}")
        given = reference if kind == "reference" else control
        given = [given] if isinstance(given, Image.Image) else list(given or [])
        if kind and not given and self.family.condition_required:
            raise Unsupported(f"this {self.family.name} model draws from a {kind} image: give one (--{kind} IMAGE)")
        return given or None

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
        steps, guidance = self.sampling_settings(num_inference_steps, guidance_scale)
        pipe = self.diffusers_pipeline(img2img=True, scheduler=scheduler)
        args = (pipe, prompt, image, strength, negative_prompt, steps, guidance, seed)
        family = self.family
        return img2img(*args, progress=progress, unpack=family.pipeline_latents, encode=family.pipeline_prompts,
                       guidance=family.guidance, **self._family_kwargs())  # fmt: skip

    def _family_kwargs(self) -> dict[str, Any]:
        """What the family's pipelines are called with beside the prompts (SD3: its T5 length)."""
        kwargs = self.family.sampling_kwargs
        return kwargs(self.components) if kwargs is not None else {}

    def save_pretrained(self, path: str | Path) -> Path:
        """A plain diffusers pipeline folder of the family's class, with this model's sampling defaults beside it."""
        self.diffusers_pipeline(device=False).save_pretrained(path, safe_serialization=True)
        write_sampling_defaults(path, **self.sampling)
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, scheduler: str | None = None):
        """Load a pipeline folder or hub id (ours or any of a family sdtrain trains), its sampling defaults, and, with
        ``scheduler``, another sampler on the same schedule."""
        check_model_source(path, "model")
        if Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
            raise ModelNotFound(f"{path} is not a pipeline folder (it has no model_index.json): give an export "
                                "(RUN/final, RUN/export/step-N) or a diffusers pipeline folder or hub id")  # fmt: skip
        family = detect(path)
        try:
            pipe = family.txt2img.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        except ImportError as e:  # a component's class needs a package (Qwen2VLProcessor: torchvision)
            raise MissingPackage(f"loading {path} ({family.txt2img.__name__}) needs a package that is not installed: "
                                 f"{str(e).strip().split('. ')[0]}") from e  # fmt: skip
        sched = with_scheduler(pipe.scheduler, scheduler, family.flow_samplers) if scheduler else pipe.scheduler
        sampling = read_sampling_defaults(path) if Path(path).is_dir() else None
        components = family.components_of(pipe)
        model = cls.from_components(components, family, sched, sampling=sampling, device=device)
        model.folder = Path(path) if Path(path).is_dir() else None
        return model

    @classmethod
    def from_components(cls, components, family: Family, scheduler=None, **kwargs):
        """An instance of ``cls`` over ``components`` (subclasses with another constructor, like the article's
        ``StableDiffusion``, are built through here)."""
        pipe = cls.__new__(cls)
        Pipeline.__init__(pipe, components, family, scheduler, **kwargs)
        return pipe

"""FID, KID and CLIP score of a text-to-image model against a user's image-caption pairs.

A fixed sample of the pairs (``num_images``, chosen by ``seed``; shards are read in order) is center-cropped to the
model's resolution, and the model draws one image per caption (image *i* seeded ``seed + i``, at the model's
exported sampling defaults unless given). Then:

- **FID** (Heusel et al. 2017) and **KID** (Binkowski et al. 2018: unbiased MMD with the cubic polynomial kernel,
  mean and standard deviation over subsets) between the two sets, through torchmetrics, on FID's own Inception-v3
  (:mod:`sdtrain.evaluate.inception`, features computed once and shared by both);
- **CLIP score** (Hessel et al. 2021): ``100 * max(cos(image, caption), 0)`` averaged over the generated images, and
  the same over the real images: the ceiling the data itself sets under that CLIP model.

A :class:`FidelityScorer` loads the scoring networks and reads the reference set once; :func:`evaluate_fidelity`
(``sdtrain evaluate``) scores one model with it, the training loop its EMA weights every ``train.fidelity.every``
steps.

FID is biased upward at small sample sizes and both depend on the resolution and the captions: compare numbers only
at the same ``num_images`` and data (papers report 10k or 30k COCO captions). Use held-out pairs: a training set
rewards memorising.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtrain.data.decode import Skip, SkipCounter, clean_caption
from sdtrain.data.sources import is_shards, list_records, shard_records
from sdtrain.data.transforms import load_pixels
from sdtrain.errors import MissingPackage, UserError
from sdtrain.evaluate.inception import load_inception
from sdtrain.models.hub import check_model_source
from sdtrain.sample.pipeline import Pipeline

logger = logging.getLogger(__name__)

METRICS = ("fid", "kid", "clip")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # the CLIP score of the SD / Imagen papers
GRID_PAIRS = 8


class EvaluationError(UserError, ValueError):
    """A request that cannot be scored (unknown metric, too little data, a scoring model not found), raised before
    any image is drawn where it can be known then."""


def _require_torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError as e:
        raise MissingPackage("FID / KID / CLIP score need torchmetrics: pip install 'sdtrain[metrics]'") from e


class _Features(torch.nn.Module):
    """torchmetrics' FID / KID call their feature network on what ``update`` gets: we hand them features computed
    once by the Inception network, so the two metrics do not run it twice."""

    num_features = 2048

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def reference_pairs(
    data: str | Path | Sequence[dict],
    count: int,
    resolution: int,
    seed: int = 0,
    image_column: str = "file_name",
    caption_column: str = "text",
    skipped: SkipCounter | None = None,
) -> Iterator[tuple[torch.Tensor, str]]:
    """Up to ``count`` (uint8 3 x H x W image center-cropped to ``resolution``, caption) pairs of a folder, manifest,
    Hugging Face dataset or webdataset shards, or of a list of records (``{"image", "caption"}``, as
    :func:`sdtrain.data.sources.list_records` gives); undecodable images and unusable captions are skipped and
    counted in ``skipped``. A caption list gives its first option. The source is opened (and a missing one reported)
    now."""
    raw = _raw_pairs(data, seed, image_column, caption_column)
    return _decoded(raw, count, resolution, SkipCounter() if skipped is None else skipped)


def _decoded(raw: Iterator[tuple[Any, Any]], count: int, resolution: int, skipped: SkipCounter):
    taken = 0
    for image, caption in raw:
        if taken >= count:
            return
        try:
            caption = clean_caption(caption[0] if isinstance(caption, list) and caption else caption)
            pixels = load_pixels(image, resolution)[0]
        except Skip as e:
            skipped[e.reason] += 1
            continue
        yield ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), caption
        taken += 1


def _raw_pairs(
    data: str | Path | Sequence[dict], seed: int, image_column: str, caption_column: str
) -> Iterator[tuple[Any, Any]]:
    """(image, caption) of a source in the order scored: shards as stored, indexable sources shuffled by ``seed``."""
    if not isinstance(data, (str, Path)):
        records: Sequence[dict] = data
    elif is_shards(str(data)):
        return ((r["image"], r["caption"]) for r in shard_records(str(data), caption_column))
    else:
        records = list_records(data, image_column, caption_column)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return ((records[i]["image"], records[i]["caption"]) for i in order)


class ClipScore:
    """CLIP score (Hessel et al. 2021): ``100 * max(cos(image embedding, caption embedding), 0)``, averaged.

    Our own few lines rather than torchmetrics' ``CLIPScore``, which reads ``get_image_features`` as a tensor where
    transformers 5 returns a model output; captions longer than the model's context are truncated, as CLIP's own
    tokenizer does.
    """

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.total, self.count = 0.0, 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, captions: list[str]) -> None:
        """Score uint8 N x 3 x H x W ``images`` against their ``captions``."""
        length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(
            text=captions,
            images=list(images.cpu()),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=length,
        ).to(self.model.device)
        image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _embedding(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        )
        cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        self.total += float((100 * cosine).clamp(min=0).sum())
        self.count += len(captions)

    def compute(self) -> float:
        return self.total / max(1, self.count)


def _embedding(output) -> torch.Tensor:
    # transformers 4 returns the projected embedding; 5 returns a model output holding it as pooler_output
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(name: str, device: torch.device):
    """A transformers CLIP model and its processor, from a hub id or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name).to(device).eval()
        processor = CLIPProcessor.from_pretrained(name)
    except OSError as e:
        raise EvaluationError(
            f"CLIP score needs a CLIP model; {name!r} could not be loaded ({e}). Pass a local folder or a hub id you "
            "have (--clip-model), or leave clip out of --metrics"
        ) from None
    return model, processor


def _to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


@dataclass
class Reference:
    """What the scores compare against, read once: the captions (the prompts), the first real images (for the
    grid), the real images' CLIP score, the resolution and the inputs skipped."""

    captions: list[str]
    shown: list[Image.Image]
    resolution: int
    clip_score_real: float | None
    skipped: dict[str, int]


class FidelityScorer:
    """FID / KID / CLIP score of models against one reference set; the scoring networks are loaded (and their
    weights checked) when it is built, the reference set's features computed once by :meth:`set_reference`, so a
    training run can score its model every N steps for the price of the generated images alone.

    Args:
        metrics: any of ``fid``, ``kid``, ``clip``.
        inception: FID's Inception weight file; default torch.hub's cache (downloaded there once when online).
        clip_model: the CLIP model of the CLIP score, a hub id or a folder.
        device: where the scoring networks run; default CUDA if available.

    Under torch.distributed (a training run launched on several processes) every process builds one and calls
    each method: the reference images and the drawn ones are shared out (image *i* is still seeded ``seed + i``),
    and the scores, gathered by torchmetrics and an all-reduce, are those of one process.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRICS,
        inception: str | Path | None = None,
        clip_model: str = DEFAULT_CLIP,
        device: str | torch.device | None = None,
    ):
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown or not metrics:
            raise EvaluationError(f"unknown metrics {unknown}: choose among {', '.join(METRICS)} (or shapes)")
        _require_torchmetrics()
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.clip_model = clip_model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank, self.world = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        )
        self.inception = self.clip = None
        self.distances: dict[str, Any] = {}  # the real features stay across reset(): only the drawn ones go
        if {"fid", "kid"} & set(metrics):
            try:
                self.inception = load_inception(inception)
            except FileNotFoundError as e:
                raise EvaluationError(str(e)) from None
            if "fid" in metrics:
                self.distances["fid"] = FrechetInceptionDistance(feature=_Features(), reset_real_features=False)
            if "kid" in metrics:
                with warnings.catch_warnings():  # that it keeps every feature (2048 floats an image): we know
                    warnings.filterwarnings("ignore", message=".*will save all extracted features")
                    self.distances["kid"] = KernelInceptionDistance(
                        feature=_Features(), subsets=100, reset_real_features=False
                    )
        if "clip" in metrics:
            self.clip = load_clip(clip_model, torch.device("cpu"))
        self.reference: Reference | None = None
        self.to(self.device)

    def to(self, device: str | torch.device) -> FidelityScorer:
        """Move the scoring networks and states (a training run parks them on the CPU between evaluations)."""
        self.device = torch.device(device)
        if self.inception is not None:
            self.inception.to(self.device)
        if self.clip is not None:
            self.clip[0].to(self.device)
        for metric in self.distances.values():
            metric.to(self.device)
        return self

    @torch.no_grad()
    def set_reference(
        self,
        data: str | Path | Sequence[dict],
        num_images: int,
        resolution: int,
        seed: int = 0,
        batch_size: int = 16,
        image_column: str = "file_name",
        caption_column: str = "text",
    ) -> Reference:
        """Read up to ``num_images`` pairs of ``data`` (see :func:`reference_pairs`; a list of records as well) and
        take in the real images' features; the captions are kept as the prompts."""
        if num_images < 2:
            raise EvaluationError("FID / KID / CLIP score need at least 2 images")
        skipped = SkipCounter()
        try:
            pairs = reference_pairs(data, num_images, resolution, seed, image_column, caption_column, skipped)
        except (FileNotFoundError, ValueError) as e:  # no such path, no images, a manifest without the image column
            raise EvaluationError(str(e)) from None
        for metric in self.distances.values():
            metric.reset_real_features = True
            metric.reset()
            metric.reset_real_features = False
        real_clip = ClipScore(*self.clip) if self.clip is not None else None
        captions: list[str] = []
        shown: list[Image.Image] = []
        while batch := [pair for _, pair in zip(range(batch_size * self.world), pairs)]:
            mine = batch[self.rank :: self.world]  # every process reads all the pairs and scores its share
            captions += [caption for _, caption in batch]
            shown += [Image.fromarray(image.permute(1, 2, 0).numpy()) for image, _ in batch[: GRID_PAIRS - len(shown)]]
            if not mine:
                continue
            real = torch.stack([image for image, _ in mine]).to(self.device)
            if self.inception is not None:
                features = self.inception(real)
                for metric in self.distances.values():
                    metric.update(features, real=True)
            if real_clip is not None:
                real_clip.update(real, [caption for _, caption in mine])
        if len(captions) < 2:
            raise EvaluationError(f"{data}: fewer than 2 usable image-caption pairs (skipped: {skipped.summary()})")
        if len(captions) < num_images:
            logger.warning("fidelity: the data held %d usable pairs of the %d asked for", len(captions), num_images)
        clip_real = self._mean(real_clip) if real_clip is not None else None
        self.reference = Reference(captions, shown, resolution, clip_real, dict(skipped))
        return self.reference

    @torch.no_grad()
    def score(
        self,
        pipe: Pipeline,
        out_dir: str | Path | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
        seed: int = 0,
        batch_size: int = 16,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Draw one image per reference caption with ``pipe`` (image *i* seeded ``seed + i``, at the reference
        resolution; steps and guidance default to the model's) and score them; with ``out_dir``, write
        ``fidelity.json`` (with ``extra`` added) and ``grid_fidelity.png`` there (real images above what the model drew
        for their captions).

        Returns:
            ``fid``, ``kid_mean`` / ``kid_std``, ``clip_score`` / ``clip_score_real`` (those asked for),
            ``num_images``, the skipped inputs by reason, and the sampling settings.
        """
        from sdtrain.sample.pipeline import make_grid, sampler_name

        if self.reference is None:
            raise EvaluationError("set_reference first: the scores compare against a reference set")
        ref = self.reference
        num_inference_steps, guidance_scale = pipe.sampling_settings(num_inference_steps, guidance_scale)
        for metric in self.distances.values():
            metric.reset()  # the drawn images' states; the reference's stay
        clip = ClipScore(*self.clip) if self.clip is not None else None
        drawn_shown: list[Image.Image] = []
        count = len(ref.captions)
        first, last = count * self.rank // self.world, count * (self.rank + 1) // self.world  # this process's share
        for start in range(first, last, batch_size):
            captions = ref.captions[start : min(start + batch_size, last)]
            drawn = pipe.generate(
                captions,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=ref.resolution,
                width=ref.resolution,
                seed=seed + start,
                scheduler=scheduler,
            ).images
            fake = _to_uint8(drawn).to(self.device)
            if self.inception is not None:
                features = self.inception(fake)
                for metric in self.distances.values():
                    metric.update(features, real=False)
            if clip is not None:
                clip.update(fake, captions)
            drawn_shown += drawn[: GRID_PAIRS - len(drawn_shown)]
            logger.info("fidelity: %d / %d images", start + len(captions) - first, last - first)
        result: dict[str, Any] = {}
        if "fid" in self.distances:
            result["fid"] = float(self.distances["fid"].compute())
        if "kid" in self.distances:
            kid = self.distances["kid"]
            kid.subset_size = min(1000, len(ref.captions))
            with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
                torch.manual_seed(seed)
                mean, std = kid.compute()
            result.update(kid_mean=float(mean), kid_std=float(std), kid_subset_size=kid.subset_size)
        if clip is not None:
            result.update(clip_score=self._mean(clip), clip_score_real=ref.clip_score_real, clip_model=self.clip_model)
        result.update(
            num_images=len(ref.captions),
            resolution=ref.resolution,
            skipped=ref.skipped,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            scheduler=scheduler or sampler_name(pipe.scheduler),
            seed=seed,
            **(extra or {}),
        )
        if out_dir is not None and self.rank == 0:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            pairs = list(zip(ref.shown, drawn_shown))
            columns = min(4, len(pairs))
            pairs = pairs[: len(pairs) // columns * columns]
            chunks = [pairs[start : start + columns] for start in range(0, len(pairs), columns)]
            rows = [image for chunk in chunks for row in zip(*chunk) for image in row]  # reals above, drawn below
            make_grid(rows, columns=columns).save(out_dir / "grid_fidelity.png")
            (out_dir / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
        return result

    def _mean(self, clip: ClipScore) -> float:
        """A CLIP score's mean over every process's images."""
        if self.world == 1:
            return clip.compute()
        sums = torch.tensor([clip.total, clip.count], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        return float(sums[0] / sums[1].clamp(min=1))


def evaluate_fidelity(
    model: str | Path | Pipeline,
    data: str | Path | Sequence[dict],
    out_dir: str | Path,
    metrics: Sequence[str] = METRICS,
    num_images: int = 1000,
    inception: str | Path | None = None,
    clip_model: str = DEFAULT_CLIP,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    scheduler: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    image_column: str = "file_name",
    caption_column: str = "text",
) -> dict[str, Any]:
    """Score a model against image-caption data; writes ``fidelity.json`` and ``grid_fidelity.png`` into ``out_dir``.

    Args:
        model: a pipeline folder (an sdtrain export or any Stable Diffusion folder / hub id), or a loaded
            :class:`~sdtrain.sample.pipeline.Pipeline` (a ``StableDiffusion`` after ``fit``, say).
        data: image-caption pairs: a folder, manifest, Hugging Face dataset or webdataset shards.
        metrics: any of ``fid``, ``kid``, ``clip``.
        num_images: pairs to read and images to draw (fewer if the data runs out).
        inception: FID's Inception weight file; default torch.hub's cache (downloaded there once when online).
        clip_model: the CLIP model of the CLIP score, a hub id or a folder.
        guidance_scale, num_inference_steps, scheduler: sampling; default the model's exported ones.
        batch_size: images drawn (and scored) at a time.
        seed: chooses the pairs and seeds the images.
        device: where everything runs; default the model's device, else CUDA if available (under ``accelerate
            launch``, each process's own device: the processes share the images out).

    Returns:
        What :meth:`FidelityScorer.score` returns, with the model and data named.
    """

    # 1. the scoring networks, the model and the reference set, before any image is drawn
    if num_images < 2:
        raise EvaluationError("FID / KID / CLIP score need at least 2 images")
    if isinstance(model, (str, Path)):
        check_model_source(model, "model")
    if isinstance(data, (str, Path)) and not is_shards(str(data)) and not str(data).startswith("hf:"):
        if not Path(data).exists():
            raise EvaluationError(f"{data}: no such file or folder (the reference image-caption pairs)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch` / torchrun: each process its share
        from accelerate import PartialState

        device = device or PartialState().device  # joins the process group
    if device is None:
        device = model.device if isinstance(model, Pipeline) else "cuda" if torch.cuda.is_available() else "cpu"
    scorer = FidelityScorer(metrics, inception, clip_model, device)
    if isinstance(model, Pipeline):
        pipe = model  # sampled where it is, with ``scheduler`` (if given) for this evaluation only
    else:
        pipe = Pipeline.from_pretrained(model, device=device, scheduler=scheduler)
        scheduler = None  # the loaded pipeline's own now
    resolution = pipe.default_resolution()
    scorer.set_reference(data, num_images, resolution, seed, batch_size, image_column, caption_column)
    # 2. draw and score
    named = {
        "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        "data": str(data) if isinstance(data, (str, Path)) else f"{len(data)} records",
        "processes": scorer.world,
    }
    return scorer.score(pipe, out_dir, guidance_scale, num_inference_steps, scheduler, seed, batch_size, named)

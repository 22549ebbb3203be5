"""The in-memory latent cache (``data.cache_latents``): each image of a small dataset encoded once (posterior mean and
std) and each distinct caption once, which is what makes small-data training on a CPU fast; and its stream. The
sharded on-disk cache for large datasets is :mod:`sdtrain.data.disk_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sdtrain.config import DataConfig
from sdtrain.data.buckets import condition_bucket_of
from sdtrain.data.captions import cached_captions
from sdtrain.data.decode import DataError, Skip, SkipCounter
from sdtrain.data.folder import EpochSampler, training_records
from sdtrain.data.streams import cached_batch, caption_choice, encode_conditions, encode_prompts, latent_masks
from sdtrain.data.transforms import load_pixels, stack_conditions
from sdtrain.models.families import Conditioning, Encoders
from sdtrain.models.vae import encode_moments
from sdtrain.objective import LOSS_MASK


@dataclass
class MemoryCache:
    """Posterior moments of every usable image and the embedding of every distinct caption (+ the empty prompt)."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[list[int]]  # per image, indices into `embeddings` of its caption options
    embeddings: Conditioning  # each: distinct captions first; the last row is the empty prompt's
    sizes: tuple[list, list]  # per image: original (height, width) and crop (top, left), for micro-conditioning
    target: tuple[int, int]  # the (height, width) every image was cropped to
    skipped: SkipCounter = field(default_factory=SkipCounter)
    masks: torch.Tensor | None = None  # per image, its loss mask at the latents' size (data.masked_loss)
    conditions: Conditioning | None = None  # per image, its condition images as the family encodes them
    empties: list[int] | None = None  # per image, its empty prompt's row where prompts are encoded seeing its images

    @property
    def empty(self) -> int:
        return next(iter(self.embeddings.values())).shape[0] - 1

    def __len__(self) -> int:
        return self.mean.shape[0]


@torch.no_grad()
def build_memory_cache(config: DataConfig, encoders: Encoders, batch_size: int = 64, seed: int = 0) -> MemoryCache:
    """Encode a folder dataset's training records once (center crop, no flip), skipping and counting bad samples;
    with ``data.masked_loss`` each image's mask too, averaged to its latents' size; with ``data.conditions`` its
    condition images, as the family encodes them; where the family's prompt encoding reads them
    (``Encoders.encode_text_seeing``), each image's caption options and empty prompt encoded with them."""
    records = training_records(config, seed)
    skipped = SkipCounter()
    texts: dict[str, int] = {}
    originals, crops = [], []
    captions: list[list[int]] = []
    means, stds, pending, masks, pending_masks = [], [], [], [], []
    conditions, pending_conditions = [], []
    seeing = encoders.encode_text_seeing is not None
    seen: list[Conditioning] = []  # with seeing: each flushed batch's prompts, encoded with their images
    pending_options: list[list[str]] = []
    empties: list[int] = []
    row = 0  # the next row of the embeddings seen so far
    own_size = condition_bucket_of(config)

    def encode_seeing(batches: list[torch.Tensor]) -> None:
        """The pending samples' caption options and empty prompt (their rows next), each with its sample's images."""
        nonlocal row
        texts, owners = [], []
        for i, options in enumerate(pending_options):
            captions.append(list(range(row, row + len(options))))
            empties.append(row + len(options))
            row += len(options) + 1
            texts += [*options, ""]
            owners += [i] * (len(options) + 1)
        which = torch.tensor(owners)
        seen.append({k: v.cpu() for k, v in encode_prompts(encoders, texts, [b[which] for b in batches]).items()})

    def flush() -> None:
        if pending:
            mean, std = encode_moments(encoders.vae, torch.stack(pending))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            if pending_masks:
                masks.append(latent_masks(torch.stack(pending_masks), mean).cpu())
            if pending_conditions:
                batches = stack_conditions(pending_conditions, len(config.conditions), ())
                conditions.append({k: v.cpu() for k, v in encode_conditions(encoders, batches, mean.device).items()})
                if seeing:
                    encode_seeing(batches)
            pending.clear()
            pending_masks.clear()
            pending_conditions.clear()
            pending_options.clear()

    for record in tqdm(records, desc="caching latents", unit="img", leave=False):
        try:
            options = cached_captions(record["caption"], config)
            pixels, info = load_pixels(record["image"], config.resolution, masked=config.masked_loss,
                                       conditions=record.get("conditions"), condition_bucket_of=own_size)  # fmt: skip
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        pending.append(pixels)
        if config.masked_loss:
            pending_masks.append(info["mask"])
        if "conditions" in info:
            pending_conditions.append(info["conditions"])
        if seeing:
            pending_options.append(options)
        else:
            captions.append([texts.setdefault(c, len(texts)) for c in options])
        originals.append(info["original_size"])
        crops.append(info["crop_top_left"])
        if len(pending) == batch_size:
            flush()
    flush()
    if not captions:
        raise DataError(f"no usable samples in {config.path} (skipped: {skipped.summary()})")
    if seeing:
        chunks = seen
    else:
        distinct = list(texts) + [""]
        chunks = [encoders.encode_text(distinct[i : i + 256]) for i in range(0, len(distinct), 256)]
    embeddings = {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}
    target = (config.resolution, config.resolution)
    encoded = {k: torch.cat([c[k] for c in conditions]) for k in conditions[0]} if conditions else None
    return MemoryCache(torch.cat(means), torch.cat(stds), captions, embeddings, (originals, crops), target, skipped,
                       torch.cat(masks) if masks else None, encoded, empties if seeing else None)  # fmt: skip


class MemoryCacheStream:
    """Micro-batches drawn from a MemoryCache in EpochSampler order (disjoint per rank)."""

    def __init__(
        self,
        cache: MemoryCache,
        encoders: Encoders,
        batch_size: int,
        caption_dropout: float,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        position: tuple[int, int] = (0, 0),
        condition_dropout: float = 0.0,
    ):
        self.cache, self.encoders, self.batch_size, self.caption_dropout = cache, encoders, batch_size, caption_dropout
        self.device = device
        self.sampler = EpochSampler(len(cache), seed, rank, world_size, *position)
        self.embeddings = {k: v.to(device) for k, v in cache.embeddings.items()}
        self.mean, self.std = cache.mean.to(device), cache.std.to(device)
        self.masks = None if cache.masks is None else cache.masks.to(device)
        self.conditions = None if cache.conditions is None else {k: v.to(device) for k, v in cache.conditions.items()}
        self.condition_dropout = condition_dropout
        self.seed = seed
        self.skipped = cache.skipped  # counted once, while caching

    def state(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "offset": self.sampler.offset}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sampler.epoch, self.sampler.offset = state["epoch"], state["offset"]

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        n = len(self.cache)
        encoded = self.sampler.take(self.batch_size)
        index = torch.tensor([e % n for e in encoded], device=self.device)
        text = torch.tensor([caption_choice(self.seed, e, self.cache.captions[e % n]) for e in encoded])
        cond = {k: v[text.to(self.device)] for k, v in self.embeddings.items()}
        if self.cache.empties is None:  # the one empty prompt
            empty = {k: v[self.cache.empty] for k, v in self.embeddings.items()}
        else:  # each sample's, encoded with its condition images
            rows = torch.tensor([self.cache.empties[e % n] for e in encoded], device=self.device)
            empty = {k: v[rows] for k, v in self.embeddings.items()}
        originals, crops = self.cache.sizes
        sizes = ([originals[e % n] for e in encoded], [crops[e % n] for e in encoded])
        args = (cond, empty, self.encoders, self.caption_dropout, draws, sizes, self.cache.target)
        conditions = None if self.conditions is None else {k: v[index] for k, v in self.conditions.items()}
        latents, cond = cached_batch(self.mean[index], self.std[index], *args, conditions, self.condition_dropout)
        return latents, cond if self.masks is None else cond | {LOSS_MASK: self.masks[index]}

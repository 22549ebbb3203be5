"""Map-style datasets over indexable sources (folders, manifests, Hugging Face datasets: sdtrain.data.sources) and
the resumable sampler; the transforms are :mod:`sdtrain.data.transforms`.

A caption may be a list of strings, one of which is chosen (seeded by the sample's epoch and index) each time the
sample is read.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sdtrain.config import ConfigError, DataConfig
from sdtrain.data.buckets import condition_bucket_of
from sdtrain.data.captions import training_caption
from sdtrain.data.decode import Skip, SkipCounter
from sdtrain.data.sources import list_records
from sdtrain.data.transforms import load_pixels, stack_conditions


def split_records(records: list[dict], holdout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(training, held out)``: ``holdout`` records chosen by ``seed``, the same on every rank and after a resume."""
    if holdout <= 0:
        return records, []
    if holdout >= len(records):
        count = len(records)
        raise ConfigError(f"data.validation_split={holdout} leaves no training images (the dataset has {count})")
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:holdout].tolist())
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def training_records(config: DataConfig, seed: int) -> list[dict]:
    """The records training reads: the folder less its validation split."""
    return split_records(_records(config, config.path), config.validation_split, seed)[0]


def validation_records(config: DataConfig, seed: int) -> list[dict]:
    """The held-out records: ``data.validation_path``, or the split of ``data.path``; empty when neither is set."""
    if config.validation_path:
        return _records(config, config.validation_path)
    if config.validation_split:
        return split_records(_records(config, config.path), config.validation_split, seed)[1]
    return []


def _records(config: DataConfig, path: str) -> list[dict]:
    return list_records(path, config.image_column, config.caption_column, config.skip_bad_rows, config.conditions)


class ImageCaptionFolder(Dataset):
    """Map-style dataset over an image folder. A bad sample is returned as ``{"skip": reason}`` and dropped by
    :func:`collate`, which counts it."""

    def __init__(self, config: DataConfig, seed: int = 0):
        self.config = config
        self.records = training_records(config, seed)
        self.seed = seed
        self.condition_bucket_of = condition_bucket_of(config)  # references at their own size, else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``index`` may be ``epoch * len(self) + i`` (as EpochSampler yields): crops, flips and the caption choice
        are then seeded by (seed, epoch, i), identical whatever the number of workers and after a resume."""
        record = self.records[index % len(self.records)]
        rng = random.Random(self.seed * 1_000_003 + index)
        c = self.config
        try:
            caption = training_caption(record["caption"], rng, c)
            pixels, info = load_pixels(record["image"], c.resolution, c.center_crop, c.random_flip, rng,
                                       masked=c.masked_loss, conditions=record.get("conditions"),
                                       condition_bucket_of=self.condition_bucket_of)  # fmt: skip
        except Skip as skip:
            return {"skip": skip.reason}
        return {"image": pixels, "text": caption, **info}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples; count bad ones under ``batch["skipped"]`` (a SkipCounter)."""
    good = [s for s in samples if "skip" not in s]
    skipped = SkipCounter(s["skip"] for s in samples if "skip" in s)
    if not good:
        return {"image": torch.empty(0), "text": [], "skipped": skipped}
    batch = {
        "image": torch.stack([s["image"] for s in good]),
        "text": [s["text"] for s in good],
        "original_size": [s["original_size"] for s in good],
        "crop_top_left": [s["crop_top_left"] for s in good],
        "skipped": skipped,
    }
    if "mask" in good[0]:
        batch["mask"] = torch.stack([s["mask"] for s in good])
    if "conditions" in good[0]:
        batch["conditions"] = stack_conditions([s["conditions"] for s in good], len(good[0]["conditions"]), ())
    return batch


class EpochSampler(Sampler[int]):
    """Endless, resumable sample order that does not depend on the number of processes.

    Epoch ``e`` is a permutation of the ``n`` samples seeded by ``(seed, e)``; the epochs laid end to end make one
    sequence, and of every ``world_size`` consecutive elements process ``rank`` takes the ``rank``-th. Together the
    processes take, micro-batch by micro-batch, exactly the samples one process takes, whatever ``n`` (and row ``j``
    of the world's micro-batch is the same sample as row ``j`` of one process's, as ``SharedDraws`` assumes).

    Yields ``e * n + i`` so that the dataset can seed its per-sample randomness from it. The position ``(epoch,
    offset)`` is where this process's next ``world_size`` elements start: ``k * world_size`` into the sequence after
    it took ``k``, so the same on every process that took as many. A resumed sampler continues with exactly the
    indices the uninterrupted one would have produced.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0, offset: int = 0):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch, self.offset = epoch, offset
        self._orders: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order of the ``n`` samples (the last two epochs' are kept)."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = torch.randperm(self.n, generator=generator).tolist()
        return self._orders[epoch]

    def _element(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        return epoch * self.n + self.permutation(epoch)[i]

    def advance(self, position: tuple[int, int], count: int) -> tuple[int, int]:
        """The position after this process takes ``count`` more samples from ``position``."""
        return divmod(position[0] * self.n + position[1] + count * self.world_size, self.n)

    def take(self, count: int) -> list[int]:
        """The next ``count`` indices, advancing this sampler's own position (used without a DataLoader)."""
        start = self.epoch * self.n + self.offset + self.rank
        out = [self._element(start + k * self.world_size) for k in range(count)]
        self.epoch, self.offset = self.advance((self.epoch, self.offset), count)
        return out

    def __iter__(self):
        position = self.epoch * self.n + self.offset + self.rank
        while True:
            yield self._element(position)
            position += self.world_size


def make_dataloader(
    config: DataConfig,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    position: tuple[int, int] = (0, 0),
) -> DataLoader:
    """An endless DataLoader over ``config.path`` starting at ``position = (epoch, samples into the epoch)``."""
    dataset = ImageCaptionFolder(config, seed)
    sampler = EpochSampler(len(dataset), seed, rank, world_size, *position)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=collate,
        persistent_workers=config.num_workers > 0,
    )

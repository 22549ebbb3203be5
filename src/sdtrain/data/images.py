"""Images without captions, for stage 1 (``sdtrain train-vae``): decoded, resized by the shorter side and
center-cropped to a square, as uint8 ``3 x R x R`` tensors.

Two batch sources, both resumable from a checkpoint's ``state()``:

- :class:`MemoryBatches` decodes the training set once and draws each batch's images at random (with replacement)
  from the run's generator: fast for sets that fit in memory (``R = 256``: 196 KB an image).
- :class:`StreamedBatches` reads the set epoch by epoch in :class:`~sdtrain.data.folder.EpochSampler`'s order,
  decoding in ``data.num_workers`` DataLoader workers: memory stays bounded whatever the set's size.

Bad files (corrupt, truncated, not an image, decompression bombs) are skipped and counted by reason, as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sdtrain.data.decode import DataError, Skip, SkipCounter
from sdtrain.data.folder import EpochSampler
from sdtrain.data.streams import check_bad_share
from sdtrain.data.transforms import load_pixels


class ImageRecords(Dataset):
    """``records[i]``'s image as uint8 ``3 x R x R``, or ``{"skip": reason}``; an index past the end wraps (as
    EpochSampler yields ``epoch * n + i``)."""

    def __init__(self, records: Sequence[dict], resolution: int):
        self.records, self.resolution = records, resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index % len(self.records)]
        try:
            pixels, _ = load_pixels(record["image"], self.resolution)
        except Skip as skip:
            return {"skip": skip.reason}
        return {"image": ((pixels + 1) * 127.5).round().to(torch.uint8)}


def collate_images(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, SkipCounter]:
    """The good samples stacked (``0 x 3 x R x R`` when none), and the bad ones counted."""
    good = [s["image"] for s in samples if "image" in s]
    skipped = SkipCounter(s["skip"] for s in samples if "skip" in s)
    return (torch.stack(good) if good else torch.empty(0, dtype=torch.uint8)), skipped


def decode_all(records: Sequence[dict], resolution: int, what: str = "images") -> tuple[torch.Tensor, SkipCounter]:
    """Every record's image in one uint8 ``N x 3 x R x R`` tensor, and the skipped ones counted."""
    dataset = ImageRecords(records, resolution)
    samples = [dataset[i] for i in tqdm(range(len(dataset)), desc=f"reading {what}", unit="img", leave=False)]
    images, skipped = collate_images(samples)
    if not len(images):
        raise DataError(f"no usable {what} (skipped: {skipped.summary() or 'none read'})")
    return images, skipped


class MemoryBatches:
    """Batches drawn at random, with replacement, from images decoded once."""

    def __init__(self, records: Sequence[dict], resolution: int, batch_size: int, generator: torch.Generator):
        self.images, self.skipped = decode_all(records, resolution, "training images")
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return len(self.images)

    def next(self) -> torch.Tensor:
        return self.images[torch.randint(0, len(self.images), (self.batch_size,), generator=self.generator)]

    def state(self) -> dict[str, Any]:
        return {}  # the generator's state (saved with the RNGs) is the position

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class StreamedBatches:
    """Batches read epoch by epoch from the records, decoded by DataLoader workers; a batch is short by the bad files
    it met (and drawn again when all were bad)."""

    def __init__(self, records: Sequence[dict], resolution: int, batch_size: int, seed: int, workers: int, bad: float):
        self.dataset, self.batch_size, self.seed, self.workers, self.max_bad_share = (
            ImageRecords(records, resolution), batch_size, seed, workers, bad,
        )  # fmt: skip
        self.skipped, self.read = SkipCounter(), 0
        self._start((0, 0))

    def __len__(self) -> int:
        return len(self.dataset)

    def _start(self, position: tuple[int, int]) -> None:
        self.position = position
        sampler = EpochSampler(len(self.dataset), self.seed, 0, 1, *position)
        # its own generator: a DataLoader draws its workers' base seed from torch's global RNG otherwise, and a
        # resumed run, which starts a loader after restoring that RNG, would then draw another posterior sample
        self.loader = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers,
            collate_fn=collate_images, persistent_workers=self.workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )  # fmt: skip
        self._batches = iter(self.loader)

    def next(self) -> torch.Tensor:
        while True:
            images, skipped = next(self._batches)
            self.position = self.loader.sampler.advance(self.position, self.batch_size)  # consumed, not prefetched
            self.skipped.update(skipped)
            self.read += len(images) + sum(skipped.values())
            check_bad_share(self.skipped, self.read, self.max_bad_share)
            if len(images):
                return images

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.position[0],
            "offset": self.position[1],
            "skipped": dict(self.skipped),
            "read": self.read,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.skipped, self.read = SkipCounter(state.get("skipped", {})), state.get("read", 0)
        self._start((state["epoch"], state["offset"]))

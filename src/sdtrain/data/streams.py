"""Batch streams for the training loop: the :class:`Stream` protocol, and the streams that decode and encode every step
(online from an indexable source, from webdataset shards), a weighted mix of streams, and any iterable (the Python
API). The latent caches' streams are :class:`sdtrain.data.memory_cache.MemoryCacheStream` and
:class:`sdtrain.data.disk_cache.DiskCacheStream`, built on :func:`cached_batch`.

Every stream yields ``(latents, conditioning)`` per micro-batch, with latents already in the denoiser's scaled space
and sampled from the autoencoder's posterior, the conditioning a dict of tensors as the model family encodes prompts
(:class:`sdtrain.models.families.Encoders`), and caption dropout applied. Every stream is resumable: ``state()``
returns the data position, and ``load_state`` continues with the same samples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from sdtrain.config import ConfigError, DataConfig
from sdtrain.data.decode import DataError, SkipCounter
from sdtrain.data.folder import make_dataloader
from sdtrain.data.shards import ShardDataset, ShardPosition, make_shard_loader
from sdtrain.models.families import Conditioning, Encoders
from sdtrain.models.vae import encode_moments, scale_latents
from sdtrain.objective import BASE_TARGET, LOSS_MASK, LOSS_WEIGHT


class Stream(Protocol):
    """A resumable source of micro-batches; what the training loop and checkpoints see of the data."""

    skipped: SkipCounter  # bad inputs by reason, for the log

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        """The next micro-batch: scaled latents and the conditioning, drawing randomness from ``draws``."""

    def state(self) -> dict[str, Any]:
        """The data position, for a checkpoint."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a position :meth:`state` returned."""


def drop_captions(texts: list[str], probability: float, draws) -> list[str]:
    """Replace each caption by the empty prompt with ``probability`` (classifier-free guidance training).

    ``draws`` is a :class:`sdtrain.train.randomness.SharedDraws` (one draw per sample of the global micro-batch)."""
    keep = draws.rand(len(texts)) >= probability  # drawn even at 0, so the random stream does not depend on it
    return [t if k else "" for t, k in zip(texts, keep.tolist())]


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, draws) -> torch.Tensor:
    """One sample of the diagonal Gaussian posterior per image."""
    return mean + std * draws.randn(tuple(mean.shape)).to(mean)


def size_condition(
    encoders: Encoders, sizes: tuple[list, list] | None, target: tuple[int, int], device
) -> Conditioning:
    """Each sample's geometry as the family conditions on it (SDXL's time ids; nothing for most families).

    Args:
        sizes: ``(original sizes, crop top-lefts)`` of the samples, ``(height, width)`` and ``(top, left)``.
        target: the ``(height, width)`` every sample of the batch was cropped to.
    """
    if encoders.encode_sizes is None or sizes is None:
        return {}
    return {k: v.to(device) for k, v in encoders.encode_sizes(*sizes, target).items()}


def cached_batch(
    mean: torch.Tensor,
    std: torch.Tensor,
    cond: Conditioning,
    empty: Conditioning,
    encoders: Encoders,
    caption_dropout: float,
    draws,
    sizes: tuple[list, list] | None = None,
    target: tuple[int, int] | None = None,
    conditions: Conditioning | None = None,
    condition_dropout: float = 0.0,
) -> tuple[torch.Tensor, Conditioning]:
    """A micro-batch from cached encodings, as both latent caches serve it: latents sampled from each image's
    posterior (``mean``, ``std``) and scaled, and the chosen captions' conditioning (``cond``) with caption dropout
    (each sample's replaced by the empty prompt's, ``empty``, with probability ``caption_dropout``), the samples'
    ``sizes`` cropped to ``target`` as the family conditions on them, and their encoded condition images
    (``conditions``) with :func:`drop_conditions`."""
    latents = scale_latents(encoders.vae, sample_posterior(mean, std, draws))
    keep = draws.rand(latents.shape[0]).to(latents.device) >= caption_dropout
    dropped = {}
    for k, value in cond.items():
        mask = keep.view(-1, *[1] * (value.ndim - 1))
        dropped[k] = torch.where(mask, value, empty[k].to(value))
    dropped |= size_condition(encoders, sizes, target or tuple(mean.shape[-2:]), latents.device)
    return latents, dropped | drop_conditions(conditions, condition_dropout, draws)


def drop_conditions(conditions: Conditioning | None, probability: float, draws) -> Conditioning:
    """Encoded condition images with each sample's replaced by the null condition (zeros: what InstructPix2Pix's
    image guidance samples against) with ``probability``, drawn from ``draws`` (one draw per sample, where there are
    conditions, even at 0); nothing where there are none."""
    if not conditions:
        return {}
    first = next(iter(conditions.values()))
    keep = draws.rand(first.shape[0]).to(first.device) >= probability
    return {k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v, torch.zeros_like(v)) for k, v in conditions.items()}


SEEING_CHUNK = 8  # prompts encoded at once with their images (a vision-language model's images are many tokens)


def encode_prompts(encoders: Encoders, texts: list[str], images: list[torch.Tensor] | None = None) -> Conditioning:
    """The samples' prompts as the family encodes them: with their condition images (one batch per data.conditions
    name, a row per prompt) where its encoding reads them (``Encoders.encode_text_seeing``), else alone."""
    if encoders.encode_text_seeing is None:
        return encoders.encode_text(texts)
    if not images:
        raise ConfigError("this model family encodes each prompt with its condition images: name them in "
                          "data.conditions")  # fmt: skip
    chunks = [encoders.encode_text_seeing(texts[i : i + SEEING_CHUNK], [b[i : i + SEEING_CHUNK] for b in images])
              for i in range(0, len(texts), SEEING_CHUNK)]  # fmt: skip
    return {k: torch.cat([c[k].float() for c in chunks]) for k in chunks[0]}


def encode_conditions(encoders: Encoders, images: list[torch.Tensor] | None, device) -> Conditioning | None:
    """Condition images (one B x 3 x H x W batch in [-1, 1] per ``data.conditions`` name) as the family encodes
    them (``Encoders.encode_conditions``), in fp32; None where there are none."""
    if not images:
        return None
    if encoders.encode_conditions is None:
        raise ConfigError("data.conditions names condition images, and this model family takes none")
    return {k: v.float() for k, v in encoders.encode_conditions([i.to(device) for i in images]).items()}


def caption_choice(seed: int, encoded: int, options: list):
    """The caption option of the sample drawn as ``encoded`` (EpochSampler's ``epoch * n + index``): seeded by it, as
    the folder dataset seeds its augmentation, so a resumed run and any number of processes choose alike."""
    return random.Random(seed * 1_000_003 + encoded).choice(options)


class _EncodingStream:
    """The streams that decode images and encode them every step: bad-sample accounting and encoding."""

    def __init__(
        self,
        config: DataConfig,
        encoders: Encoders,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.config, self.encoders = config, encoders
        self.batch_size, self.device, self.seed, self.rank, self.world_size = (
            batch_size,
            device,
            seed,
            rank,
            world_size,
        )
        self.skipped = SkipCounter()
        self.read = 0  # samples read (good + skipped), for data.max_bad_share
        self._batches: Iterator = iter(())

    def _consumed(self, batch: dict[str, Any]) -> None:
        """Advance the position past ``batch`` (the loader prefetches: only consumed batches count)."""
        raise NotImplementedError

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        while True:  # a batch whose samples were all skipped is drawn again
            batch = next(self._batches)
            self._consumed(batch)
            self.skipped.update(batch["skipped"])
            self.read += len(batch["text"]) + sum(batch["skipped"].values())
            check_bad_share(self.skipped, self.read, self.config.max_bad_share)
            if len(batch["text"]):
                break
        sizes = (batch["original_size"], batch["crop_top_left"])
        return encode_batch(
            batch["image"], batch["text"], self.encoders, self.config.caption_dropout, draws, self.device, sizes,
            batch.get("mask"), batch.get("conditions"), self.config.condition_dropout,
        )  # fmt: skip


class OnlineStream(_EncodingStream):
    """Micro-batches read from an indexable source (folder, manifest, dataset), encoded every step."""

    def __init__(self, *args, position: tuple[int, int] = (0, 0), **kwargs):
        super().__init__(*args, **kwargs)
        self._start(position)

    def _start(self, position: tuple[int, int]) -> None:
        self.position = position
        self.loader = make_dataloader(self.config, self.batch_size, self.seed, self.rank, self.world_size, position)
        self._batches = iter(self.loader)

    def state(self) -> dict[str, Any]:
        epoch, offset = self.position
        return {"epoch": epoch, "offset": offset, "skipped": dict(self.skipped), "read": self.read}

    def load_state(self, state: dict[str, Any]) -> None:
        self.skipped, self.read = SkipCounter(state.get("skipped", {})), state.get("read", 0)
        self._start((state["epoch"], state["offset"]))

    def _consumed(self, batch: dict[str, Any]) -> None:
        self.position = self.loader.sampler.advance(self.position, self.batch_size)


class ShardStream(_EncodingStream):
    """Micro-batches streamed from webdataset shards (sdtrain.data.shards), encoded every step; resumable."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._start(None)

    def _start(self, state: dict | None) -> None:
        workers = max(1, self.config.num_workers)
        self.position = ShardPosition(workers, state)
        dataset = ShardDataset(
            self.config, self.batch_size, self.seed, self.rank, self.world_size, workers,
            self.position.states, self.position.next_worker,
        )  # fmt: skip
        self.loader = make_shard_loader(dataset)
        self._batches = iter(self.loader)

    def state(self) -> dict[str, Any]:
        return {**self.position.state(), "skipped": dict(self.skipped), "read": self.read}

    def load_state(self, state: dict[str, Any]) -> None:
        self.skipped, self.read = SkipCounter(state.get("skipped", {})), state.get("read", 0)
        self._start(state)

    def _consumed(self, batch: dict[str, Any]) -> None:
        self.position.consumed(batch)


class MixedStream:
    """Several streams, each micro-batch drawn from one of them with probability proportional to its weight.

    The choice of the ``n``-th micro-batch is seeded by ``(seed, n)``: every rank makes the same choice, and a resumed
    run continues with the same sequence."""

    def __init__(self, streams: list, weights: list[float], seed: int = 0):
        self.streams, self.weights, self.seed, self.count = streams, weights, seed, 0

    @property
    def skipped(self) -> SkipCounter:
        total = SkipCounter()
        for stream in self.streams:
            total.update(stream.skipped)
        return total

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "streams": [s.state() for s in self.streams]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        for stream, sub in zip(self.streams, state["streams"]):
            stream.load_state(sub)

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        choice = random.Random(f"{self.seed}-mix-{self.count}").choices(range(len(self.streams)), self.weights)[0]
        self.count += 1
        return self.streams[choice].next(draws)


def source_weights(sources: list[DataConfig], sizes: list[int | None]) -> list[float]:
    """Each source's relative share of the micro-batches: the weights set, else its image count x its repeats (sizes:
    the images each holds, None for shards, which the config makes set a weight)."""
    if all(source.weight is not None for source in sources):
        return [float(source.weight) for source in sources]
    if len(sources) == 1:
        return [1.0]
    return [float(size * source.repeats) for source, size in zip(sources, sizes)]


class WeightedStream:
    """A stream whose samples carry loss terms of their source: their loss weight (``cond[LOSS_WEIGHT]``: DreamBooth's
    class images, a dataset's loss_weight) and whether their target is the frozen base's prediction
    (``cond[BASE_TARGET]``: a dataset's target=base)."""

    def __init__(self, stream, weight: float = 1.0, base_target: bool = False):
        self.stream, self.weight, self.base_target = stream, weight, base_target

    @property
    def skipped(self) -> SkipCounter:
        return self.stream.skipped

    def state(self) -> dict[str, Any]:
        return self.stream.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state(state)

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        latents, cond = self.stream.next(draws)
        ones = torch.ones((latents.shape[0],), device=latents.device)
        if self.weight != 1.0:
            cond = cond | {LOSS_WEIGHT: ones * float(self.weight)}
        return latents, cond | {BASE_TARGET: ones} if self.base_target else cond


def regroup_states(states: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """The stream states a checkpoint holds, one per process that wrote it, for ``world`` processes.

    A position in EpochSampler's shared order is where the world's next micro-batch starts: the same on every process
    and meaning the same whatever their number, so every new process starts from it and the run continues with the
    samples (and, with ``SharedDraws``, the noise and timesteps) of an uninterrupted run; the mix's draw count is
    shared likewise. The skip counts go to the new main process. Raises ValueError for what has no such position:
    webdataset shards (each process reads its own), the Python API's iterable, a disk cache's partly filled buckets.
    """
    if len(states) == world:
        return states
    first = states[0]
    if "streams" in first:  # a mix: regroup each source
        if len({s["count"] for s in states}) != 1:
            raise ValueError("the processes' mixes drew different numbers of micro-batches")
        sources = [regroup_states([s["streams"][i] for s in states], world) for i in range(len(first["streams"]))]
        return [{"count": first["count"], "streams": [source[r] for source in sources]} for r in range(world)]
    if "epoch" not in first:
        kind = "webdataset shards" if "workers" in first else "this data source"
        raise ValueError(f"{kind} cannot continue on another number of processes")
    if len({(s["epoch"], s["offset"]) for s in states}) != 1:
        raise ValueError("the processes stopped at different positions")
    if any(queue for s in states for queue in s.get("buffers", {}).values()):
        raise ValueError("the disk cache's size buckets hold samples taken but not yet trained on")
    skipped, read = SkipCounter(), 0
    for s in states:
        skipped.update(s.get("skipped", {}))
        read += s.get("read", 0)
    regrouped = []
    for rank in range(world):
        state = dict(first)
        if "skipped" in first:
            state["skipped"] = dict(skipped) if rank == 0 else {}
        if "read" in first:
            state["read"] = read if rank == 0 else 0
        regrouped.append(state)
    return regrouped


def check_bad_share(skipped: SkipCounter, read: int, max_share: float, minimum: int = 100) -> None:
    """Stop with a clear message when too much of the data is unusable (after ``minimum`` samples)."""
    bad = sum(skipped.values())
    if read >= minimum and bad > max_share * read:
        raise DataError(
            f"{bad} of the {read} samples read so far were skipped ({skipped.summary()}), more than "
            f"data.max_bad_share={max_share}: check the data (or raise the share)"
        )


def latent_masks(masks: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Loss masks (B x 1 x H x W in [0, 1]) at the size of ``latents``, each latent pixel the mean of the pixels it
    covers, on their device: what every stream and cache weighs the loss with."""
    return F.interpolate(masks.to(latents.device, torch.float32), size=latents.shape[-2:], mode="area")


def encode_batch(
    images: torch.Tensor,
    texts: list[str],
    encoders: Encoders,
    caption_dropout: float,
    draws,
    device: torch.device,
    sizes: tuple[list, list] | None = None,
    masks: torch.Tensor | None = None,
    conditions: list[torch.Tensor] | None = None,
    condition_dropout: float = 0.0,
) -> tuple[torch.Tensor, Conditioning]:
    """Pixels in [-1, 1] and captions -> scaled posterior-sampled latents and the conditioning: the prompts' and,
    from ``sizes`` (original sizes and crops; default: uncropped images of their own size), the samples' geometry;
    with ``masks`` (B x 1 x H x W in [0, 1], ``data.masked_loss``) their area means at the latents' size as
    ``cond[LOSS_MASK]``, which the objective weighs the loss with; with ``conditions`` (the condition images, a
    batch per name) their encoding with :func:`drop_conditions`."""
    mean, std = encode_moments(encoders.vae, images.to(device))
    latents = scale_latents(encoders.vae, sample_posterior(mean.float(), std.float(), draws))
    cond = encode_prompts(encoders, drop_captions(texts, caption_dropout, draws), conditions)
    target = tuple(images.shape[-2:])
    sizes = sizes or ([target] * len(texts), [(0, 0)] * len(texts))
    if masks is not None:
        cond = cond | {LOSS_MASK: latent_masks(masks, latents)}
    cond = cond | size_condition(encoders, sizes, target, latents.device)
    return latents, cond | drop_conditions(encode_conditions(encoders, conditions, device), condition_dropout, draws)


class IterableStream:
    """Micro-batches from any iterable of batches (the Python API's ``fit(dataloader=...)``), re-iterated when
    exhausted. A batch is a dict with ``image`` (B x 3 x H x W in [-1, 1], or a list of PIL images) and ``text``,
    an ``(images, texts)`` tuple, or already encoded: ``{"latents": ..., "cond": {...}}`` with the family's
    conditioning, or for Stable Diffusion ``{"latents": ..., "prompt_embeds": ...}``.

    With several processes each iterates the same iterable (as each would a plain DataLoader) and process ``rank``
    takes batches ``rank, rank + world_size, ...`` of it: the world trains on ``world_size`` batches a micro-batch.
    """

    def __init__(
        self, batches, encoders: Encoders, caption_dropout: float, device: torch.device, rank=0, world_size=1
    ):
        self.batches, self.encoders = batches, encoders
        self.caption_dropout, self.device, self.rank, self.world_size = caption_dropout, device, rank, world_size
        self.skipped = SkipCounter()  # the caller's iterable does its own decoding
        self._iter = iter(batches)
        self.consumed = 0  # batches of the iterable gone by, this process's and the others'

    def state(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state(self, state: dict[str, Any]) -> None:
        for _ in range(state.get("consumed", 0)):  # replay: an arbitrary iterable cannot seek
            self._pull()

    def _pull(self):
        try:
            batch = next(self._iter)
        except StopIteration:
            self._iter = iter(self.batches)
            batch = next(self._iter, None)
            if batch is None:  # a one-shot iterator (a generator) has run out
                raise ValueError(
                    f"the batches given to fit() ran out after {self.consumed}: a generator is read once, so give one "
                    "that yields every batch of the run, or a re-iterable (a list, a DataLoader)"
                ) from None
        self.consumed += 1
        return batch

    def _next_raw(self):
        """Of the iterable's next ``world_size`` batches, the ``rank``-th."""
        mine = None
        for k in range(self.world_size):
            batch = self._pull()
            if k == self.rank:
                mine = batch
        return mine

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        batch = self._next_raw()
        if isinstance(batch, dict) and "latents" in batch:
            # already encoded: latents in the denoiser's scaled space and the prompts' conditioning (no caption
            # dropout: put the empty prompt's encoding in the batch where you want it)
            if "cond" not in batch and "prompt_embeds" not in batch:
                raise ValueError("a batch with 'latents' needs 'cond' (or 'prompt_embeds', the text encoder's output)")
            # prompt_embeds: the name diffusers' pipelines give Stable Diffusion's encoder_hidden_states
            cond = batch["cond"] if "cond" in batch else {"encoder_hidden_states": batch["prompt_embeds"]}
            to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
            return to(batch["latents"]), {k: to(v) for k, v in cond.items()}
        images, texts = normalize_batch(batch)
        return encode_batch(images, texts, self.encoders, self.caption_dropout, draws, self.device)


def batch_size_of(batch) -> int:
    """The number of samples in a batch of any form :class:`IterableStream` accepts."""
    if isinstance(batch, dict) and "latents" in batch:
        return len(batch["latents"])
    images, _ = normalize_batch(batch)
    return images.shape[0]


def normalize_batch(batch) -> tuple[torch.Tensor, list[str]]:
    """Accept ``{"image": ..., "text": ...}`` dicts or ``(images, texts)`` tuples; PIL images become tensors."""
    if isinstance(batch, dict):
        if "image" not in batch or "text" not in batch:
            raise ValueError(f"a batch dict needs 'image' and 'text' keys, got {sorted(batch)}")
        images, texts = batch["image"], batch["text"]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        images, texts = batch
    else:
        raise ValueError("a batch must be a dict with 'image' and 'text' or an (images, texts) tuple")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not isinstance(images, torch.Tensor):
        import numpy as np

        images = torch.stack(
            [
                torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                for im in images
            ]
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} captions in a batch")
    return images.float(), texts

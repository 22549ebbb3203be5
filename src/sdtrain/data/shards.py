"""Streaming webdataset shards as img2dataset writes them (``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``).

Read with webdataset's tar iterator (no tar parser of ours) and decoded by our policy: no webdataset decoders, so
nothing is ever unpickled; members are read into memory, never extracted to disk (a member named ``../x`` is just a
key); ``pipe:`` URLs only with ``data.allow_pipe``; ``s3://`` and other fsspec URLs where the user has the filesystem.

**Order.** Epoch ``e`` permutes the shard list by ``(seed, e)``; rank ``r`` of ``R`` takes shards ``r::R`` and its
dataloader worker ``w`` of ``W`` takes ``w::W`` of those, so ranks and workers read disjoint shards that together are
all of them. A worker reads its shards in blocks of ``data.shuffle_buffer`` raw samples, shuffles each block with an
RNG seeded by ``(seed, e, r, w, block)``, reads each image's size from its header, puts the sample in the buffer of its
aspect bucket (one bucket, the square, without ``data.buckets``; with ``data.condition_resolution``, of its bucket and
its condition images' own buckets) and emits a batch when a buffer is full. Images are
decoded only then. Memory is bounded by one block plus one batch per bucket, whatever the dataset's size, and
nothing scans the dataset at start-up.

**Position.** Each batch carries its worker's state after it: epoch, the block being read and how far, and how many
samples each bucket buffer holds. A checkpoint keeps the newest state of every worker; on resume a worker re-reads
(headers only, nothing decoded or encoded) from the oldest block that still has a sample in a buffer to its position,
refills the buffers with exactly the samples they held, and goes on: the resumed run sees the same batches, in the
same order, as the uninterrupted one. Workers are renumbered so that the dataloader's round-robin continues with the
worker whose batch was due next.
"""

from __future__ import annotations

import itertools
import json
import logging
import lzma
import random
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdtrain.config import ConfigError, DataConfig
from sdtrain.data.buckets import condition_bucket_of, condition_buckets, config_buckets, nearest_bucket
from sdtrain.data.captions import training_caption
from sdtrain.data.decode import DataError, Skip, SkipCounter, probe_size
from sdtrain.data.transforms import check_aspect, load_pixels, stack_conditions
from sdtrain.errors import MissingPackage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif")
MASK_MEMBER = "mask.png"  # KEY.mask.png beside KEY.jpg: the sample's loss mask (data.masked_loss)

logger = logging.getLogger(__name__)


def _require_webdataset() -> None:
    try:
        import webdataset  # noqa: F401
    except ImportError as e:
        raise MissingPackage("reading webdataset shards needs webdataset: pip install 'sdtrain[data]'") from e


def expand_urls(spec: str) -> list[str]:
    """Comma- or ``::``-separated shard URLs, each brace-expanded (``{00000..00099}``)."""
    _require_webdataset()
    from braceexpand import braceexpand

    urls = []
    for part in re.split(r"::|,", spec):
        if part.strip():
            urls.extend(braceexpand(part.strip()))
    return urls


def open_shard(url: str, allow_pipe: bool = False):
    """A binary file object for a local path, ``file://``, an fsspec URL (``s3://``, ``gs://``, ...) or, only if
    allowed, a ``pipe:`` command."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(f"{url!r}: pipe: URLs run a shell command; set data.allow_pipe=true to allow them")
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a Windows drive letter is not a scheme
        return open(url[7:] if url.startswith("file://") else url, "rb")
    try:
        import fsspec
    except ImportError as e:
        raise MissingPackage(f"{url}: reading {scheme}:// URLs needs fsspec and its {scheme} filesystem") from e
    return fsspec.open(url, "rb").open()


SKIP = "__skip__"  # a raw sample that stands for something skipped: {"__key__": ..., SKIP: reason}
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as its tar iterator skips them
_TOO_LARGE = object()  # the value of a member left unread for its size
_BAD_SHARD = "__bad_shard__"  # the key of the member that stands for the end of a shard cut short
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


def _members(stream, url: str, max_member_bytes: int | None) -> Iterator[dict[str, Any]]:
    """The regular members of a tar stream (compressed or not: tarfile's ``r|*``) as webdataset's grouping wants
    them; a member whose header declares more than ``max_member_bytes`` is passed over unread. A stream that breaks
    off (cut in the middle of a member, not a tar file at all) ends with a ``_BAD_SHARD`` member, so that the sample
    read before the break is still grouped and yielded."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg() or _META.match(info.name):
                continue
            if max_member_bytes is not None and info.size > max_member_bytes:
                data = _TOO_LARGE
            else:
                data = tar.extractfile(info).read()
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # a stream has no index to keep
    except _READ_ERRORS as e:
        logger.warning("%s is cut short or not a tar file (%s): the samples before it were read", url, e)
        yield {"fname": f"{_BAD_SHARD}.txt", "data": str(e).encode(), "__url__": url}


def iterate_shard(url: str, allow_pipe: bool = False, max_member_mb: float | None = 32.0) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__": ..., ext: bytes}`` of one shard, grouped by key (webdataset's grouping).

    What cannot be used is a sample too, ``{"__key__": ..., SKIP: reason}``, so that every reader counts it where it
    counts its other skips (and a resumed reader, replaying, does not count it twice): a sample with a member over
    ``max_member_mb`` (``member_too_large``), and a shard that ends in the middle of a member or is not a tar file
    (``bad_shard``, after the samples read before the cut).
    """
    from webdataset.tariterators import group_by_keys

    limit = int(max_member_mb * 2**20) if max_member_mb is not None else None
    stream = open_shard(url, allow_pipe)
    try:
        for sample in group_by_keys(_members(stream, url, limit)):
            sample.pop("__url__", None)
            if sample["__key__"] == _BAD_SHARD:
                yield {"__key__": f"{url}#{_BAD_SHARD}", SKIP: "bad_shard"}
            elif any(value is _TOO_LARGE for value in sample.values()):
                yield {"__key__": sample["__key__"], SKIP: "member_too_large"}
            else:
                yield sample
    finally:
        stream.close()


def _field(sample: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
    """The member whose extension (webdataset's: all after the key's first dot) is or ends in one of these."""
    for ext in extensions:
        for name, value in sample.items():
            if name == ext or name.endswith("." + ext):
                return value
    return None


def sample_image(sample: dict[str, Any], conditions: Sequence[str] = ()) -> bytes | None:
    """A raw sample's encoded image (the first member with an image extension, its mask and its ``conditions``'
    members aside)."""
    aside = {MASK_MEMBER.split(".")[0], *conditions}
    return _field({k: v for k, v in sample.items() if _stem(k) not in aside}, IMAGE_EXTENSIONS)


def _stem(member: str) -> str:
    """What a member's extension names before its image suffix (``mask`` of ``mask.png``; ``""`` for ``png``)."""
    parts = member.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def sample_condition(sample: dict[str, Any], condition: str) -> bytes | None:
    """A raw sample's condition image ``condition`` (its ``KEY.<condition>.png`` member, any image suffix), or None."""
    return _field(sample, tuple(f"{condition}.{ext}" for ext in IMAGE_EXTENSIONS))


def sample_mask(sample: dict[str, Any]) -> bytes | None:
    """A raw sample's loss mask (its ``KEY.mask.png`` member), where it has one."""
    return _field(sample, (MASK_MEMBER,))


def sample_caption(sample: dict[str, Any], caption_column: str) -> object:
    """A raw sample's caption: its ``.txt``, else ``caption_column`` (or ``caption``) of its ``.json``, else None."""
    if _field(sample, ("txt",)) is not None:
        return _field(sample, ("txt",))
    if _field(sample, ("json",)) is not None:
        try:
            meta = json.loads(_field(sample, ("json",)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return meta.get(caption_column) or meta.get("caption") if isinstance(meta, dict) else None
    return None


class ShardDataset(IterableDataset):
    """Endless batches from webdataset shards, resumable (see the module docstring).

    Args:
        config: ``data.path`` holds the shard URLs; resolution, buckets, shuffle buffer, crop and flip settings.
        batch_size: samples per batch (per rank).
        seed, rank, world_size: the run's seed and this process's share.
        num_workers: the dataloader's worker count (1 for none), so states can be kept per worker.
        states: per (logical) worker, the state carried by the last batch consumed; None starts at epoch 0.
        first_worker: the logical worker whose batch the dataloader's round-robin should deliver first.
    """

    def __init__(
        self,
        config: DataConfig,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        states: dict[int, dict] | None = None,
        first_worker: int = 0,
    ):
        self.config, self.batch_size, self.seed, self.rank, self.world_size = (
            config,
            batch_size,
            seed,
            rank,
            world_size,
        )
        self.num_workers, self.states, self.first_worker = max(1, num_workers), states or {}, first_worker
        self.urls = expand_urls(config.path)
        if len(self.urls) < world_size * self.num_workers:
            raise ConfigError(
                f"{len(self.urls)} shards cannot feed {world_size} processes x {self.num_workers} dataloader workers: "
                "write more, smaller shards or use fewer workers"
            )
        self.buckets = config_buckets(config)
        self.condition_bucket_of = condition_bucket_of(config)
        own = [condition_buckets(config)] * len(config.conditions) if self.condition_bucket_of else []
        # what a batch holds one of: a bucket (width, height), and each condition image's own bucket after it
        self.groups = [sum(sizes, ()) for sizes in itertools.product(self.buckets, *own)]

    def shards(self, epoch: int, worker: int) -> list[str]:
        """This (rank, worker)'s shards in epoch ``epoch``."""
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        mine = [self.urls[i] for i in order.tolist()][self.rank :: self.world_size]
        return mine[worker :: self.num_workers]

    def _raw(self, epoch: int, worker: int, shard: int = 0, offset: int = 0) -> Iterator[tuple[int, int, dict]]:
        """``(shard index, sample index in shard, sample)`` from ``(shard, offset)`` to the end of the epoch."""
        for s, url in enumerate(self.shards(epoch, worker)[shard:], start=shard):
            for i, sample in enumerate(iterate_shard(url, self.config.allow_pipe, self.config.max_member_mb)):
                if s == shard and i < offset:
                    continue
                yield s, i, sample

    def _blocks(self, epoch: int, worker: int, start: tuple[int, int, int]) -> Iterator[tuple[int, tuple, list]]:
        """``(block index, (shard, offset) of its first sample, samples in shuffled order)`` from block ``start``."""
        block, shard, offset = start
        buffer, first = [], None
        for s, i, sample in self._raw(epoch, worker, shard, offset):
            if first is None:
                first = (s, i)
            buffer.append(sample)
            if len(buffer) == self.config.shuffle_buffer:
                yield block, first, self._shuffled(buffer, epoch, worker, block)
                block, buffer, first = block + 1, [], None
        if buffer:
            yield block, first, self._shuffled(buffer, epoch, worker, block)

    def _shuffled(self, buffer: list, epoch: int, worker: int, block: int) -> list:
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-{block}")  # str seeds are stable across runs
        order = list(range(len(buffer)))
        rng.shuffle(order)
        return [buffer[i] for i in order]

    def _group(self, sample: dict) -> tuple[int, ...]:
        """The sample's group from its images' headers: its bucket ``(width, height)``, and with
        data.condition_resolution each condition image's own bucket after it; raises Skip for unusable samples
        (counted by the caller)."""
        if SKIP in sample:
            raise Skip(sample[SKIP], sample["__key__"])
        data = sample_image(sample, self.config.conditions)
        if data is None:
            raise Skip("no_image", f"key {sample.get('__key__')!r} has no {'/'.join(IMAGE_EXTENSIONS)}")
        size = probe_size(data)
        check_aspect(size)
        group = nearest_bucket(size, self.buckets)
        for name in self.config.conditions if self.condition_bucket_of else ():
            condition = sample_condition(sample, name)
            if condition is None:
                raise Skip("no_condition", f"key {sample.get('__key__')!r} has no {name} image")
            try:
                own = probe_size(condition)
                check_aspect(own)
            except Skip as skip:
                raise Skip(f"condition_{skip.reason}", str(skip)) from None
            group += self.condition_bucket_of(own)
        return group

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info else (0, 1)
        if count != self.num_workers:
            raise RuntimeError(f"ShardDataset built for {self.num_workers} workers runs in {count}")
        worker = (physical + self.first_worker) % count  # logical worker: continues the round-robin after a resume
        state = self.states.get(worker)
        epoch = state["epoch"] if state else 0
        while True:
            yield from self._epoch(epoch, worker, state)
            epoch, state = epoch + 1, None

    def _epoch(self, epoch: int, worker: int, state: dict | None) -> Iterator[dict[str, Any]]:
        buffers: dict[tuple[int, ...], deque] = {g: deque() for g in self.groups}
        starts: dict[int, tuple[int, int]] = {}  # block -> (shard, offset) of its first sample, while referenced
        skipped = SkipCounter()
        resume_at = None
        if state:  # replay headers from the oldest buffered block to the position: the buffers refill exactly
            oldest = state["oldest"]
            resume_at = (state["block"], state["in_block"])
            start = tuple(oldest)
            keep = {tuple(b): n for b, n in state["buffers"]}
            buffers = {g: deque(maxlen=keep.get(g, 0)) for g in self.groups}
        else:
            start = (0, 0, 0)
        last_block, emitted = start[0] - 1, 0
        for block, first, samples in self._blocks(epoch, worker, start):
            starts[block], last_block = first, block
            begin = 0
            if resume_at is not None:
                replay_to = len(samples) if block < resume_at[0] else resume_at[1]
                for sample in samples[:replay_to]:
                    try:
                        buffers[self._group(sample)].append((block, sample))
                    except Skip:
                        pass  # counted before the checkpoint
                if block < resume_at[0]:
                    continue
                buffers = {b: deque(q) for b, q in buffers.items()}  # replay done: unbounded again
                resume_at, begin = None, replay_to
            for index in range(begin, len(samples)):
                sample = samples[index]
                try:
                    group = self._group(sample)
                except Skip as skip:
                    skipped[skip.reason] += 1
                    continue
                queue = buffers[group]
                queue.append((block, sample))
                if len(queue) == self.batch_size:
                    emitted += 1
                    batch = self._emit(epoch, group, [queue.popleft()[1] for _ in range(self.batch_size)], skipped)
                    skipped = SkipCounter()
                    batch["state"] = self._state(epoch, worker, block, index + 1, buffers, starts)
                    yield batch
        if state is None and not emitted and not any(buffers.values()):
            raise DataError(
                f"no usable sample in the shards of rank {self.rank}, worker {worker} ({skipped.summary()})"
            )
        for group in self.groups:  # epoch end: each bucket's remainder is one smaller batch
            queue = buffers[group]
            if not queue:
                continue
            batch = self._emit(epoch, group, [sample for _, sample in queue], skipped)
            skipped = SkipCounter()
            queue.clear()
            if any(buffers.values()):  # a resume replays the epoch's remaining headers and flushes the rest
                batch["state"] = self._state(epoch, worker, last_block + 1, 0, buffers, starts)
            else:
                batch["state"] = {"epoch": epoch + 1, "worker": worker, "block": 0, "in_block": 0,
                                  "oldest": (0, 0, 0), "buffers": []}  # fmt: skip
            yield batch

    def _state(self, epoch, worker, block, in_block, buffers, starts) -> dict[str, Any]:
        held = [q[0][0] for q in buffers.values() if q]
        oldest = min(held, default=block)
        for old in [b for b in starts if b < oldest]:
            del starts[old]
        return {
            "epoch": epoch,
            "worker": worker,
            "block": block,
            "in_block": in_block,
            "oldest": (oldest, *starts[oldest]),
            "buffers": [(list(b), len(q)) for b, q in buffers.items() if q],
        }

    def _emit(self, epoch: int, group: tuple[int, ...], samples: list[dict], skipped: SkipCounter) -> dict[str, Any]:
        """Decode and transform one group's samples into a batch; undecodable ones are dropped and counted."""
        bucket = group[:2]
        images, texts, sizes, crops, keys, masks, conds = [], [], [], [], [], [], []
        for sample in samples:
            key = sample.get("__key__", "")
            rng = random.Random(f"{self.seed}-{epoch}-{key}")  # crop and flip of this sample in this epoch
            try:
                # json may hold a list
                caption = training_caption(sample_caption(sample, self.config.caption_column), rng, self.config)
                image = sample_image(sample, self.config.conditions) or b""
                conditions = [sample_condition(sample, c) for c in self.config.conditions] or None
                pixels, info = load_pixels(image, bucket, self.config.center_crop, self.config.random_flip, rng,
                                           masked=self.config.masked_loss, mask=sample_mask(sample),
                                           conditions=conditions,
                                           condition_bucket_of=self.condition_bucket_of)  # fmt: skip
            except Skip as skip:
                skipped[skip.reason] += 1
                continue
            images.append(pixels)
            if "mask" in info:
                masks.append(info["mask"])
            if "conditions" in info:
                conds.append(info["conditions"])
            texts.append(caption)
            sizes.append(info["original_size"])
            crops.append(info["crop_top_left"])
            keys.append(key)
        image = torch.stack(images) if images else torch.empty(0, 3, bucket[1], bucket[0])
        batch = {"image": image, "text": texts, "original_size": sizes, "crop_top_left": crops, "key": keys,
                 "skipped": skipped}  # fmt: skip
        if masks:
            batch["mask"] = torch.stack(masks)
        if self.config.conditions:
            own = [(0, 3, h, w) for w, h in zip(group[2::2], group[3::2])]  # at their own size: empty batches' shapes
            batch["conditions"] = stack_conditions(conds, len(self.config.conditions), own or image.shape)
        return batch


def _identity(batch):
    return batch


def make_shard_loader(dataset: ShardDataset) -> DataLoader:
    """A DataLoader over a ShardDataset (batches are formed in the workers)."""
    workers = dataset.num_workers if dataset.config.num_workers > 0 else 0
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, collate_fn=_identity, persistent_workers=workers > 0
    )


class ShardPosition:
    """The main process's view of a shard stream's position: the newest state of each worker and which is next."""

    def __init__(self, num_workers: int, state: dict | None = None):
        self.num_workers = max(1, num_workers)
        self.states: dict[int, dict] = {int(k): v for k, v in (state or {}).get("workers", {}).items()}
        self.next_worker: int = (state or {}).get("next_worker", 0)

    def consumed(self, batch: dict[str, Any]) -> None:
        s = batch["state"]
        self.states[s["worker"]] = s
        self.next_worker = (s["worker"] + 1) % self.num_workers

    def state(self) -> dict[str, Any]:
        return {"workers": {str(k): v for k, v in self.states.items()}, "next_worker": self.next_worker}

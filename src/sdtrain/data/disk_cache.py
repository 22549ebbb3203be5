"""The on-disk latent cache: ``sdtrain cache`` encodes a dataset once, training reads it instead of the images.

Layout of ``data.cache_dir``::

    fingerprint.json                 what made it: hashes of the VAE and text-encoder weights, tokenizer length,
                                     resolution, crop, bucket set, the layout's version
    empty.safetensors                the empty prompt's conditioning (caption dropout), a tensor per key
    part-r000-00000.safetensors      up to 256 samples of one bucket (and, with data.condition_resolution, one
                                     bucket per condition image): posterior mean and std (fp16), every caption
                                     option's conditioning (fp16, ``cond.<key>``: for Stable Diffusion
                                     ``cond.encoder_hidden_states``) with per-sample offsets, the encoded condition
                                     images (``condition.<key>``); keys and sizes in the metadata
    rank-000.json                    written last by each process: its parts (each with its size and sha256) and
                                     skip counts

Under ``accelerate launch`` each process encodes its own share (records ``r::R``, or shards ``r::R``) and writes its
own files; nobody waits for anybody, so no collective can time out however long encoding takes. The cache is
complete when every ``rank-*.json`` of the announced world size exists. Training recomputes the fingerprint from its
own config and models and refuses a cache that differs (another VAE, text encoder, resolution or bucket set), and
checks every part against its size and sha256 when it opens the cache (``data.cache_verify``): a damaged part is
refused before the first step, and ``sdtrain cache`` encodes the damaged process's share again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from tqdm.auto import tqdm

from sdtrain.config import DataConfig
from sdtrain.data.buckets import condition_bucket_of, condition_buckets, config_buckets, nearest_bucket
from sdtrain.data.captions import cached_captions
from sdtrain.data.decode import DataError, Skip, SkipCounter
from sdtrain.data.folder import EpochSampler, training_records
from sdtrain.data.sources import is_shards, shard_records
from sdtrain.data.streams import cached_batch, caption_choice, encode_conditions, encode_prompts, latent_masks
from sdtrain.data.transforms import load_pixels, stack_conditions
from sdtrain.models.families import Conditioning, Encoders
from sdtrain.models.hashing import file_sha256, model_hash
from sdtrain.models.vae import encode_moments
from sdtrain.objective import LOSS_MASK

logger = logging.getLogger(__name__)

PART_SIZE = 256
LAYOUT = 3  # 3: crops in the metadata; 2: the conditioning as a dict of tensors (cond.<key>); 1: one embeds tensor


def fingerprint(config: DataConfig, encoders: Encoders) -> dict[str, Any]:
    """Everything a cached latent or embedding depends on."""
    return {
        "vae": model_hash(encoders.vae),
        **encoders.text_identity(),
        "layout": LAYOUT,
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "buckets": [list(b) for b in config_buckets(config)],
        **({"trigger": config.trigger} if config.trigger else {}),  # in the cached captions' embeddings
        **({"masked_loss": True} if config.masked_loss else {}),  # the parts hold masks
        **({"conditions": _conditions(config, encoders)} if config.conditions else {}),  # and their encoding
        **({"condition_buckets": [list(b) for b in condition_buckets(config)]} if config.condition_resolution else {}),
    }


def _conditions(config: DataConfig, encoders: Encoders) -> dict[str, Any]:
    """The condition images' names and who encodes them: each family encodes its own way (InstructPix2Pix's unscaled
    latents, Kontext's scaled ones, a ControlNet's pixels), and a cache of one is not another's."""
    encode = encoders.encode_conditions
    by = f"{encode.__module__}.{encode.__qualname__}" if encode is not None else None
    return {"names": list(config.conditions), "encoded_by": by}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _records(config: DataConfig, seed: int, rank: int, world: int):
    """This process's share of the raw samples: ``(key, image, caption, encoded mask or None, condition images or
    None)``."""
    if is_shards(config.path):
        for r in shard_records(
            config.path, config.caption_column, config.allow_pipe, rank, world, config.max_member_mb, config.conditions
        ):
            yield r["key"], r["image"], r["caption"], r["mask"], r.get("conditions")
    else:
        records = training_records(config, seed)
        for index in range(rank, len(records), world):
            record = records[index]
            yield str(index), record["image"], record["caption"], None, record.get("conditions")


def _size(pixels: torch.Tensor) -> tuple[int, int]:
    """The ``(width, height)`` of C x H x W pixels, as buckets are written."""
    return pixels.shape[2], pixels.shape[1]


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """Embeddings are stored in fp16; token ids and masks (trained text encoders) as they are."""
    return tensor.half() if tensor.is_floating_point() else tensor


def _served(tensor: torch.Tensor) -> torch.Tensor:
    """Embeddings are served in fp32; token ids and masks as they are."""
    return tensor.float() if tensor.is_floating_point() else tensor


@torch.no_grad()
def _write_part(
    root: Path, name: str, group: tuple[tuple[int, int], ...], rows: list[dict], encoders: Encoders
) -> dict:
    """Encode one group's rows (an image bucket, and a bucket per condition image at its own size) and write them
    as ``root/name.safetensors``; returns the part's index record."""
    bucket, own = group[0], group[1:]
    mean, std = encode_moments(encoders.vae, torch.stack([r["pixels"] for r in rows]))
    tensors = {"mean": mean.half(), "std": std.half()}
    if "mask" in rows[0]:  # data.masked_loss: each sample's mask at its latents' size
        tensors["mask"] = latent_masks(torch.stack([r["mask"] for r in rows]), mean).half()
    batches = None
    if "conditions" in rows[0]:  # data.conditions: each sample's condition images, as the family encodes them
        batches = stack_conditions([r["conditions"] for r in rows], len(rows[0]["conditions"]), ())
        encoded = encode_conditions(encoders, batches, mean.device)
        tensors |= {f"condition.{k}": v.half() for k, v in encoded.items()}
    options = [c for r in rows for c in r["captions"]]
    owner = torch.tensor([i for i, r in enumerate(rows) for _ in r["captions"]])  # each option's sample

    def encode(texts: list[str], samples: torch.Tensor) -> Conditioning:  # with their samples' images where seen
        images = None if batches is None else [b[samples] for b in batches]
        chunks = [encode_prompts(encoders, texts[i : i + 64], images and [b[i : i + 64] for b in images])
                  for i in range(0, len(texts), 64)]  # fmt: skip
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    offsets = torch.tensor([0] + [len(r["captions"]) for r in rows]).cumsum(0)
    tensors |= {f"cond.{k}": _stored(v) for k, v in encode(options, owner).items()} | {"offsets": offsets}
    if encoders.encode_text_seeing is not None:  # each sample's empty prompt, encoded with its images
        tensors |= {f"empty.{k}": _stored(v) for k, v in encode([""] * len(rows), torch.arange(len(rows))).items()}
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    meta = {"keys": json.dumps([r["key"] for r in rows]), "bucket": json.dumps(list(bucket)),
            "original_size": json.dumps([r["original_size"] for r in rows]),
            "crop_top_left": json.dumps([r["crop_top_left"] for r in rows])}  # fmt: skip
    data = save(tensors, metadata=meta)  # a part is small (PART_SIZE samples): hashed as it is written
    _write_atomic(root / f"{name}.safetensors", lambda p: p.write_bytes(data))
    record = {"file": f"{name}.safetensors", "count": len(rows), "bucket": list(bucket)}
    if own:  # data.condition_resolution: the condition images' own buckets
        record["condition_buckets"] = [list(b) for b in own]
    return record | {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _part_problem(root: Path, part: dict, sha256: bool) -> str | None:
    """What is wrong with a written part (missing, cut short, a changed byte, an unreadable header), or None. A
    part indexed without its size and sha256 (an older cache) has its header checked."""
    path = root / part["file"]
    if not path.is_file():
        return f"{part['file']} is missing"
    size = path.stat().st_size
    if "size" in part and size != part["size"]:
        return f"{part['file']} has {size} bytes, its index says {part['size']}"
    if sha256 and "sha256" in part:
        return None if file_sha256(path) == part["sha256"] else f"{part['file']} does not match its sha256"
    try:
        with safe_open(str(path), "pt"):
            return None
    except Exception as e:  # safetensors' own error for a cut or garbled header
        return f"{part['file']} is unreadable ({e})"


def damaged_parts(root: Path, parts: list[dict], sha256: bool = True) -> list[str]:
    """What is wrong with each damaged part among ``parts`` (hashed on several threads)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = pool.map(lambda part: _part_problem(root, part, sha256), parts)
        return [problem for problem in problems if problem]


def _rank_record(root: Path, rank: int) -> dict | None:
    """Process ``rank``'s index (``rank-RRR.json``), None where it is unreadable."""
    try:
        record = json.loads((root / f"rank-{rank:03d}.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("parts"), list) else None


def _rebuild_note(rank: int) -> str:
    return (
        f"run `sdtrain cache` with this run's config to encode process {rank}'s share again (only that share), "
        f"or point data.cache_dir elsewhere"
    )


@torch.no_grad()
def write_cache(config: DataConfig, encoders: Encoders, seed: int = 0, rank: int = 0, world_size: int = 1) -> Path:
    """Encode this process's share of ``config`` into ``config.cache_dir`` (see the module docstring)."""
    root = Path(config.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    done = root / f"rank-{rank:03d}.json"
    if done.exists():
        record = _rank_record(root, rank)
        problems = ["its index is unreadable"] if record is None else damaged_parts(root, record["parts"])
        if not problems:
            return root  # this share is already cached, intact
        logger.warning("the cache's share of process %d is damaged (%s): encoding it again", rank, "; ".join(problems))
        for stale in root.glob(f"part-r{rank:03d}-*.safetensors"):
            stale.unlink()
        done.unlink()
    stamp = {**fingerprint(config, encoders), "world_size": world_size}
    fp = root / "fingerprint.json"
    if fp.exists() and json.loads(fp.read_text()) != stamp:
        raise DataError(f"{root} holds a cache made with other settings or models; choose another data.cache_dir")
    _write_atomic(fp, lambda p: p.write_text(json.dumps(stamp, indent=1)))
    if rank == 0:
        seeing = encoders.encode_text_seeing is not None  # then each part holds its samples' empty prompts
        empty = {} if seeing else {k: _stored(v[0]).cpu().contiguous() for k, v in encoders.encode_text([""]).items()}
        _write_atomic(root / "empty.safetensors", lambda p: save_file(empty, p))
    buckets = config_buckets(config)
    bucket_of, own_size = partial(nearest_bucket, buckets=buckets), condition_bucket_of(config)
    pending: dict[tuple[tuple[int, int], ...], list] = {}  # by image bucket and condition images' own buckets
    parts, skipped = [], SkipCounter()
    records = _records(config, seed, rank, world_size)
    for key, image, caption, mask, conditions in tqdm(records, desc="caching", unit="img"):
        try:
            options = cached_captions(caption, config)
            pixels, info = load_pixels(image, config.resolution, bucket_of=bucket_of, masked=config.masked_loss,
                                       mask=mask, conditions=conditions, condition_bucket_of=own_size)  # fmt: skip
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        group = (_size(pixels),) + (tuple(_size(c) for c in info["conditions"]) if config.condition_resolution else ())
        rows = pending.setdefault(group, [])
        rows.append({"key": key, "pixels": pixels, "captions": options, **info})
        if len(rows) == PART_SIZE:
            parts.append(_write_part(root, f"part-r{rank:03d}-{len(parts):05d}", group, rows, encoders))
            pending[group] = []
    for group in sorted(pending, key=lambda g: (buckets.index(g[0]), g[1:])):  # the remainders, in bucket order
        if pending[group]:
            parts.append(_write_part(root, f"part-r{rank:03d}-{len(parts):05d}", group, pending[group], encoders))
    record = {"parts": parts, "skipped": dict(skipped), "samples": sum(p["count"] for p in parts)}
    _write_atomic(done, lambda p: p.write_text(json.dumps(record, indent=1)))
    return root


def check_cache(config: DataConfig, thorough: bool = True) -> dict[int, dict]:
    """The indexes of a complete cache in ``data.cache_dir``, by process, each part checked as ``data.cache_verify``
    says (sha256: every byte read; size: lengths and headers), or, not ``thorough``, by size and header alone (the
    check before a run folder is made; opening the cache checks again as asked).

    Raises:
        DataError: no cache there, an unfinished one, or a damaged part, with what to do.
    """
    root = Path(config.cache_dir)
    try:
        world = json.loads((root / "fingerprint.json").read_text())["world_size"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DataError(f"{root} is not a latent cache: run `sdtrain cache` with this config first") from None
    missing = [r for r in range(world) if not (root / f"rank-{r:03d}.json").exists()]
    if missing:
        raise DataError(
            f"the cache in {root} is incomplete: processes {missing} have not finished; run `sdtrain cache` with "
            "this config (as many processes as before) to finish it"
        )
    records = {}
    for rank in range(world):
        record = _rank_record(root, rank)
        problems = ["its index is unreadable"] if record is None else None
        problems = problems or damaged_parts(root, record["parts"], thorough and config.cache_verify == "sha256")
        if problems:
            raise DataError(f"the cache in {root} is damaged: {'; '.join(problems)}; {_rebuild_note(rank)}")
        records[rank] = record
    return records


class DiskCache:
    """A complete, intact cache (:func:`check_cache`), verified against the training run's fingerprint; sample ``i``
    is ``(part, row)``."""

    def __init__(self, config: DataConfig, encoders: Encoders):
        self.root = Path(config.cache_dir)
        records = check_cache(config)
        stamp = json.loads((self.root / "fingerprint.json").read_text())
        stamp.pop("world_size")
        expected = fingerprint(config, encoders)
        differ = sorted(k for k in expected if stamp.get(k) != expected[k])
        if differ:
            raise DataError(
                f"the cache in {self.root} differs from this run in: {', '.join(differ)}; rebuild it with "
                "`sdtrain cache` or point data.cache_dir elsewhere"
            )
        self.parts, self.index, self.skipped = [], [], SkipCounter()
        for record in records.values():
            self.skipped.update(record["skipped"])
            for part in record["parts"]:
                self.parts.append(part)
                self.index += [(len(self.parts) - 1, row) for row in range(part["count"])]
        if not self.index:
            raise DataError(f"the cache in {self.root} holds no samples (skipped: {self.skipped.summary()})")
        with safe_open(str(self.root / "empty.safetensors"), "pt") as f:
            self.empty: Conditioning = {k: f.get_tensor(k) for k in f.keys()}
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def bucket(self, i: int) -> tuple[int, int]:
        return tuple(self.parts[self.index[i][0]]["bucket"])

    def group(self, i: int) -> str:
        """What sample ``i`` batches with: its bucket (``WxH``), and its condition images' own buckets."""
        part = self.parts[self.index[i][0]]
        return "x".join(str(side) for size in [part["bucket"], *part.get("condition_buckets", [])] for side in size)

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[Conditioning], tuple, tuple]:
        """``(mean, std, the conditioning of each caption option, original (height, width), crop (top, left))`` of
        sample ``i``; :meth:`mask` its loss mask."""
        part, row = self.index[i]
        f, originals, crops = self._part(part)
        start, stop = f.get_slice("offsets")[row : row + 2].tolist()
        cond = {k.removeprefix("cond."): f.get_slice(k)[start:stop] for k in f.keys() if k.startswith("cond.")}
        options = [{k: v[j] for k, v in cond.items()} for j in range(stop - start)]
        mean, std = f.get_slice("mean")[row : row + 1][0], f.get_slice("std")[row : row + 1][0]
        return mean, std, options, tuple(originals[row]), tuple(crops[row])

    def empty_of(self, i: int) -> Conditioning | None:
        """Sample ``i``'s empty prompt, encoded with its condition images (a family whose prompt encoding reads
        them), else None: the cache's one empty prompt."""
        part, row = self.index[i]
        f = self._part(part)[0]
        keys = [k for k in f.keys() if k.startswith("empty.")]
        return {k.removeprefix("empty."): f.get_slice(k)[row : row + 1][0] for k in keys} if keys else None

    def mask(self, i: int) -> torch.Tensor | None:
        """Sample ``i``'s loss mask at its latents' size (a cache made with data.masked_loss), else None."""
        part, row = self.index[i]
        f = self._part(part)[0]
        return f.get_slice("mask")[row : row + 1][0] if "mask" in f.keys() else None

    def conditions(self, i: int) -> Conditioning | None:
        """Sample ``i``'s encoded condition images (a cache made with data.conditions), else None."""
        part, row = self.index[i]
        f = self._part(part)[0]
        keys = [k for k in f.keys() if k.startswith("condition.")]
        return {k.removeprefix("condition."): f.get_slice(k)[row : row + 1][0] for k in keys} if keys else None

    def _part(self, part: int) -> tuple[Any, list, list]:
        """Part ``part``'s open file, original sizes and crops (opened once)."""
        if part not in self._open:
            f = safe_open(str(self.root / self.parts[part]["file"]), "pt")
            meta = f.metadata()
            self._open[part] = (f, json.loads(meta["original_size"]), json.loads(meta["crop_top_left"]))
        return self._open[part]


class DiskCacheStream:
    """Micro-batches from a DiskCache in EpochSampler order, one bucket per batch (and one bucket per condition image
    at its own size); resumable."""

    def __init__(
        self, cache: DiskCache, encoders: Encoders, batch_size, caption_dropout, device, seed=0, rank=0, world_size=1,
        condition_dropout: float = 0.0,
    ):  # fmt: skip
        self.cache, self.encoders, self.batch_size, self.caption_dropout = cache, encoders, batch_size, caption_dropout
        self.condition_dropout = condition_dropout
        self.device, self.seed = device, seed
        self.sampler = EpochSampler(len(cache), seed, rank, world_size)
        self.buffers: dict[str, list[int]] = {}
        self.skipped = cache.skipped  # counted while caching
        self.empty = {k: _served(v).to(device) for k, v in cache.empty.items()}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "offset": self.sampler.offset, "buffers": self.buffers}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sampler.epoch, self.sampler.offset = state["epoch"], state["offset"]
        self.buffers = {k: list(v) for k, v in state.get("buffers", {}).items()}

    def next(self, draws) -> tuple[torch.Tensor, Conditioning]:
        n = len(self.cache)
        while True:  # fill per-bucket buffers in sampler order until one holds a batch
            (encoded,) = self.sampler.take(1)
            group = self.cache.group(encoded % n)
            queue = self.buffers.setdefault(group, [])
            queue.append(encoded)
            if len(queue) == self.batch_size:
                chosen, self.buffers[group] = queue, []
                break
        means, stds, texts, originals, crops = [], [], [], [], []
        for e in chosen:
            mean, std, options, original, crop = self.cache.read(e % n)
            means.append(mean)
            stds.append(std)
            texts.append(caption_choice(self.seed, e, options))
            originals.append(original)
            crops.append(crop)
        mean = torch.stack(means).to(self.device).float()
        std = torch.stack(stds).to(self.device).float()
        cond = {k: _served(torch.stack([t[k] for t in texts]).to(self.device)) for k in texts[0]}
        empty = self.empty
        if not empty:  # each sample's own, encoded with its condition images
            stored = [self.cache.empty_of(e % n) for e in chosen]
            empty = {k: _served(torch.stack([s[k] for s in stored]).to(self.device)) for k in stored[0]}
        width, height = self.cache.bucket(chosen[0] % n)
        args = (empty, self.encoders, self.caption_dropout, draws, (originals, crops), (height, width))
        stored = [self.cache.conditions(e % n) for e in chosen]
        conditions = None if stored[0] is None else {
            k: torch.stack([c[k] for c in stored]).to(self.device).float() for k in stored[0]
        }  # fmt: skip
        latents, cond = cached_batch(mean, std, cond, *args, conditions, self.condition_dropout)
        masks = [self.cache.mask(e % n) for e in chosen]
        if masks[0] is None:
            return latents, cond
        return latents, cond | {LOSS_MASK: torch.stack(masks).to(self.device).float()}

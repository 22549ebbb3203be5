"""The on-disk latent cache: ``sdtrain cache`` encodes a dataset once, training reads it instead of the images.

Layout of ``data.cache_dir``::

    fingerprint.json                 what made it: hashes of the VAE and text-encoder weights, tokenizer length,
                                     resolution, crop, bucket set
    empty.safetensors                the empty prompt's embedding (caption dropout)
    part-r000-00000.safetensors      up to 256 samples of one bucket: posterior mean and std (fp16), every
                                     caption option's embedding (fp16) with per-sample offsets; keys and sizes in
                                     the metadata
    rank-000.json                    written last by each process: its parts and skip counts

Under ``accelerate launch`` each process encodes its own share (records ``r::R``, or shards ``r::R``) and writes its
own files; nobody waits for anybody, so no collective can time out however long encoding takes. The cache is
complete when every ``rank-*.json`` of the announced world size exists. Training recomputes the fingerprint from its
own config and models and refuses a cache that differs (another VAE, text encoder, resolution or bucket set).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdtrain.config import DataConfig
from sdtrain.data.buckets import config_buckets, nearest_bucket
from sdtrain.data.decode import Skip, SkipCounter, caption_options, decode_image
from sdtrain.data.folder import SHARED_ORDER, EpochSampler, resize_crop, sampler_position, training_records
from sdtrain.data.sources import is_shards
from sdtrain.models.text import encode_prompts
from sdtrain.models.vae import encode_moments, scale_latents

PART_SIZE = 256


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's class, config and every weight (names and bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
        digest.update(
            json.dumps({k: v for k, v in items if not k.startswith("_")}, sort_keys=True, default=str).encode()
        )
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(config: DataConfig, vae, text_encoder, tokenizer) -> dict[str, Any]:
    """Everything a cached latent or embedding depends on."""
    return {
        "vae": model_hash(vae),
        "text_encoder": model_hash(text_encoder),
        "max_length": tokenizer.model_max_length,
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "buckets": [list(b) for b in config_buckets(config)],
    }


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _records(config: DataConfig, seed: int, rank: int, world: int):
    """This process's share of the raw samples: ``(key, image, caption)``."""
    if is_shards(config.path):
        from sdtrain.data.shards import expand_urls, iterate_shard, sample_caption, sample_image

        for url in expand_urls(config.path)[rank::world]:
            for sample in iterate_shard(url, config.allow_pipe):
                caption = sample_caption(sample, config.caption_column)
                yield sample.get("__key__", ""), sample_image(sample) or b"", caption
    else:
        records = training_records(config, seed)
        for index in range(rank, len(records), world):
            record = records[index]
            yield str(index), record["image"], record["caption"]


@torch.no_grad()
def _write_part(
    root: Path, name: str, bucket: tuple[int, int], rows: list[dict], vae, text_encoder, tokenizer
) -> dict:
    """Encode one bucket's rows and write them as ``root/name.safetensors``; returns the part's index record."""
    device = text_encoder.device
    mean, std = encode_moments(vae, torch.stack([r["pixels"] for r in rows]).to(device))
    options = [c for r in rows for c in r["captions"]]
    embeds = torch.cat([encode_prompts(text_encoder, tokenizer, options[i : i + 64], device) for i in
                        range(0, len(options), 64)])  # fmt: skip
    offsets = torch.tensor([0] + [len(r["captions"]) for r in rows]).cumsum(0)
    tensors = {"mean": mean.half(), "std": std.half(), "embeds": embeds.half(), "offsets": offsets}
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    meta = {"keys": json.dumps([r["key"] for r in rows]), "bucket": json.dumps(list(bucket)),
            "original_size": json.dumps([r["original_size"] for r in rows])}  # fmt: skip
    _write_atomic(root / f"{name}.safetensors", lambda p: save_file(tensors, p, metadata=meta))
    return {"file": f"{name}.safetensors", "count": len(rows), "bucket": list(bucket)}


@torch.no_grad()
def write_cache(
    config: DataConfig, vae, text_encoder, tokenizer, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Path:
    """Encode this process's share of ``config`` into ``config.cache_dir`` (see the module docstring)."""
    root = Path(config.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    done = root / f"rank-{rank:03d}.json"
    if done.exists():
        return root  # this share is already cached
    stamp = {**fingerprint(config, vae, text_encoder, tokenizer), "world_size": world_size}
    fp = root / "fingerprint.json"
    if fp.exists() and json.loads(fp.read_text()) != stamp:
        raise ValueError(f"{root} holds a cache made with other settings or models; choose another data.cache_dir")
    _write_atomic(fp, lambda p: p.write_text(json.dumps(stamp, indent=1)))
    device = text_encoder.device
    if rank == 0:
        empty = encode_prompts(text_encoder, tokenizer, [""], device).half().cpu()
        _write_atomic(root / "empty.safetensors", lambda p: save_file({"embedding": empty[0].contiguous()}, p))
    buckets = config_buckets(config)
    pending: dict[tuple[int, int], list] = {b: [] for b in buckets}
    parts, skipped = [], SkipCounter()
    for key, image, caption in tqdm(_records(config, seed, rank, world_size), desc="caching", unit="img"):
        try:
            options = caption_options(caption)
            decoded = decode_image(image, cover=(config.resolution, config.resolution))
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        bucket = nearest_bucket(decoded.info.get("original_size", decoded.size), buckets)
        pixels, info = resize_crop(decoded, bucket, center_crop=True, flip=False)
        pending[bucket].append({"key": key, "pixels": pixels, "captions": options,
                                "original_size": info["original_size"]})  # fmt: skip
        if len(pending[bucket]) == PART_SIZE:
            parts.append(_write_part(root, f"part-r{rank:03d}-{len(parts):05d}", bucket, pending[bucket],
                                     vae, text_encoder, tokenizer))  # fmt: skip
            pending[bucket] = []
    for bucket in buckets:
        if pending[bucket]:
            parts.append(_write_part(root, f"part-r{rank:03d}-{len(parts):05d}", bucket, pending[bucket],
                                     vae, text_encoder, tokenizer))  # fmt: skip
    record = {"parts": parts, "skipped": dict(skipped), "samples": sum(p["count"] for p in parts)}
    _write_atomic(done, lambda p: p.write_text(json.dumps(record, indent=1)))
    return root


class DiskCache:
    """A complete cache, verified against the training run's fingerprint; sample ``i`` is ``(part, row)``."""

    def __init__(self, config: DataConfig, vae, text_encoder, tokenizer):
        self.root = Path(config.cache_dir)
        fp = self.root / "fingerprint.json"
        if not fp.exists():
            raise FileNotFoundError(f"{self.root} is not a latent cache: run `sdtrain cache` with this config first")
        stamp = json.loads(fp.read_text())
        world = stamp.pop("world_size")
        expected = fingerprint(config, vae, text_encoder, tokenizer)
        differ = sorted(k for k in expected if stamp.get(k) != expected[k])
        if differ:
            raise ValueError(
                f"the cache in {self.root} differs from this run in: {', '.join(differ)}; rebuild it with "
                "`sdtrain cache` or point data.cache_dir elsewhere"
            )
        missing = [r for r in range(world) if not (self.root / f"rank-{r:03d}.json").exists()]
        if missing:
            raise ValueError(f"the cache in {self.root} is incomplete: processes {missing} have not finished")
        self.parts, self.index, self.skipped = [], [], SkipCounter()
        for r in range(world):
            record = json.loads((self.root / f"rank-{r:03d}.json").read_text())
            self.skipped.update(record["skipped"])
            for part in record["parts"]:
                self.parts.append(part)
                self.index += [(len(self.parts) - 1, row) for row in range(part["count"])]
        if not self.index:
            raise ValueError(f"the cache in {self.root} holds no samples (skipped: {self.skipped.summary()})")
        with safe_open(str(self.root / "empty.safetensors"), "pt") as f:
            self.empty = f.get_tensor("embedding")
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def bucket(self, i: int) -> tuple[int, int]:
        return tuple(self.parts[self.index[i][0]]["bucket"])

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """``(mean, std, caption embeddings)`` of sample ``i``."""
        part, row = self.index[i]
        if part not in self._open:
            self._open[part] = safe_open(str(self.root / self.parts[part]["file"]), "pt")
        f = self._open[part]
        offsets = f.get_slice("offsets")[row : row + 2].tolist()
        embeds = f.get_slice("embeds")[offsets[0] : offsets[1]]
        return f.get_slice("mean")[row : row + 1][0], f.get_slice("std")[row : row + 1][0], list(embeds)


class DiskCacheStream:
    """Micro-batches from a DiskCache in EpochSampler order, one bucket per batch; resumable."""

    def __init__(self, cache: DiskCache, vae, batch_size, caption_dropout, device, seed=0, rank=0, world_size=1):
        self.cache, self.vae, self.batch_size, self.caption_dropout = cache, vae, batch_size, caption_dropout
        self.device, self.seed = device, seed
        self.sampler = EpochSampler(len(cache), seed, rank, world_size)
        self.buffers: dict[str, list[int]] = {}
        self.skipped = cache.skipped  # counted while caching
        self.empty = cache.empty.float().to(device)

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.sampler.epoch,
            "offset": self.sampler.offset,
            "order": SHARED_ORDER,
            "buffers": self.buffers,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sampler.epoch, self.sampler.offset = sampler_position(self.sampler, state)
        self.buffers = {k: list(v) for k, v in state.get("buffers", {}).items()}

    def next(self, draws) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.cache)
        while True:  # fill per-bucket buffers in sampler order until one holds a batch
            (encoded,) = self.sampler.take(1)
            bucket = "x".join(map(str, self.cache.bucket(encoded % n)))
            queue = self.buffers.setdefault(bucket, [])
            queue.append(encoded)
            if len(queue) == self.batch_size:
                chosen, self.buffers[bucket] = queue, []
                break
        means, stds, texts = [], [], []
        for e in chosen:
            mean, std, options = self.cache.read(e % n)
            means.append(mean)
            stds.append(std)
            texts.append(random.Random(self.seed * 1_000_003 + e).choice(options))
        mean = torch.stack(means).to(self.device).float()
        std = torch.stack(stds).to(self.device).float()
        latents = scale_latents(self.vae, mean + std * draws.randn(tuple(mean.shape)).to(mean))
        cond = torch.stack(texts).to(self.device).float()
        keep = (draws.rand(len(chosen)).to(self.device) >= self.caption_dropout).view(-1, 1, 1)
        return latents, torch.where(keep, cond, self.empty)

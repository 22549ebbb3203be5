"""Data loading throughput, against plain baselines run in the same process.

    python bench/data_loading.py            # 1,500 JPEGs of mixed sizes, resolution 256

1. Decode + resize + crop, images/s of one worker: sdtrain's shard stream (webdataset shards, our decode policy,
   block shuffle, buckets off) vs a plain PIL + torch DataLoader (``Image.open().convert("RGB")``, resize by the
   shorter side, center crop, to tensor) over the same images as files.
2. Training steps/s of a tiny model from the in-memory latent cache vs encoding every batch online.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


def write_corpus(root: Path, n: int) -> tuple[str, Path]:
    """The same JPEGs as webdataset shards (img2dataset layout) and as a folder with .txt sidecars."""
    import webdataset as wds

    rng = random.Random(0)
    folder = root / "folder"
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=250, verbose=0) as sink:
        for i in range(n):
            w, h = rng.choice([(512, 512), (640, 480), (480, 640), (800, 600), (384, 512)])
            array = np.random.default_rng(i).integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(array).resize((w, h), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
            key = f"{i:06d}"
            sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": f"image {i}", "json": json.dumps({"i": i})})
            (folder / f"{key}.jpg").write_bytes(buffer.getvalue())
            (folder / f"{key}.txt").write_text(f"image {i}")
    shards = sorted(root.glob("*.tar"))
    return str(root / f"{{00000..{len(shards) - 1:05d}}}.tar"), folder


class PlainFolder(Dataset):
    """What a plain PIL + torch loader does."""

    def __init__(self, folder: Path, resolution: int):
        self.files, self.resolution = sorted(folder.glob("*.jpg")), resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = Image.open(self.files[i]).convert("RGB")
        scale = self.resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return tensor, self.files[i].with_suffix(".txt").read_text()


def plain_rate(folder: Path, resolution: int, n: int, batch: int) -> float:
    loader = DataLoader(PlainFolder(folder, resolution), batch_size=batch, num_workers=0, shuffle=True)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
        if seen >= n:
            break
    return seen / (time.perf_counter() - start)


def shard_rate(spec: str, resolution: int, n: int, batch: int) -> float:
    from sdtrain.config import DataConfig
    from sdtrain.data.shards import ShardDataset

    dataset = ShardDataset(DataConfig(path=spec, resolution=resolution, shuffle_buffer=500), batch)
    start, seen = time.perf_counter(), 0
    for b in dataset:
        seen += b["image"].shape[0]
        if seen >= n:
            break
    return seen / (time.perf_counter() - start)


def training_rates() -> tuple[float, float]:
    """images/s of a tiny UNet trained from the latent cache and online (folder of 64 px images)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtrain.config import Config, load_config
    from sdtrain.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        for i in range(64):
            Image.new("RGB", (64, 64), (4 * i, 100, 200)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(f"colour {i}")
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
        )
        vae.save_pretrained(root / "vae")
        vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
        vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
        CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(root / "clip" / "tokenizer")
        config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
        CLIPTextModel(config).save_pretrained(root / "clip" / "text_encoder")
        rates = []
        for cached in (True, False):
            out = root / f"run-{cached}"
            overrides = [
                f"train.output_dir={out}", f"data.path={data}", "data.resolution=64", f"model.vae.path={root / 'vae'}",
                f"model.text_encoder.path={root / 'clip'}", "model.text_encoder.subfolder=text_encoder",
                "model.unet.block_out_channels=[32, 64]", "model.unet.attention=[false, true]",
                f"data.cache_latents={str(cached).lower()}", "train.batch_size=16", "train.num_steps=60",
                "train.log_every=20", "train.save_every=1000", "train.trackers=[]", "train.export=false",
            ]  # fmt: skip
            train(load_config(Config, None, overrides))
            records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
            rates.append(float(np.mean([r["images_per_s"] for r in records[1:]])))
        return rates[0], rates[1]


def main() -> None:
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(1)  # one worker's worth of compute, both sides
    n, resolution, batch = 1500, 256, 16
    with tempfile.TemporaryDirectory() as tmp:
        spec, folder = write_corpus(Path(tmp), n)
        plain_rate(folder, resolution, 64, batch)  # warm the page cache for both
        ours = shard_rate(spec, resolution, n, batch)
        plain = plain_rate(folder, resolution, n, batch)
    print(f"decode + resize + crop, one worker, {resolution} px: shards {ours:.0f} img/s, plain PIL folder "
          f"{plain:.0f} img/s, ratio {ours / plain:.2f}")  # fmt: skip
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cached, online = training_rates()
    print(f"training, tiny UNet, 64 px batch 16: cached latents {cached:.0f} img/s, online encoding {online:.0f} "
          f"img/s, ratio {cached / online:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

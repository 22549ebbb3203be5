"""Folder and metadata.jsonl sources, the decoding policy, transforms, the resumable sampler."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.config import DataConfig
from sdtrain.data.decode import Skip, decode_image
from sdtrain.data.folder import EpochSampler, ImageCaptionFolder, collate, make_dataloader
from sdtrain.data.streams import drop_captions, normalize_batch
from sdtrain.data.transforms import resize_crop
from tests.conftest import write_image_folder


@pytest.mark.parametrize("manifest", [False, True], ids=["txt-sidecars", "metadata.jsonl"])
def test_folder_yields_rgb_tensors_and_captions(tmp_path, manifest):
    root = write_image_folder(tmp_path / "d", count=6, manifest=manifest)
    loader = make_dataloader(DataConfig(path=str(root), resolution=16), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert all(t.startswith("a ") and t.endswith(" square") for t in batch["text"])
    assert batch["original_size"][0] == (32, 40)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "d", count=4)
    (root / "003.png").write_bytes(b"")  # zero bytes
    (root / "002.png").write_bytes(b"not an image at all")
    (root / "001.txt").write_text("   ")  # empty caption
    data = ImageCaptionFolder(DataConfig(path=str(root), resolution=16))
    batch = collate([data[i] for i in range(len(data))])
    assert len(batch["text"]) == 1
    assert dict(batch["skipped"]) == {"empty": 1, "not_an_image": 1, "empty_caption": 1}


def test_metadata_caption_lists_pick_one(tmp_path):
    root = write_image_folder(tmp_path / "d", count=2, manifest=True)
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["text"] = ["first", "second"]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = ImageCaptionFolder(DataConfig(path=str(root), resolution=16))
    seen = {data[i]["text"] for i in range(40)}
    assert seen == {"first", "second"}


def test_decode_policy_converts_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    buffer = io.BytesIO()
    gray16.save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    buffer = io.BytesIO()
    cmyk.save(buffer, "JPEG")
    assert decode_image(buffer.getvalue()).mode == "RGB"


def test_oversized_image_refused_from_header():
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, "PNG")
    with pytest.raises(Skip) as info:
        decode_image(buffer.getvalue(), max_pixels=1_000_000)
    assert info.value.reason == "too_large"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (10, 20)


def test_resize_crop_shorter_side_and_flip():
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None], (20, 1, 3)))
    pixels, info = resize_crop(image, 10, center_crop=True)
    assert pixels.shape == (3, 10, 10)
    assert info["crop_top_left"] == (0, 5)
    import random

    flipped, info = resize_crop(image, 10, center_crop=True, flip=True, rng=random.Random(1))
    assert info["flipped"] and torch.equal(flipped, pixels.flip(-1))


def test_epoch_sampler_resumes_and_shards():
    full = EpochSampler(10, seed=3)
    first = full.take(7)
    later = full.take(9)
    resumed = EpochSampler(10, seed=3, epoch=0, offset=7)
    assert resumed.take(9) == later
    assert sorted(x % 10 for x in first + later[:3]) == list(range(10))  # epoch 0 is a permutation
    ranks = [EpochSampler(10, seed=3, rank=r, world_size=2).take(5) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))


@pytest.mark.parametrize("n", [5, 6, 7])
def test_processes_together_take_what_one_process_takes(n):
    """Whatever the dataset size, the world's micro-batches are one process's, row for row, across epochs: the
    two processes' rows interleave to the one process's sequence; so do the DataLoader iterators."""
    one = EpochSampler(n, seed=1)
    ranks = [EpochSampler(n, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):  # micro-batches of 2 per process, 4 for the world: epochs end mid-batch
        expected = one.take(4)
        rows = [ranks[0].take(2), ranks[1].take(2)]
        assert [x for pair in zip(*rows) for x in pair] == expected
    assert ranks[0].epoch * n + ranks[0].offset == 16  # positions agree: 8 samples each, 2 processes
    iterators = [iter(EpochSampler(n, seed=1, rank=r, world_size=2, epoch=0, offset=4)) for r in range(2)]
    resumed = [next(iterators[r % 2]) for r in range(6)]
    assert resumed == EpochSampler(n, seed=1, epoch=0, offset=4).take(6)


def test_caption_dropout_rate():
    from sdtrain.train.randomness import SharedDraws

    dropped = drop_captions(["x"] * 2000, 0.25, SharedDraws(torch.Generator().manual_seed(0)))
    assert 0.2 < dropped.count("") / 2000 < 0.3


def test_normalize_batch_accepts_tuples_and_pil():
    images = [Image.new("RGB", (8, 8), (255, 0, 0))] * 2
    tensor, texts = normalize_batch((images, ["a", "b"]))
    assert tensor.shape == (2, 3, 8, 8) and texts == ["a", "b"]
    assert torch.allclose(tensor[:, 0], torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="captions"):
        normalize_batch({"image": tensor, "text": ["a"]})


def test_a_run_stops_when_too_much_data_is_bad(tmp_path, clip_dir, vae_dir):
    from sdtrain.config import Config, load_config
    from sdtrain.train.loop import train
    from tests.conftest import tiny_overrides, write_image_folder

    data = write_image_folder(tmp_path / "data", count=10)
    for i in range(7):
        (data / f"{i:03d}.png").write_bytes(b"garbage")
    overrides = tiny_overrides(tmp_path / "run", data, vae_dir, str(clip_dir), "text_encoder")
    overrides += ["train.num_steps=200", "data.max_bad_share=0.5"]
    from sdtrain.data.decode import DataError

    with pytest.raises(DataError, match=r"skipped \(not_an_image: \d+\), more than data.max_bad_share=0.5"):
        train(load_config(Config, None, overrides))

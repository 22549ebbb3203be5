"""Masked loss: a NAME.mask.png beside an image, or its alpha channel, weighs the loss; resized, cropped and flipped
with the image; a masked-out region gives no gradient; a mask of another size is refused before any work."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.config import Config, DataConfig, ObjectiveConfig, load_config
from sdtrain.data.decode import DataError
from sdtrain.data.folder import ImageCaptionFolder, collate
from sdtrain.data.sources import list_records
from sdtrain.data.transforms import load_pixels
from sdtrain.objective import DDPM, LOSS_MASK, Draw
from sdtrain.train.loop import train
from sdtrain.train.preflight import check_data
from tests.conftest import tiny_overrides


def _halves(root, name="a", size=(48, 40), alpha=False):
    """An image red on its left third and blue elsewhere, with a mask white exactly on the red (a file, or its
    alpha channel)."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 3] = (255, 0, 0)
    array[:, width // 3 :] = (0, 0, 255)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 3] = 255
    if alpha:
        Image.fromarray(np.dstack([array, mask]), "RGBA").save(root / f"{name}.png")
    else:
        Image.fromarray(array).save(root / f"{name}.png")
        Image.fromarray(mask).save(root / f"{name}.mask.png")
    (root / f"{name}.txt").write_text("a red and blue picture")


@pytest.mark.parametrize("alpha", [False, True])
def test_the_mask_is_cropped_and_flipped_with_its_image(tmp_path, alpha):
    _halves(tmp_path, alpha=alpha)
    for seed in range(12):
        pixels, info = load_pixels(tmp_path / "a.png", 24, center_crop=False, flip=True, rng=random.Random(seed),
                                   masked=True)  # fmt: skip
        red = pixels[2] < -0.5  # where the image is red (no blue; the rest is blue, or white where transparent)
        sure = (pixels[2] > 0.9) | (pixels[2] < -0.9)  # away from the resampled edge
        assert info["mask"].shape == (1, 24, 24)
        assert torch.equal(info["mask"][0][sure] > 0.5, red[sure])
    _, info = load_pixels(tmp_path / "a.png", 24)
    assert "mask" not in info  # asked for only with data.masked_loss


def test_mask_files_are_no_training_images_and_batches_carry_them(tmp_path):
    _halves(tmp_path, "a")
    _halves(tmp_path, "b")
    assert [r["image"].name for r in list_records(tmp_path, "file_name", "text")] == ["a.png", "b.png"]
    data = ImageCaptionFolder(DataConfig(path=str(tmp_path), resolution=16, masked_loss=True))
    batch = collate([data[0], data[1]])
    assert batch["mask"].shape == (2, 1, 16, 16) and 0 < batch["mask"].mean() < 1
    Image.new("RGB", (16, 16)).save(tmp_path / "c.png")  # no mask: everywhere
    (tmp_path / "c.txt").write_text("black")
    data = ImageCaptionFolder(DataConfig(path=str(tmp_path), resolution=16, masked_loss=True))
    assert torch.equal(data[2]["mask"], torch.ones(1, 16, 16))


def test_a_masked_out_region_gives_no_gradient():
    objective = DDPM(ObjectiveConfig())
    latents = torch.randn(2, 4, 8, 8)
    output = torch.randn(2, 4, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :3] = 1.0  # learn the left three columns only
    draw = Draw(torch.randn(2, 4, 8, 8), torch.tensor([100, 700]))
    loss, _ = objective.loss(lambda model, x, t, cond: output * 1, None, {LOSS_MASK: mask}, latents, draw)
    loss.backward()
    assert torch.all(output.grad[..., 3:] == 0) and torch.all(output.grad[..., :3] != 0)


def test_a_mask_of_another_size_is_refused_before_any_work(tmp_path):
    _halves(tmp_path)
    Image.new("L", (20, 20), 255).save(tmp_path / "a.mask.png")
    with pytest.raises(DataError, match=r"a.mask.png is 20x20 and its image 48x40"):
        check_data(DataConfig(path=str(tmp_path), resolution=16, masked_loss=True), 0)
    check_data(DataConfig(path=str(tmp_path), resolution=16), 0)  # without masked loss the file is ignored


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_a_run_whose_masks_are_black_learns_nothing(tmp_path, clip_dir, vae_dir, cache):
    """Through the whole loop, online and from both latent caches: with every mask black the loss is 0 at every
    step."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        _halves(root, f"{i}")
        Image.new("L", (48, 40), 0).save(root / f"{i}.mask.png")
    extra = ["data.masked_loss=true", "train.num_steps=2", "train.ema_decay=null", "data.resolution=32"]
    overrides = tiny_overrides(tmp_path / "run", root, vae_dir, str(clip_dir), "text_encoder") + extra
    if cache == "memory":
        overrides.append("data.cache_latents=true")
    if cache == "disk":  # `sdtrain cache` with the same setting stores the masks
        from sdtrain.train.encode import cache_dataset

        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
        cache_dataset(load_config(Config, None, overrides))
    train(load_config(Config, None, overrides))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert losses and all(loss == 0.0 for loss in losses)


def test_a_shard_samples_mask_member_is_its_mask_not_its_image(tmp_path):
    """webdataset shards: KEY.mask.png beside KEY.png is the sample's mask (never taken for its image), cropped and
    flipped with it; a sample without one learns everywhere."""
    import io

    import webdataset as wds

    from sdtrain.data.shards import ShardDataset

    _halves(tmp_path, "a")

    def png(path):
        buffer = io.BytesIO()
        Image.open(path).save(buffer, "PNG")
        return buffer.getvalue()

    (tmp_path / "s").mkdir()
    with wds.ShardWriter(str(tmp_path / "s" / "%05d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(4):  # the mask first: a reader taking the first .png would take it for the image
            sample = {"__key__": f"{i:04d}", "txt": "a red and blue picture", "png": png(tmp_path / "a.png")}
            if i < 3:
                sample = {"__key__": sample["__key__"], "mask.png": png(tmp_path / "a.mask.png"), **sample}
            sink.write(sample)
    config = DataConfig(path=str(tmp_path / "s" / "00000.tar"), resolution=24, masked_loss=True, random_flip=True,
                        center_crop=False)  # fmt: skip
    batch = next(iter(ShardDataset(config, 4, seed=0)))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["mask"].shape == (4, 1, 24, 24)
    for pixels, mask, key in zip(batch["image"], batch["mask"], batch["key"]):
        if key == "0003":
            assert torch.equal(mask, torch.ones(1, 24, 24))
            continue
        sure = (pixels[2] > 0.9) | (pixels[2] < -0.9)
        assert torch.equal(mask[0][sure] > 0.5, (pixels[2] < -0.5)[sure])

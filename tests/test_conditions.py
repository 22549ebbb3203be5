"""Condition images (data.conditions): pairs read from folders, manifests and shards, cropped and flipped with their
image, encoded into both caches, skipped and counted when broken; the InstructPix2Pix edit family built on them."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.config import Config, ConfigError, DataConfig, load_config
from sdtrain.data.decode import Skip
from sdtrain.data.sources import list_records
from sdtrain.data.transforms import load_pixels
from tests.conftest import tiny_overrides

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}


def write_pairs(root: Path, count: int = 6, size: int = 32, seed: int = 0) -> Path:
    """``NAME.png`` (a square of a new colour) beside ``NAME.ref.png`` (the same square in another colour), captioned
    with the edit."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        before, after = rng.sample(list(COLOURS), 2)
        x, y = rng.randrange(0, size // 2), rng.randrange(0, size // 2)
        for name, colour in ((f"{i:03d}.ref.png", before), (f"{i:03d}.png", after)):
            array = np.full((size, size + 8, 3), 240, dtype=np.uint8)
            array[y : y + size // 2, x : x + size // 2] = COLOURS[colour]
            Image.fromarray(array).save(root / name)
        (root / f"{i:03d}.txt").write_text(f"make the square {after}")
    return root


def test_folder_manifest_and_shard_records_hold_their_conditions(tmp_path):
    folder = write_pairs(tmp_path / "pairs", count=3)
    records = list_records(folder, conditions=["ref"])
    assert [r["image"].name for r in records] == ["000.png", "001.png", "002.png"]  # the references are not images
    assert [r["conditions"][0].name for r in records] == ["000.ref.png", "001.ref.png", "002.ref.png"]
    assert len(list_records(folder)) == 6  # without data.conditions every file is an image, as before

    rows = [{"file_name": f"{i:03d}.png", "text": "x", "before": f"{i:03d}.ref.png"} for i in range(3)]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    manifest = list_records(folder / "m.jsonl", conditions=["before"])
    assert [r["conditions"][0] for r in manifest] == [r["conditions"][0] for r in records]
    beside = list_records(folder / "m.jsonl", conditions=["ref"])  # no such column: NAME.ref.png beside the image
    assert [r["conditions"][0] for r in beside] == [r["conditions"][0] for r in records]

    from sdtrain.data.sources import shard_records

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i in range(2):
            # the condition member first: the image is still the plain .png
            for member, data in ((f"{i}.ref.png", (folder / f"00{i}.ref.png").read_bytes()),
                                 (f"{i}.png", (folder / f"00{i}.png").read_bytes()), (f"{i}.txt", b"x")):  # fmt: skip
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard = list(shard_records(str(tmp_path / "s.tar"), conditions=["ref"]))
    assert [s["image"] for s in shard] == [(folder / f"00{i}.png").read_bytes() for i in range(2)]
    assert [s["conditions"][0] for s in shard] == [(folder / f"00{i}.ref.png").read_bytes() for i in range(2)]


def test_a_pair_is_cropped_and_flipped_together(tmp_path):
    folder = write_pairs(tmp_path / "pairs", count=1, size=48)
    image, same = folder / "000.png", tmp_path / "same.png"
    shutil.copy(image, same)
    twice = tmp_path / "twice.png"  # the image at twice its size: the same aspect, resized with it
    Image.open(image).resize((112, 96), Image.Resampling.NEAREST).save(twice)
    flips = set()
    for seed in range(8):  # random crops, flips both ways
        pixels, info = load_pixels(image, 32, False, True, random.Random(seed), conditions=[same, twice])
        assert torch.equal(info["conditions"][0], pixels)
        assert (info["conditions"][1] - pixels).abs().mean() < 0.05
        flips.add(info["flipped"])
    assert flips == {True, False}


@pytest.mark.parametrize(
    ("condition", "reason"),
    [
        (None, "no_condition"),
        ("gone.png", "no_condition"),
        ("corrupt.png", "condition_corrupt"),
        ("wide.png", "condition_aspect"),
    ],  # fmt: skip
)
def test_a_bad_condition_skips_its_sample(tmp_path, condition, reason):
    folder = write_pairs(tmp_path / "pairs", count=1)
    (tmp_path / "corrupt.png").write_bytes((folder / "000.png").read_bytes()[:60])
    Image.new("RGB", (80, 20)).save(tmp_path / "wide.png")
    with pytest.raises(Skip) as caught:
        load_pixels(folder / "000.png", 32, conditions=[None if condition is None else tmp_path / condition])
    assert caught.value.reason == reason


def test_condition_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="condition name"):
        DataConfig(path="x", conditions=["Ref!"])
    with pytest.raises(ConfigError, match="names none"):
        DataConfig(path="x", condition_dropout=0.1)
    from sdtrain.train.preflight import check_conditions

    folder = write_pairs(tmp_path / "pairs", count=2)
    with pytest.raises(ConfigError, match="takes no condition images"):  # a text-to-image family
        check_conditions(load_config(Config, None, [f"data.path={folder}", "data.conditions=[ref]",
                                                    "model.vae.path=x"]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.conditions=\[reference\]"):  # an edit family without its references
        check_conditions(load_config(Config, None, [f"data.path={folder}", "model.family=instruct-pix2pix",
                                                    "model.vae.path=x"]))  # fmt: skip
    with pytest.raises(ConfigError, match="one per prompt"):
        check_conditions(load_config(Config, None, [
            f"data.path={folder}", "model.family=instruct-pix2pix", "model.vae.path=x", "data.conditions=[ref]",
            "train.sample_prompts=[a, b, c]", f"sample.images=[{folder}/000.ref.png, {folder}/001.ref.png]",
        ]))  # fmt: skip


def _halves(width: int, height: int) -> Image.Image:
    """A reference whose left half is red and right half blue: a flip or a crop shows."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2], array[:, width // 2 :] = COLOURS["red"], COLOURS["blue"]
    return Image.fromarray(array)


def test_a_reference_at_its_own_size_keeps_its_aspect_and_flips_with_its_image(tmp_path):
    """With data.condition_resolution a reference of any aspect is resized to its own bucket and center-cropped,
    never cropped with its image; it is flipped where its image is."""
    from sdtrain.data.buckets import condition_bucket_of, make_buckets, nearest_bucket

    folder = write_pairs(tmp_path / "pairs", count=1, size=48)
    _halves(96, 32).save(tmp_path / "wide.png")  # 3:1, for a 56 x 48 image
    config = DataConfig(path="x", conditions=["ref"], condition_resolution=32, buckets=True, bucket_step=8)
    bucket = nearest_bucket((96, 32), make_buckets(32, 8))
    assert bucket == (40, 24)  # the widest bucket within the largest ratio (2), about 32 x 32 pixels
    outputs, flips = {}, set()
    for seed in range(8):  # random crops of the image, flips both ways
        pixels, info = load_pixels(folder / "000.png", 32, False, True, random.Random(seed),
                                   conditions=[tmp_path / "wide.png"],
                                   condition_bucket_of=condition_bucket_of(config))  # fmt: skip
        (reference,) = info["conditions"]
        assert pixels.shape == (3, 32, 32) and reference.shape == (3, 24, 40)
        outputs[info["flipped"]] = reference
        flips.add(info["flipped"])
    assert flips == {True, False}
    assert torch.equal(outputs[True], outputs[False].flip(-1))  # flipped with its image, else the same pixels
    left, right = outputs[False][:, :, :8].mean((1, 2)), outputs[False][:, :, -8:].mean((1, 2))
    assert left[0] > left[2] and right[2] > right[0]  # red stays left, blue right: center-cropped, not cropped
    # without a bucket set, the square of condition_resolution
    square = DataConfig(path="x", conditions=["ref"], condition_resolution=24)
    _, info = load_pixels(folder / "000.png", 32, conditions=[tmp_path / "wide.png"],
                          condition_bucket_of=condition_bucket_of(square))  # fmt: skip
    assert info["conditions"][0].shape == (3, 24, 24)


def test_condition_resolution_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="names none"):
        DataConfig(path="x", condition_resolution=32)
    with pytest.raises(ConfigError, match="multiple of data.bucket_step=16"):
        DataConfig(path="x", conditions=["ref"], condition_resolution=40, buckets=True, bucket_step=16)
    from sdtrain.train.preflight import check_conditions

    folder = write_pairs(tmp_path / "pairs", count=2)
    for family in ("instruct-pix2pix", "sd-controlnet"):  # the condition is read pixel for pixel beside the image
        with pytest.raises(ConfigError, match="pixel for pixel"):
            check_conditions(load_config(Config, None, [f"data.path={folder}", f"model.family={family}",
                                                        "model.vae.path=x", "data.conditions=[ref]",
                                                        "data.condition_resolution=32"]))  # fmt: skip


def write_pair_shards(root: Path, count: int = 24, broken: int = 5) -> str:
    """Shards of pairs: images of a few aspects, each with a reference of another (``KEY.ref.png``); sample
    ``broken`` has no reference."""
    import webdataset as wds

    sizes = [(64, 64), (96, 48), (48, 96)]
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(count):
            image, reference = io.BytesIO(), io.BytesIO()
            Image.new("RGB", sizes[i % 3], (i * 9 % 256, 80, 160)).save(image, "PNG")
            _halves(*sizes[(i // 3) % 3]).save(reference, "PNG")
            sample = {"__key__": f"{i:05d}", "png": image.getvalue(), "txt": f"pair {i}"}
            sink.write(sample if i == broken else sample | {"ref.png": reference.getvalue()})
    return str(root / f"{{00000..{(count - 1) // 8:05d}}}.tar")


@pytest.mark.slow
def test_shard_batches_hold_one_bucket_of_each_and_resume_exactly(tmp_path):
    """From shards with aspect buckets, a batch holds one image bucket and one reference bucket, the references at
    their own size; a sample without its reference is skipped and counted; a resumed stream goes on as the
    uninterrupted one."""
    from sdtrain.data.shards import ShardDataset, ShardPosition, make_shard_loader

    spec = write_pair_shards(tmp_path / "s")
    config = DataConfig(path=spec, resolution=64, buckets=True, bucket_step=16, shuffle_buffer=7, num_workers=1,
                        conditions=["ref"], condition_resolution=48)  # fmt: skip

    def stream(state=None):
        position = ShardPosition(1, state)
        dataset = ShardDataset(config, 2, 5, 0, 1, 1, position.states, position.next_worker)
        return position, iter(make_shard_loader(dataset))

    _, straight = stream()
    batches = [next(straight) for _ in range(16)]  # an epoch and more
    pairs = set()
    for batch in batches:
        (references,) = batch["conditions"]
        assert references.shape[0] == batch["image"].shape[0]
        pairs.add((tuple(batch["image"].shape[-2:]), tuple(references.shape[-2:])))
    assert {image for image, _ in pairs} == {(64, 64), (48, 80), (80, 48)}  # (height, width), about 64 x 64
    assert {reference for _, reference in pairs} == {(48, 48), (32, 64), (64, 32)}  # about 48 x 48 pixels
    assert len(pairs) == 9  # every image bucket beside every reference bucket
    assert sum(b["skipped"].get("no_condition", 0) for b in batches) >= 1
    for cut in (3, 7):
        position, loader = stream()
        for _ in range(cut):
            position.consumed(next(loader))
        _, resumed = stream(json.loads(json.dumps(position.state())))  # as it goes through a checkpoint
        rest = [next(resumed) for _ in range(16 - cut)]
        assert [b["key"] for b in rest] == [b["key"] for b in batches[cut:]], f"cut at {cut}"
        assert all(torch.equal(a["conditions"][0], b["conditions"][0]) for a, b in zip(rest, batches[cut:]))


def edit_overrides(out: Path, data: Path, vae_dir: Path, clip_dir: Path) -> list[str]:
    """A tiny InstructPix2Pix run built from scratch on ``data``'s pairs."""
    return tiny_overrides(out, data, vae_dir, str(clip_dir), "text_encoder") + [
        "model.family=instruct-pix2pix", "data.conditions=[ref]", "data.condition_dropout=0.2",
        "sample.scheduler=euler_a",
    ]  # fmt: skip


def test_instruct_pix2pix_trains_exports_and_draws_its_pipelines_pixels(tmp_path, vae_dir, clip_dir):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from sdtrain.models.families import instruct_pix2pix
    from sdtrain.sample.pipeline import Pipeline
    from sdtrain.train.loop import train

    data = write_pairs(tmp_path / "pairs")
    (data / "005.ref.png").unlink()  # a sample without its reference: skipped and counted
    config = load_config(
        Config,
        None,
        edit_overrides(tmp_path / "run", data, vae_dir, clip_dir)
        + ["train.sample_prompts=[make the square red]", f"sample.images=[{data}/000.ref.png]"],
    )
    final = train(config)
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"no_condition": ' in log
    assert (tmp_path / "run" / "samples").is_dir()
    sampling = json.loads((final / "sampling.json").read_text())
    assert sampling["image_guidance_scale"] == 1.5

    plain = StableDiffusionInstructPix2PixPipeline.from_pretrained(final, safety_checker=None)
    assert plain.unet.config.in_channels == 8
    reference = Image.open(data / "001.ref.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    assert ours.family is instruct_pix2pix.FAMILY
    got = ours.generate(["make the square blue", "make the square red"], reference=reference, seed=3,
                        num_inference_steps=4, guidance_scale=3.0, image_guidance_scale=1.2).images  # fmt: skip
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    want = plain(["make the square blue", "make the square red"], image=[reference, reference], num_inference_steps=4,
                 guidance_scale=3.0, image_guidance_scale=1.2, generator=generators).images  # fmt: skip
    for a, b in zip(got, want):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert got[0].size == (40, 32)  # the reference's size

    # the training call is the pipeline's: the reference's latents as the pipeline prepares them, beside the noisy
    processor = plain.image_processor
    pixels = processor.preprocess(reference)
    prepared = plain.prepare_image_latents(pixels, 1, 1, torch.float32, "cpu", False)
    encoded = instruct_pix2pix.encode_references(plain.vae, [pixels])[instruct_pix2pix.REFERENCE]
    assert torch.equal(encoded, prepared)
    noisy, t = torch.randn(1, 4, 16, 20), torch.tensor([500])
    text = plain._encode_prompt("make it red", "cpu", 1, False)
    cond = {"encoder_hidden_states": text, instruct_pix2pix.REFERENCE: encoded}
    direct = plain.unet(torch.cat([noisy, prepared], 1), t, encoder_hidden_states=text).sample
    assert torch.equal(instruct_pix2pix.predict(plain.unet, noisy, t, cond), direct)

    from sdtrain.errors import Unsupported

    with pytest.raises(Unsupported, match="ControlNet"):
        ours.generate("make it red", control=reference)
    with pytest.raises(Unsupported, match="reference image"):
        ours.generate("make it red")
    with pytest.raises(Unsupported, match="no reconstruct; it edits references: generate --reference"):
        ours.reconstruct("make it red", reference)


def test_instruct_pix2pix_lora_loads_in_its_plain_pipeline(tmp_path, vae_dir, clip_dir):
    """The LoRA of an edit model: diffusers' file loads into the plain pipeline over the base and draws what the
    merged export draws; kohya's file is written beside it."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from sdtrain.train.loop import train

    data = write_pairs(tmp_path / "pairs", count=4)
    base = train(load_config(Config, None, edit_overrides(tmp_path / "base", data, vae_dir, clip_dir)
                             + ["train.num_steps=1"]))  # fmt: skip
    extra = [f"model.pretrained={base}", "train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null",
             "train.num_steps=2"]  # fmt: skip
    final = train(load_config(Config, None, edit_overrides(tmp_path / "lora", data, vae_dir, clip_dir) + extra))
    assert (final / "lora" / "lora_kohya.safetensors").is_file()
    reference = Image.open(data / "000.ref.png").convert("RGB")
    kwargs = dict(prompt="make the square red", image=reference, num_inference_steps=2, output_type="np")
    plain = StableDiffusionInstructPix2PixPipeline.from_pretrained(base, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    before = plain(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    plain.load_lora_weights(final / "lora")
    with_lora = plain(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = StableDiffusionInstructPix2PixPipeline.from_pretrained(final, safety_checker=None)
    merged.scheduler = plain.scheduler
    merged.set_progress_bar_config(disable=True)
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).max() > 1e-3 and np.abs(with_lora - again).max() < 2e-3


def test_a_text_to_image_unet_is_widened_as_diffusers_does(tmp_path, vae_dir, clip_dir):
    from sdtrain.models.families import instruct_pix2pix
    from tests.conftest import save_pipeline, tiny_unet

    base = tiny_unet()
    folder = save_pipeline(tmp_path / "sd", tiny_unet(), clip_dir, vae_dir)
    config = load_config(Config, None, [f"model.pretrained={folder}", "model.family=instruct-pix2pix",
                                        "data.conditions=[ref]", "data.path=x"])  # fmt: skip
    unet = instruct_pix2pix.load_components(config).unet
    assert unet.config.in_channels == 8
    x, reference, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    text = torch.randn(2, 5, 32)
    with torch.no_grad():  # zero weights on the reference: the text-to-image model it was
        widened = instruct_pix2pix.predict(unet, x, t, {"encoder_hidden_states": text, "image_latents": reference})
        torch.testing.assert_close(widened, base(x, t, encoder_hidden_states=text).sample)


def test_both_caches_hold_the_condition_latents(tmp_path, vae_dir, clip_dir):
    """A batch read online, from the memory cache and from the disk cache holds the same reference latents (and
    the null condition where it was dropped, at the same draws)."""
    from sdtrain.data.disk_cache import DiskCache, DiskCacheStream, write_cache
    from sdtrain.data.memory_cache import MemoryCacheStream, build_memory_cache
    from sdtrain.data.streams import OnlineStream
    from sdtrain.models.families import instruct_pix2pix
    from sdtrain.train.randomness import SharedDraws

    data = write_pairs(tmp_path / "pairs", count=4)
    config = load_config(Config, None, edit_overrides(tmp_path / "run", data, vae_dir, clip_dir)
                         + [f"data.cache_dir={tmp_path / 'cache'}", "data.condition_dropout=0.5"])  # fmt: skip
    components = instruct_pix2pix.load_components(config, denoiser=False)
    encoders = instruct_pix2pix.FAMILY.encoders(components)
    write_cache(config.data, encoders)

    def first(stream) -> dict:
        draws = SharedDraws(torch.Generator().manual_seed(0), 0, 1, 4)
        return stream.next(draws)[1]

    online = first(OnlineStream(config.data, encoders, 4, torch.device("cpu")))
    memory = first(MemoryCacheStream(build_memory_cache(config.data, encoders), encoders, 4, 0.2, "cpu",
                                     condition_dropout=0.5))  # fmt: skip
    disk = first(DiskCacheStream(DiskCache(config.data, encoders), encoders, 4, 0.2, "cpu", condition_dropout=0.5))
    key = instruct_pix2pix.REFERENCE
    dropped = (online[key].flatten(1) == 0).all(1)
    assert 0 < dropped.sum() < 4  # some dropped to the null condition, some kept
    torch.testing.assert_close(memory[key], online[key], atol=1e-5, rtol=0)
    torch.testing.assert_close(disk[key], online[key], atol=2e-2, rtol=1e-2)  # stored in fp16

    from sdtrain.data.decode import DataError
    from sdtrain.models.families import sd_controlnet

    controls = dataclasses.replace(encoders, encode_conditions=sd_controlnet.encode_controls)
    with pytest.raises(DataError, match="differs from this run in: conditions"):  # a ControlNet's encoding is another
        DiskCache(config.data, controls)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact_with_pairs(tmp_path, vae_dir, clip_dir):
    """Pairs read by DataLoader workers with random crops and flips, references dropped at random: a run killed
    mid-accumulation after a checkpoint and rerun ends with the uninterrupted run's losses and weights, bit for bit."""
    from tests.test_faults import KILLED, _losses, _train, _weights

    data = write_pairs(tmp_path / "pairs", count=7, size=40)
    extra = ["data.num_workers=2", "data.center_crop=false", "data.random_flip=true", "train.gradient_accumulation=2",
             "train.num_steps=6", "train.save_every=3"]  # fmt: skip
    assert _train(edit_overrides(tmp_path / "a", data, vae_dir, clip_dir) + extra).returncode == 0
    overrides = edit_overrides(tmp_path / "b", data, vae_dir, clip_dir) + extra
    assert _train(overrides, "kill_micro=8").returncode == KILLED  # in step 4, after step 3's checkpoint
    assert (tmp_path / "b" / "checkpoints" / "step-00000003").is_dir()
    assert _train(overrides).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

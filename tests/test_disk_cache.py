"""`sdtrain cache`: an on-disk latent cache written by several processes without waiting on each other, read by
training (which then matches training from the images), and refused when made with other models or settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.cli import main
from sdtrain.config import Config, load_config
from sdtrain.data.decode import DataError
from sdtrain.train.loop import train
from sdtrain.train.preflight import check_run
from tests.conftest import tiny_overrides, write_image_folder
from tests.test_faults import _env, _free_port
from tests.test_shards import write_shards


def _weights(final):
    return load_file(final / "unet" / "diffusion_pytorch_model.safetensors")


def test_training_from_the_disk_cache_matches_training_from_images(tmp_path, clip_dir, vae_dir, image_folder):
    cache = tmp_path / "cache"
    base = tiny_overrides(tmp_path / "images", image_folder, vae_dir, str(clip_dir), "text_encoder")
    base += ["data.center_crop=true", "train.num_steps=6", "train.save_every=3"]
    assert main(["cache", *base, f"data.cache_dir={cache}"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == [
        "empty.safetensors", "fingerprint.json", "part-r000-00000.safetensors", "rank-000.json",
    ]  # fmt: skip
    from_images = train(load_config(Config, None, base + ["data.cache_latents=true"]))
    cached = tiny_overrides(tmp_path / "cached", image_folder, vae_dir, str(clip_dir), "text_encoder")
    cached += ["data.center_crop=true", "train.num_steps=6", "train.save_every=3", f"data.cache_dir={cache}"]
    from_cache = train(load_config(Config, None, cached))
    a, b = _weights(from_images), _weights(from_cache)
    # the cache stores fp16 moments and embeddings: close to, not equal to, the fp32 in-memory cache
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-3
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "images"), rel=1e-2)

    # resume from a checkpoint of the cached run is exact
    split = tiny_overrides(tmp_path / "split", image_folder, vae_dir, str(clip_dir), "text_encoder")
    split += ["data.center_crop=true", "train.save_every=3", f"data.cache_dir={cache}"]
    train(load_config(Config, None, split + ["train.num_steps=3"]))
    resumed = train(load_config(Config, None, split + ["train.num_steps=6"]))
    c = _weights(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_two_datasets_and_class_images_train_from_their_disk_caches_as_from_memory(tmp_path, clip_dir, vae_dir):
    subject = write_image_folder(tmp_path / "subject", count=3, seed=1)
    style = write_image_folder(tmp_path / "style", count=6, seed=2)
    classes = write_image_folder(tmp_path / "classes", count=4, seed=3)  # all there: none to draw
    dataset = {"path": str(style), "trigger": "", "loss_weight": 0.5, "masked_loss": True}
    settings = [
        "data.center_crop=true", "train.num_steps=6", "train.save_every=3", "data.trigger=zqx",
        "data.allow_split_trigger=true", f"data.datasets=[{json.dumps(dataset)}]", f"data.prior.path={classes}",
        "data.prior.prompt='a square'", "data.prior.count=4", "data.prior.share=0.25", "data.prior.loss_weight=0.7",
    ]  # fmt: skip

    def run(name, *extra):
        overrides = tiny_overrides(tmp_path / name, subject, vae_dir, str(clip_dir), "text_encoder")
        return train(load_config(Config, None, overrides + settings + list(extra)))

    cache = tmp_path / "cache"
    assert main(["cache", *tiny_overrides(tmp_path / "c", subject, vae_dir, str(clip_dir), "text_encoder"),
                 *settings, f"data.cache_dir={cache}"]) == 0  # fmt: skip
    # data.path's cache at the root, each other source's in a folder of its kind, named by its path
    named = lambda kind: [p.name.rsplit("-", 1)[0] for p in (cache / kind).iterdir()]  # noqa: E731
    assert (cache / "rank-000.json").exists() and named("datasets") == ["style"] and named("classes") == ["classes"]
    from_memory, from_cache = run("memory", "data.cache_latents=true"), run("cached", f"data.cache_dir={cache}")
    a, b = _weights(from_memory), _weights(from_cache)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-3  # fp16 in the disk cache
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "memory"), rel=1e-2)
    # the mix of three cached streams resumes exactly
    run("split", f"data.cache_dir={cache}", "train.num_steps=3")
    c = _weights(run("split", f"data.cache_dir={cache}"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    # a source without its cache is refused before any work, with what to do
    other = write_image_folder(tmp_path / "other", count=2)
    overrides = tiny_overrides(tmp_path / "x", subject, vae_dir, str(clip_dir), "text_encoder") + settings
    with pytest.raises(DataError, match="run `sdtrain cache`"):
        check_run(
            load_config(Config, None, overrides + [f"data.cache_dir={cache}", f"data.datasets=[{{path: '{other}'}}]"])
        )
    assert not (tmp_path / "x").exists()


def test_a_cache_made_with_other_settings_is_refused(tmp_path, clip_dir, vae_dir, image_folder):
    cache = tmp_path / "cache"
    base = tiny_overrides(tmp_path / "run", image_folder, vae_dir, str(clip_dir), "text_encoder")
    assert main(["cache", *base, f"data.cache_dir={cache}"]) == 0
    with pytest.raises(ValueError, match="differs from this run in: buckets, resolution"):
        train(load_config(Config, None, base + [f"data.cache_dir={cache}", "data.resolution=16"]))
    other_vae = tmp_path / "vae2"
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.01)
    vae.save_pretrained(other_vae)
    swapped = [o if not o.startswith("model.vae.path=") else f"model.vae.path={other_vae}" for o in base]
    with pytest.raises(ValueError, match="differs from this run in: vae;"):
        train(load_config(Config, None, swapped + [f"data.cache_dir={cache}"]))
    with pytest.raises(DataError, match="sdtrain cache"):
        train(load_config(Config, None, base + [f"data.cache_dir={tmp_path / 'nothing'}"]))


def test_a_damaged_cache_is_refused_when_opened_and_sdtrain_cache_mends_it(
    tmp_path, clip_dir, vae_dir, image_folder, capfd
):
    """Each part's size and sha256 are in its process's index: a part cut short is refused before the run folder is
    made, a changed byte when the run opens the cache (before its first step), each with the way out; `sdtrain cache`
    encodes the damaged share again, and the run then trains."""
    import shutil

    cache, run = tmp_path / "cache", tmp_path / "run"
    base = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder")
    base += [f"data.cache_dir={cache}", "train.num_steps=2"]
    assert main(["cache", *base]) == 0
    part = cache / "part-r000-00000.safetensors"
    intact, tensors = part.read_bytes(), load_file(part)
    assert json.loads((cache / "rank-000.json").read_text())["parts"][0]["size"] == len(intact)

    flipped = bytearray(intact)
    flipped[-10] ^= 0xFF
    part.write_bytes(bytes(flipped))
    assert main(["train", *base]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("sdtrain: the cache in")
    assert "part-r000-00000.safetensors does not match its sha256" in err and "`sdtrain cache`" in err
    assert not (run / "checkpoints").exists()  # refused before the first step
    shutil.rmtree(run)

    part.write_bytes(intact[:-100])
    for verify in ("sha256", "size"):
        assert main(["train", *base, f"data.cache_verify={verify}"]) == 2
        err = capfd.readouterr().err
        assert f"has {len(intact) - 100} bytes, its index says {len(intact)}" in err, err
        assert not run.exists()  # refused before the run folder is made

    assert main(["cache", *base]) == 0  # the damaged share encoded again: the same tensors (to the fp16 rounding
    again = load_file(part)  # of the near-zero posterior std, whose last bit the CPU's convolutions may flip)
    assert again.keys() == tensors.keys()
    assert all(torch.allclose(again[k].float(), tensors[k].float(), rtol=0, atol=1e-5) for k in tensors)
    assert main(["train", *base]) == 0


def test_two_processes_cache_their_own_shards_with_buckets(tmp_path, clip_dir, vae_dir):
    spec = write_shards(tmp_path / "s", shards=4, per_shard=5)
    cache = tmp_path / "cache"
    overrides = tiny_overrides(tmp_path / "run", spec, vae_dir, str(clip_dir), "text_encoder")
    overrides += ["data.resolution=64", "data.buckets=true", "data.bucket_step=16", f"data.cache_dir={cache}"]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "sdtrain", "cache", *overrides], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    ranks = [json.loads((cache / f"rank-{r:03d}.json").read_text()) for r in range(2)]
    assert [r["samples"] for r in ranks] == [10, 10]  # 2 shards of 5 each
    buckets = {tuple(p["bucket"]) for r in ranks for p in r["parts"]}
    assert len(buckets) > 1  # the shards' aspect ratios land in several buckets
    keys = []
    for r in ranks:
        for part in r["parts"]:
            from safetensors import safe_open

            with safe_open(str(cache / part["file"]), "pt") as f:
                keys += json.loads(f.metadata()["keys"])
                assert f.get_slice("mean").get_shape()[2:] == [part["bucket"][1] // 2, part["bucket"][0] // 2]
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(5))  # complete, disjoint
    final = train(load_config(Config, None, overrides + ["train.num_steps=3", "train.batch_size=2"]))
    assert (final / "unet").is_dir()
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "step-00000003" / "rng-1.pt")

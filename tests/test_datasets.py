"""Several datasets in one run (``data.datasets``): each its own share (its weight, or image count x repeats), its
caption options, mask setting and loss weight; read online or cached in memory; bad settings refused at load."""

from __future__ import annotations

import json

import pytest

from sdtrain.config import Config, ConfigError, data_sources, from_dict, load_config
from sdtrain.data.folder import ImageCaptionFolder
from sdtrain.data.streams import source_weights
from sdtrain.train.loop import train
from tests.conftest import tiny_overrides, write_image_folder


def _two(tmp_path, **extra) -> list[str]:
    subject = write_image_folder(tmp_path / "subject", count=3, seed=1)
    style = write_image_folder(tmp_path / "style", count=6, seed=2)
    dataset = {"path": str(style), "trigger": "", "caption_dropout": 0.0, "loss_weight": 0.5, **extra}
    return [
        "model.pretrained=base",
        f"data.path={subject}",
        "data.repeats=4",
        "data.trigger=zqx",
        "data.allow_split_trigger=true",  # the tiny byte-level tokenizer splits every word
        f"data.datasets=[{json.dumps(dataset)}]",
    ]


def test_each_dataset_has_its_share_captions_and_loss_weight(tmp_path):
    config = load_config(Config, None, _two(tmp_path))
    (key0, subject), (key1, style) = data_sources(config.data)
    assert (key0, key1) == ("data.path", "data.datasets[0].path")
    assert (subject.trigger, subject.caption_dropout, subject.loss_weight) == ("zqx", 0.1, 1.0)
    assert (style.trigger, style.caption_dropout, style.loss_weight) == (None, 0.0, 0.5)
    # unset weights: image count x repeats (3 photos x 4 weigh 12 against 6 style images x 1)
    assert source_weights([subject, style], [3, 6]) == [12.0, 6.0]
    # the captions each source reads carry its own trigger (the style set none)
    assert ImageCaptionFolder(subject)[0]["text"].startswith("zqx, ")
    assert "zqx" not in ImageCaptionFolder(style)[0]["text"]
    weighted = load_config(Config, None, _two(tmp_path, weight=3.0) + ["data.weight=1.0"])
    assert source_weights([s for _, s in data_sources(weighted.data)], [3, 6]) == [1.0, 3.0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.weight=2.0", "data.datasets=[{path: x}]"], "set every source's weight or none"),
        (["data.datasets=[{path: 'shards/{0..1}.tar'}]"], "shards, which are not counted"),
        (["data.datasets=[{path: x, repeats: 0}]"], "repeats must be >= 1"),
        (["data.datasets=[{path: x, tag_dropout: 0.2}]", "data.cache_latents=true"], r"datasets\[0\] \(x\).*tag"),
        (["data.datasets=[{path: x, keep_tokens: -1}]"], "keep_tokens must be >= 0"),
    ],
)
def test_dataset_settings_that_cannot_work_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Config, None, ["model.pretrained=base", "data.path=d", *extra])


def test_a_config_written_with_data_mix_still_loads():
    config = from_dict(
        Config,
        {"model": {"pretrained": "base"}, "data": {"path": "d", "weight": 1.0, "mix": [{"path": "e", "weight": 2.0}]}},
    )
    assert [d.path for d in config.data.datasets] == ["e"] and config.data.datasets[0].weight == 2.0


@pytest.mark.parametrize("cache", [False, True])
def test_two_datasets_train_online_and_from_the_memory_cache(tmp_path, clip_dir, vae_dir, cache):
    overrides = tiny_overrides(tmp_path / "run", tmp_path, vae_dir, str(clip_dir), "text_encoder")
    overrides += _two(tmp_path, masked_loss=True)[1:] + [
        f"data.cache_latents={str(cache).lower()}",
        "train.num_steps=4",
    ]
    overrides += ["train.save_every=4"]
    final = train(load_config(Config, None, overrides))
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").exists()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    mix = state["data"][0]
    assert mix["count"] == 4 and len(mix["streams"]) == 2
    if not cache:  # read counts: both sources were drawn from in 4 micro-batches with this seed, or the test says so
        assert [s["read"] > 0 for s in mix["streams"]] == [True, True]

"""Captions for teaching a concept: the trigger word, tag shuffling with kept leading tags, per-tag dropout; seeded per
sample (the same caption after a resume, another in the next epoch); refused with a latent cache."""

from __future__ import annotations

import random

import pytest

from sdtrain.config import Config, ConfigError, DataConfig, load_config
from sdtrain.data.captions import cached_captions, edit_tags, in_prompts, training_caption, with_trigger
from sdtrain.data.disk_cache import fingerprint
from sdtrain.data.folder import ImageCaptionFolder
from tests.conftest import write_image_folder

TAGS = "photo of [trigger], dog, grass, sunny, red collar, running, outdoors"


def test_the_trigger_replaces_its_mark_or_goes_in_front():
    assert with_trigger("a photo of [trigger] on a beach", "zqx") == "a photo of zqx on a beach"
    assert with_trigger("a dog, grass", "zqx") == "zqx, a dog, grass"
    assert with_trigger("", "zqx") == "zqx"  # an image without a caption still learns the word
    assert with_trigger("a [trigger] dog", None) == "a [trigger] dog"
    assert in_prompts(["a [trigger] dog", "a cat"], "zqx") == ["a zqx dog", "a cat"]


def test_tags_shuffle_past_the_kept_ones_and_drop_but_never_the_trigger():
    seen_orders, dropped = set(), 0
    for seed in range(200):
        edited = edit_tags(TAGS, random.Random(seed), keep=2, shuffle=True, dropout=0.3).split(", ")
        assert edited[:2] == ["photo of [trigger]", "dog"]  # kept in place
        assert set(edited[2:]) <= {"grass", "sunny", "red collar", "running", "outdoors"}
        assert len(edited) == len(set(edited))
        seen_orders.add(tuple(edited[2:]))
        dropped += 7 - len(edited)
    assert len(seen_orders) > 50  # shuffled
    assert 0.2 < dropped / (200 * 5) < 0.4  # about 0.3 of the five droppable tags
    for seed in range(50):  # the trigger's tag is never dropped, wherever it stands
        assert "photo of [trigger]" in edit_tags(TAGS, random.Random(seed), keep=0, shuffle=True, dropout=0.9)
    assert edit_tags(TAGS, random.Random(0)) == TAGS  # nothing asked: the tags as they were


def test_the_dataset_draws_the_same_caption_for_the_same_sample_and_keeps_the_trigger_first(tmp_path):
    root = write_image_folder(tmp_path / "data", count=4)
    for i in range(4):
        (root / f"{i:03d}.txt").write_text(f"image {i}, dog, grass, sunny, running, outdoors")
    config = DataConfig(path=str(root), resolution=16, trigger="zqx", shuffle_tags=True, keep_tokens=1,
                        tag_dropout=0.2)  # fmt: skip
    data = ImageCaptionFolder(config)
    first = [data[i]["text"] for i in range(4)]
    assert first == [ImageCaptionFolder(config)[i]["text"] for i in range(4)]  # as a resumed run draws them
    epochs = [[data[e * 4 + i]["text"] for i in range(4)] for e in range(6)]
    assert len({tuple(epoch) for epoch in epochs}) > 1  # each epoch edits anew
    for epoch in epochs:
        for i, text in enumerate(epoch):
            assert text.split(", ")[:2] == ["zqx", f"image {i}"]  # the trigger in front, then the kept tag
    plain = ImageCaptionFolder(DataConfig(path=str(root), resolution=16))
    assert plain[0]["text"] == "image 0, dog, grass, sunny, running, outdoors"


def test_a_latent_cache_encodes_captions_with_the_trigger_and_its_fingerprint_holds_it():
    config = DataConfig(trigger="zqx")
    assert cached_captions(["a dog", "a [trigger] on grass"], config) == ["zqx, a dog", "a zqx on grass"]
    assert training_caption("a dog", random.Random(0), DataConfig()) == "a dog"

    class Encoders:  # what the fingerprint reads of the models
        vae = None

        @staticmethod
        def text_identity():
            return {}

    import sdtrain.data.disk_cache as disk_cache

    original = disk_cache.model_hash
    disk_cache.model_hash = lambda model: "vae"
    try:
        assert fingerprint(DataConfig(trigger="zqx"), Encoders)["trigger"] == "zqx"
        assert "trigger" not in fingerprint(DataConfig(), Encoders)  # caches made before stay valid
    finally:
        disk_cache.model_hash = original


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.shuffle_tags=true", "data.cache_latents=true"], "encodes each caption once"),
        (["data.tag_dropout=0.1", "data.cache_dir=cache"], "encodes each caption once"),
        (["data.tag_dropout=1.0"], r"data.tag_dropout must be in \[0, 1\)"),
        (["data.keep_tokens=-1"], "data.keep_tokens must be >= 0"),
        (["data.trigger=''"], "data.trigger is empty"),
    ],
)
def test_caption_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Config, "demo", overrides)

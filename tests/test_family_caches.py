"""The newest families' conditioning in both caches: `sdtrain cache` stores each of the family's keys (padded states
and their masks, stacked hidden states), and a run from the disk cache trains what a run from the memory cache
trains (the disk cache holds half precision: the losses agree to its rounding)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.train.encode import cache_dataset
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides, write_image_folder

SETTINGS = {  # the tiny tokenizers' lengths and the keys each family's conditioning carries
    "qwenimage": ("model.text_encoder.max_length=256", {"encoder_hidden_states", "attention_mask"}),
    "flux2_klein": ("model.text_encoder.max_length=96", {"encoder_hidden_states"}),
    "lumina2": ("model.text_encoder.max_length=256", {"encoder_hidden_states", "encoder_attention_mask"}),
    "zimage": ("model.text_encoder.max_length=96", {"encoder_hidden_states", "attention_mask"}),
}


@pytest.mark.parametrize("family", sorted(SETTINGS))
def test_a_family_trains_from_the_disk_cache_as_from_the_memory_cache(tmp_path, request, family):
    folder = request.getfixturevalue(f"{family}_dir")
    length, keys = SETTINGS[family]
    data = write_image_folder(tmp_path / "data", count=4, size=32)
    extra = ["train.num_steps=2", "data.caption_dropout=0.5", "train.objective.timestep_sampling=logit_normal", length]

    def run(name: str, *cache: str) -> list[float]:
        overrides = pipeline_overrides(tmp_path / name, data, folder) + extra + list(cache)
        if cache[0].startswith("data.cache_dir"):
            cache_dataset(load_config(Config, None, overrides))
        train(load_config(Config, None, overrides))
        log = (tmp_path / name / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in log if '"loss"' in line]

    from_memory = run("memory", "data.cache_latents=true")
    from_disk = run("disk", f"data.cache_dir={tmp_path / 'cache'}")
    part = load_file(next((tmp_path / "cache").glob("part-*.safetensors")))
    assert {f"cond.{k}" for k in keys} <= part.keys()
    assert len(from_disk) == len(from_memory) == 2 and from_disk == pytest.approx(from_memory, rel=1e-2)

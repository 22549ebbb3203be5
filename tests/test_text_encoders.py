"""Training the text encoders with the denoiser (train.text_encoder): every weight or LoRA adapters at their own
learning rate, prompts served as token ids (the disk cache holds them as integers), the trained encoder exported and
recovered from a checkpoint; a family whose encoders only stay frozen refuses before any work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides, tiny_overrides, write_image_folder


def test_the_text_encoder_trains_fully_from_the_disk_cache_of_token_ids(tmp_path, clip_dir, vae_dir):
    from sdtrain.train.encode import cache_dataset
    from sdtrain.train.export import export_checkpoint

    data = write_image_folder(tmp_path / "data", count=8)
    run = tmp_path / "run"
    overrides = tiny_overrides(run, data, vae_dir, str(clip_dir), "text_encoder") + [
        "train.text_encoder.mode=full",
        "train.text_encoder.lr=1e-4",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    config = load_config(Config, None, overrides)
    cache_dataset(config)
    part = load_file(next((tmp_path / "cache").glob("part-*.safetensors")))
    assert part["cond.input_ids"].dtype == torch.int64 and "cond.encoder_hidden_states" not in part
    final = train(config)
    before = load_file(clip_dir / "text_encoder" / "model.safetensors")
    after = load_file(final / "text_encoder" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2  # every weight trains, not a few
    again = export_checkpoint(run, 4, tmp_path / "export")  # the checkpoint holds the encoder too
    for name in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(final / name), load_file(again / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_training_is_refused_before_work_where_the_family_has_none(tmp_path, pixart_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = pipeline_overrides(tmp_path / "run", data, pixart_dir) + ["train.text_encoder.mode=lora"]
    with pytest.raises(ValueError, match="pixart models train with frozen text encoders"):
        train(load_config(Config, None, overrides))
    assert not (tmp_path / "run").exists()

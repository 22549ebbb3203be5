"""A shortened `make demo` end to end: every stage runs, metrics and grids are written, a rerun reuses stages, and
a second demo from scratch trains the same weights and scores the same (fixed steps and seeds, no clock)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtrain.config import PRESETS, AutoencoderConfig, Config, load_config
from sdtrain.demo import EXPECTED_MINUTES, GOALS, goal_line, plan, run_demo


def test_the_demo_presets_train_fixed_steps_and_say_so():
    """No stage of the demo stops on the clock (its model would depend on the machine): each preset counts steps,
    and the plan printed at the start says them and the expected minutes."""
    vae = load_config(AutoencoderConfig, PRESETS / "demo-vae.yaml")
    assert vae.train.max_minutes is None and vae.train.num_steps == 1000
    for name in ("demo", "demo-dit"):
        stage = load_config(Config, name)
        assert stage.train.max_minutes is None and stage.train.num_steps * stage.train.batch_size == 27_200, name
        assert name in GOALS and 0 < EXPECTED_MINUTES[name][0] < EXPECTED_MINUTES[name][1]
        text = plan(vae, stage, "unet", EXPECTED_MINUTES[name])
        steps = f"{stage.train.num_steps:,} steps of {stage.train.batch_size} images"
        assert "1,000 steps of 16 crops" in text and steps in text and EXPECTED_MINUTES[name][2] in text
    assert goal_line(None) == []
    assert goal_line({"all_three": 0.95, "met": False}) == [
        "goal: seen and held-out prompts all three right >= 95%: NOT met"
    ]


@pytest.mark.slow  # the short demo, twice: make test-all
def test_quick_demo_end_to_end_reuse_and_a_second_from_scratch_trains_the_same(tmp_path, capsys):
    """The short demo writes its metrics and grids and says its steps and time; a rerun reuses its finished stages;
    every stage trains a fixed number of steps from fixed seeds, so a second demo in fresh folders ends with the same
    autoencoder and UNet, bit for bit, and the same scores (on one machine; across CPUs, see docs/demo.md)."""
    out, data = tmp_path / "a", tmp_path / "shapes-a"
    metrics = run_demo(out, data, quick=True)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["seen"] == metrics["seen"]
    for key in ("vae_psnr", "seen", "held_out", "reconstruct", "seconds"):
        assert key in saved, key
    for group in ("seen", "held_out"):
        assert set(saved[group]) >= {"color", "shape", "background", "all"}
        assert all(0.0 <= saved[group][k] <= 1.0 for k in ("color", "shape", "background", "all"))
    assert saved["held_out"]["count"] == 12 and saved["seen"]["count"] == 78
    assert 0.0 <= saved["reconstruct"]["edit_success"] <= 1.0
    assert saved["vae_psnr"] > 10.0
    for grid in ("grid_seen.png", "grid_held_out.png", "grid_reconstruct.png"):
        assert Image.open(out / grid).size[0] > 0
    first = capsys.readouterr().out
    assert "| seen |" in first and "metrics:" in first
    batch = load_config(Config, "demo").train.batch_size  # the quick demo changes the steps, not the batch
    assert "30 steps of 16 crops" in first and f"40 steps of {batch} images" in first and "this run took" in first
    assert "goal:" not in first  # the goals are the full demo's

    again = run_demo(out, data, quick=True)  # finished stages are reused, not retrained
    second = capsys.readouterr().out
    assert again["seconds"]["unet"] == metrics["seconds"]["unet"]  # a reused stage keeps its training time
    assert f"reusing {out / 'vae' / 'final'}" in second
    assert f"reusing {out / 'unet' / 'final'}" in second

    other = run_demo(tmp_path / "b", tmp_path / "shapes-b", quick=True)
    for weights in (
        "vae/final/diffusion_pytorch_model.safetensors",
        "unet/final/unet/diffusion_pytorch_model.safetensors",
    ):
        a, b = (load_file(tmp_path / run / weights) for run in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    for key in ("vae_psnr", "seen", "held_out", "reconstruct"):
        assert metrics[key] == other[key], key


def test_a_sana_demo_trains_the_autoencoder_its_pipeline_holds():
    """SanaPipeline reads an AutoencoderDC's config (its scale factor from the encoder's levels): a demo whose second
    stage is a Sana transformer trains the demo-vae preset as one, which the pipeline holds at the preset's f4; the
    preset's AutoencoderKL it cannot hold."""
    from diffusers import SanaPipeline

    from sdtrain.demo import autoencoder_overrides
    from sdtrain.train.autoencoder import build_autoencoder

    assert autoencoder_overrides("pixart") == [] and autoencoder_overrides("sd") == []
    for family, holds in (("sana", True), ("pixart", False)):
        vae = load_config(AutoencoderConfig, PRESETS / "demo-vae.yaml", autoencoder_overrides(family))
        model = build_autoencoder(vae.model)
        if holds:
            pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=model, transformer=None, scheduler=None)
            assert vae.model.kind == "dc" and pipe.vae_scale_factor == 4
        else:
            with pytest.raises(AttributeError, match="encoder_block_out_channels"):
                SanaPipeline(tokenizer=None, text_encoder=None, vae=model, transformer=None, scheduler=None)

"""Regularisation against the base model (``data.datasets[].target=base``, ai-toolkit's differential output
preservation): the frozen base's prediction is the target of those samples, so adapters at their initialisation
(which change nothing) have zero loss and gradient there, and moved adapters are pulled back to the base's output."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from sdtrain.config import Config, ConfigError, LoRAConfig, ObjectiveConfig, load_config
from sdtrain.models.lora import adapters_off, add_lora
from sdtrain.objective import BASE_TARGET, DDPM, Draw
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides, save_pipeline, tiny_unet, write_image_folder


def _sd_predict(unet, noisy, t, cond):
    return unet(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


def test_the_base_target_is_what_the_model_draws_with_its_adapters_off():
    base = tiny_unet()
    unet = tiny_unet()
    add_lora(unet, LoRAConfig(rank=4), ("to_q", "to_k", "to_v", "to_out.0"))
    latents, cond = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 5, 32)}
    draw = Draw(torch.randn(2, 4, 8, 8), torch.tensor([100, 700]))
    objective, flags = DDPM(ObjectiveConfig()), {BASE_TARGET: torch.tensor([1.0, 0.0])}
    base_ctx = functools.partial(adapters_off, unet)
    # at init (B = 0) the adapters change nothing: the preserved sample's loss and its gradient are zero
    _, per_sample = objective.loss(_sd_predict, unet, cond | flags, latents, draw, base=base_ctx)
    assert per_sample[0] == 0.0 and per_sample[1] > 0.0
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    loss, per_sample = objective.loss(_sd_predict, unet, cond | flags, latents, draw, base=base_ctx)
    noisy = objective.scheduler.add_noise(latents, draw.noise, draw.timesteps)
    with torch.no_grad():
        expected = _sd_predict(unet, noisy, draw.timesteps, cond) - _sd_predict(base, noisy, draw.timesteps, cond)
    torch.testing.assert_close(per_sample[0], expected[0].pow(2).mean(), rtol=1e-4, atol=1e-7)
    loss.backward()  # the adapters are on again, and trainable
    assert all(p.grad is not None for n, p in unet.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="needs the frozen base"):
        objective.loss(_sd_predict, unet, cond | flags, latents, draw)


def test_a_run_of_preserved_batches_alone_leaves_the_base_as_it_is(tmp_path, clip_dir, vae_dir):
    """Every micro-batch from a target=base dataset: the LoRA starts as the base, so each loss is exactly 0 and the
    adapters never move (another target would move them)."""
    base = save_pipeline(tmp_path / "base", tiny_unet(), clip_dir, vae_dir)
    data = write_image_folder(tmp_path / "data", count=4)
    dataset = {"path": str(data), "trigger": "a", "target": "base", "weight": 1.0}
    overrides = pipeline_overrides(tmp_path / "run", data, base) + [
        "data.weight=1e-9", f"data.datasets=[{json.dumps(dataset)}]", "train.lora.rank=4", "train.num_steps=3",
        "train.optim.lr=1e-2",
    ]  # fmt: skip
    train(load_config(Config, None, overrides))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert losses == [0.0, 0.0, 0.0]


def test_a_base_target_needs_a_lora_run():
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].target=base.*train.lora.rank"):
        load_config(Config, None, ["model.pretrained=x", "data.path=d", "data.datasets=[{path: e, target: base}]"])

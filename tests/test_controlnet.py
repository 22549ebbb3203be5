"""ControlNet for Stable Diffusion (model.family=sd-controlnet): made from a tiny SD folder's UNet as diffusers does,
trained on image + control pairs while the UNet stays frozen, exported as a StableDiffusionControlNetPipeline that
`sdtrain generate --control` samples pixel for pixel; the training call is the pipeline's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.sd_controlnet import CONTROL, ControlledUNet
from sdtrain.models.families.sd_controlnet import FAMILY as CONTROLNET
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides, save_pipeline, tiny_unet
from tests.test_conditions import write_pairs


def controls(folder: Path) -> Path:
    """``write_pairs``' references renamed as control images (``NAME.control.png``)."""
    for ref in sorted(folder.glob("*.ref.png")):
        ref.rename(ref.with_name(ref.name.replace(".ref.", ".control.")))
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("sd") / "sd", tiny_unet(), clip_dir, vae_dir)


def overrides(out: Path, data: Path, base: Path) -> list[str]:
    return pipeline_overrides(out, data, base) + ["model.family=sd-controlnet", "data.conditions=[control]"]


def test_a_controlnet_trains_for_a_frozen_unet_and_draws_its_pipelines_pixels(tmp_path, sd_dir):
    data = controls(write_pairs(tmp_path / "pairs", count=6, size=32))
    final = train(load_config(Config, None, overrides(tmp_path / "run", data, sd_dir)))
    assert detect(final) is CONTROLNET
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "StableDiffusionControlNetPipeline"
    unet, base = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (final, sd_dir))
    assert all(torch.equal(unet[k], base[k]) for k in base)  # the UNet stayed as it was
    zero = load_file(final / "controlnet" / "diffusion_pytorch_model.safetensors")["controlnet_mid_block.weight"]
    assert zero.abs().max() > 0  # the zero convolutions left zero

    control = Image.open(data / "001.control.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue square"]
    images = ours.generate(prompts, control=control, num_inference_steps=3, guidance_scale=2.0, height=32, width=40,
                           seed=2).images  # fmt: skip
    plain = StableDiffusionControlNetPipeline.from_pretrained(final, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(2 + i) for i in range(2)]
    theirs = plain(prompts, image=[control, control], num_inference_steps=3, guidance_scale=2.0, height=32, width=40,
                   generator=generators).images  # fmt: skip
    assert images[0].size == (40, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    from sdtrain.errors import Unsupported

    with pytest.raises(Unsupported, match="edit model"):
        ours.generate("a red square", reference=control)


def test_the_training_call_is_the_pipelines(sd_dir):
    """A ControlNet made from the UNet starts at the base's own prediction (its zero convolutions), and the training
    call is the pipeline's: the control image as its prepare_image gives it, the residuals into the UNet."""
    config = load_config(Config, None, [f"model.pretrained={sd_dir}", "model.family=sd-controlnet",
                                        "data.conditions=[control]", "data.path=x"])  # fmt: skip
    components = CONTROLNET.load(config)
    model = components.controlnet
    assert isinstance(model, ControlledUNet) and not any(p.requires_grad for p in model.unet.parameters())
    encoders = CONTROLNET.encoders(components)
    pixels = torch.rand(2, 3, 32, 40) * 2 - 1
    cond = CONTROLNET.encode_prompts(components, ["a red square", ""], "cpu")
    cond |= encoders.encode_conditions([pixels])
    x, t = torch.randn(2, 4, 16, 20), torch.tensor([100, 800])
    with torch.no_grad():
        torch.testing.assert_close(CONTROLNET.predict(model, x, t, cond), model.unet(x, t, **{
            "encoder_hidden_states": cond["encoder_hidden_states"]}).sample)  # fmt: skip
        for p in model.controlnet.controlnet_mid_block.parameters():
            p.normal_()  # as if trained: the residuals are no longer zero
        pipe = StableDiffusionControlNetPipeline(**CONTROLNET.pipeline_components(components), scheduler=None)
        images = [Image.fromarray(((p.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for p in pixels]
        prepared = pipe.prepare_image(images, 40, 32, 2, 1, "cpu", torch.float32)
        torch.testing.assert_close(encoders.encode_conditions([pixels])[CONTROL], prepared, atol=1 / 255, rtol=0)
        down, middle = pipe.controlnet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                                       controlnet_cond=cond[CONTROL], return_dict=False)  # fmt: skip
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": middle}
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], **residuals).sample
        assert torch.equal(CONTROLNET.predict(model, x, t, cond), theirs)


def test_controlnet_settings_are_checked(tmp_path, sd_dir):
    from sdtrain.train.preflight import check_conditions

    data = controls(write_pairs(tmp_path / "pairs", count=2))
    with pytest.raises(ConfigError, match="no LoRA"):
        check_conditions(load_config(Config, None, overrides(tmp_path / "r", data, sd_dir) + ["train.lora.rank=4"]))
    with pytest.raises(ConfigError, match="has no ControlNet"):
        check_conditions(load_config(Config, None, pipeline_overrides(tmp_path / "r", data, sd_dir)
                                     + ["model.controlnet=x"]))  # fmt: skip
    with pytest.raises(ConfigError, match="not model.unet.from_scratch"):
        CONTROLNET.load(load_config(Config, None, overrides(tmp_path / "r", data, sd_dir)
                                    + ["model.unet.from_scratch=true"]))  # fmt: skip


@pytest.mark.slow
def test_controlnet_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, sd_dir):
    """The ControlNet's run killed mid-accumulation after a checkpoint and rerun ends with the uninterrupted run's
    losses and weights bit for bit; under DDP 2 processes train what one does (the frozen UNet inside the trained
    model has no gradients to reduce)."""
    from tests.test_distributed import ADAM_EPS, _launch_ddp
    from tests.test_faults import KILLED, _losses, _train

    data = controls(write_pairs(tmp_path / "pairs", count=5, size=40))
    extra = ["train.gradient_accumulation=2", "train.num_steps=6", "train.save_every=3", ADAM_EPS]

    def weights(run: str) -> dict:
        return load_file(tmp_path / run / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")

    assert _train(overrides(tmp_path / "a", data, sd_dir) + extra).returncode == 0
    assert _train(overrides(tmp_path / "b", data, sd_dir) + extra, "kill_micro=8").returncode == KILLED
    assert _train(overrides(tmp_path / "b", data, sd_dir) + extra).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = weights("a"), weights("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = _launch_ddp(overrides(tmp_path / "two", data, sd_dir) + extra)
    assert result.returncode == 0 and "world size 2" in result.stderr, result.stderr[-3000:]
    one_losses = [loss for _, loss in _losses(tmp_path / "a")]
    assert [loss for _, loss in _losses(tmp_path / "two")] == pytest.approx(one_losses, rel=1e-5)
    two = weights("two")
    assert max((a[k] - two[k]).abs().max().item() for k in a) < 1e-6


def test_an_sdxl_controlnet_trains_and_draws_its_pipelines_pixels(tmp_path, sdxl_dir):
    """SDXL's: the ControlNet made from SDXL's UNet reads the pooled text and size ids too; the export loads in plain
    StableDiffusionXLControlNetPipeline and draws what `sdtrain generate --control` draws."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from sdtrain.models.families.sdxl_controlnet import FAMILY as SDXL_CONTROLNET

    data = controls(write_pairs(tmp_path / "pairs", count=4, size=32))
    extra = ["model.family=sdxl-controlnet", "data.conditions=[control]", "train.num_steps=2"]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, sdxl_dir) + extra))
    assert detect(final) is SDXL_CONTROLNET
    control = Image.open(data / "003.control.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    images = ours.generate(["a red square"], control=control, num_inference_steps=3, guidance_scale=2.0, height=32,
                           width=40, seed=1).images  # fmt: skip
    plain = StableDiffusionXLControlNetPipeline.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    theirs = plain(["a red square"], image=[control], num_inference_steps=3, guidance_scale=2.0, height=32, width=40,
                   generator=[torch.Generator().manual_seed(1)]).images  # fmt: skip
    assert np.array_equal(np.asarray(images[0]), np.asarray(theirs[0]))

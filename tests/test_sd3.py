"""Stable Diffusion 3 as the first flow-matching family: a tiny SD3 folder saved by diffusers fine-tunes with
model.pretrained alone, the export loads in plain StableDiffusion3Pipeline and draws the same pixels as sdtrain's
sampling, its prompts encode as the pipeline encodes them, and its LoRA export loads into the base pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.sd3 import FAMILY as SD3
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import (
    TINY_TRAINING,
    assert_comfyui_transformer_layout,
    evaluate_and_serve,
    pipeline_overrides,
    write_image_folder,
)

T5_TOKENS = ["model.text_encoder_3.max_length=32"]  # the tiny stand-in tokenizer's length, as the pipeline is called


def _plain(folder) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, sd3_dir):
    root = tmp_path_factory.mktemp("sd3-run")
    data = write_image_folder(root / "data", count=8, size=40)
    extra = ["train.objective.shift=3.0", "train.objective.timestep_sampling=logit_normal", *T5_TOKENS]
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, sd3_dir) + extra))
    return root, data, final


def test_an_sd3_folder_fine_tunes_with_flow_matching_and_samples_as_diffusers(tuned, sd3_dir):
    root, _, final = tuned
    assert detect(sd3_dir) is SD3 and detect(final) is SD3 and SD3.objectives == ("flow",)
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    before = load_file(sd3_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=2.0, seed=4).images
    plain = _plain(final)
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    theirs = plain(prompts, num_inference_steps=3, guidance_scale=2.0, generator=generators, max_sequence_length=32)
    for a, b in zip(images, theirs.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sd3_prompts_encode_as_the_pipeline_encodes_them(sd3_dir):
    pipe = _plain(sd3_dir)
    cond = SD3.encode_prompts(SD3.components_of(pipe), ["a red square"], "cpu")
    states, _, pooled, _ = pipe.encode_prompt(
        "a red square", None, None, do_classifier_free_guidance=False, max_sequence_length=32
    )
    assert torch.equal(cond["pooled_projections"], pooled)
    clip_tokens = pipe.tokenizer.model_max_length  # the CLIP part exactly; T5's runs under no_grad here (1e-6 apart)
    assert torch.equal(cond["encoder_hidden_states"][:, :clip_tokens], states[:, :clip_tokens])
    assert torch.allclose(cond["encoder_hidden_states"], states, atol=1e-5)


def test_sd3_lora_exports_in_diffusers_layout(tmp_path, sd3_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *T5_TOKENS]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, sd3_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") for k in adapters)
    assert any("add_q_proj" in k for k in adapters)  # both streams' projections adapted
    assert_comfyui_transformer_layout(adapters, sd3_dir)
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=32)
    base = _plain(sd3_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


@pytest.mark.slow  # SIGKILL chains: make test-all
def test_sd3_sigkill_then_resume_is_bit_exact(tmp_path, sd3_dir):
    """Flow matching resumes as DDPM does: SIGKILL at micro-batches and inside a save, then a rerun, ends with the
    uninterrupted run's losses and weights, bit for bit."""
    from tests.test_faults import KILLED, _losses, _train

    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.gradient_accumulation=2", "train.num_steps=8", "train.save_every=3", *T5_TOKENS]
    extra += ["train.objective.timestep_sampling=logit_normal", "train.objective.shift=3.0"]
    assert _train(pipeline_overrides(tmp_path / "a", data, sd3_dir) + extra).returncode == 0
    overrides = pipeline_overrides(tmp_path / "b", data, sd3_dir) + extra
    for fault in ("kill_micro=3", "kill_save=1:manifest", "kill_micro=5"):
        assert _train(overrides, fault).returncode == KILLED, fault
    assert _train(overrides).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = (load_file(tmp_path / r / "final" / "transformer" / "diffusion_pytorch_model.safetensors") for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sd3_reconstructs_through_its_img2img_pipeline(tuned):
    from PIL import Image

    _, data, final = tuned
    pipe = Pipeline.from_pretrained(final, device="cpu")
    image = Image.open(data / "001.png").convert("RGB")
    out = pipe.reconstruct("a green square", image, strength=0.6, num_inference_steps=4, seed=3).images[0]
    again = pipe.reconstruct("a green square", image, strength=0.6, num_inference_steps=4, seed=3).images[0]
    assert out.size == image.size and np.array_equal(np.asarray(out), np.asarray(again))


def test_sd3_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    """`sdtrain evaluate` (FID, KID, CLIP score) and the run browser's generation work on an SD3 export."""
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size == (64, 32)  # two 32 px images side by side


@pytest.mark.slow  # a two-process launch: make test-all
def test_sd3_two_processes_train_what_one_process_trains(tmp_path, sd3_dir):
    from tests.test_distributed import ADAM_EPS, _launch_ddp
    from tests.test_faults import _losses, _train

    data = write_image_folder(tmp_path / "data", count=5, size=40)
    extra = ["train.num_steps=4", "data.caption_dropout=0.3", "train.objective.timestep_sampling=logit_normal"]
    extra += [ADAM_EPS, *T5_TOKENS]
    assert _train(pipeline_overrides(tmp_path / "one", data, sd3_dir) + extra).returncode == 0
    result = _launch_ddp(pipeline_overrides(tmp_path / "two", data, sd3_dir) + extra)
    assert result.returncode == 0 and "world size 2" in result.stderr, result.stderr[-3000:]
    (steps_a, losses_a), (steps_b, losses_b) = zip(*_losses(tmp_path / "one")), zip(*_losses(tmp_path / "two"))
    assert steps_a == steps_b == (1, 2, 3, 4) and losses_b == pytest.approx(losses_a, rel=1e-5)
    a, b = (
        load_file(tmp_path / r / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
        for r in ("one", "two")
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_an_sd3_transformer_from_scratch_trains_with_the_family_named(tmp_path, sd3_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", f"data.path={data}", "data.resolution=32", "model.family=sd3",
        f"model.vae.path={vae_dir}", *[f"model.{n}.path={sd3_dir}" for n in ("text_encoder", "text_encoder_2",
                                                                            "text_encoder_3")],
        *[f"model.{n}.subfolder={n}" for n in ("text_encoder", "text_encoder_2", "text_encoder_3")],
        "model.transformer.num_layers=2", "model.transformer.num_attention_heads=2",
        "model.transformer.attention_head_dim=8", *T5_TOKENS, *TINY_TRAINING,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    transformer = Pipeline.from_pretrained(final, device="cpu").denoiser
    assert len(transformer.transformer_blocks) == 2 and transformer.config.sample_size == 16
    assert transformer.config.joint_attention_dim == 64 and transformer.config.pooled_projection_dim == 64

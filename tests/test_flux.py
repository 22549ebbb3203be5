"""Flux: a tiny folder saved by diffusers (a guidance-distilled transformer, FLUX.1 dev's dynamically shifted
scheduler) fine-tunes with model.pretrained alone; the training call packs the latents, places them and the text and
sets the timestep and guidance as FluxPipeline does; the export loads in plain FluxPipeline and draws the same pixels
as `sdtrain generate`; reconstruct runs through FluxImg2ImgPipeline; LoRA exports in diffusers' layout; a transformer
built from scratch trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.flux import FAMILY as FLUX
from sdtrain.models.families.flux import TRAIN_GUIDANCE
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import (
    assert_comfyui_transformer_layout,
    evaluate_and_serve,
    pipeline_overrides,
    resumes_and_shares,
    tiny_overrides,
    write_image_folder,
)

TOKENS = ["model.text_encoder_2.max_length=32"]  # the tiny T5's length (FLUX.1's is 512)
FLOW = ["train.objective.dynamic_shift=true", "train.objective.timestep_sampling=logit_normal", *TOKENS]


def _plain(folder) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, flux_dir):
    root = tmp_path_factory.mktemp("flux-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, flux_dir) + FLOW))
    return root, data, final


def test_a_flux_folder_fine_tunes_and_samples_as_diffusers(tuned, flux_dir):
    _, _, final = tuned
    assert detect(flux_dir) is FLUX and detect(final) is FLUX
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"]  # sampled with the shift it trained with
    before = load_file(flux_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=3.5, height=32, width=48, seed=4).images
    plain = _plain(final)
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    theirs = plain(prompts, num_inference_steps=3, guidance_scale=3.5, height=32, width=48, generator=generators,
                   max_sequence_length=32).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    edited = ours.reconstruct("a green square", images[0], strength=0.6, num_inference_steps=3).images
    assert edited[0].size == images[0].size


def test_flux_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    """`sdtrain evaluate` (FID, KID, CLIP score) and the run browser's generation work on a Flux export (whose
    transformer has no sample size: drawn at the pipeline's default, 128 latents a side)."""
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size[0] == 2 * grid.size[1]  # two square images side by side


def test_the_training_call_is_the_pipelines(flux_dir):
    """predict packs B x C x H x W latents into 2 x 2 patches with their position ids, passes the timestep as sigma
    and the guidance embedding's value, and unpacks the velocity: the pipeline's transformer call, on a non-square
    latent (rows and columns cannot be swapped unnoticed)."""
    pipe = _plain(flux_dir)
    components = FLUX.components_of(pipe)
    cond = FLUX.encode_prompts(components, ["a red circle", "a green triangle"], "cpu")
    latents, t = torch.randn(2, 4, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = FLUX.predict(pipe.transformer, latents, t, cond)
        packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 12)
        out = pipe.transformer(
            hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), TRAIN_GUIDANCE),
            pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32),
        ).sample  # fmt: skip
    f = pipe.vae_scale_factor
    assert torch.equal(ours, FluxPipeline._unpack_latents(out, 8 * f, 12 * f, f))
    states, pooled, _ = pipe.encode_prompt(["a red circle", "a green triangle"], None, max_sequence_length=32)
    assert torch.allclose(states, cond["encoder_hidden_states"], atol=1e-5)
    assert torch.allclose(pooled, cond["pooled_projections"], atol=1e-5)


def test_flux_lora_exports_in_diffusers_layout(tmp_path, flux_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *FLOW]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, flux_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") for k in adapters)
    assert any("add_q_proj" in k for k in adapters) and any("single_transformer_blocks" in k for k in adapters)
    assert_comfyui_transformer_layout(adapters, flux_dir)
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=32, height=32,
                  width=32)  # fmt: skip
    base = _plain(flux_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_a_flux_transformer_from_scratch_trains_with_the_family_named(tmp_path, flux_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = tiny_overrides(tmp_path / "run", data, vae_dir, str(flux_dir), "text_encoder") + [
        "model.family=flux", f"model.text_encoder_2.path={flux_dir}", "model.text_encoder_2.subfolder=text_encoder_2",
        "model.transformer.num_layers=1", "model.transformer.num_single_layers=2",
        "model.transformer.num_attention_heads=2", "model.transformer.attention_head_dim=16", *TOKENS,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    transformer = Pipeline.from_pretrained(final, device="cpu").denoiser
    assert len(transformer.single_transformer_blocks) == 2 and not transformer.config.guidance_embeds
    assert tuple(transformer.config.axes_dims_rope) == (4, 6, 6)


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_flux_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, flux_dir):
    resumes_and_shares(tmp_path, flux_dir, FLOW)

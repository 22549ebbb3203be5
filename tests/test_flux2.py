"""FLUX.2 dev: a tiny folder saved by diffusers fine-tunes with model.pretrained alone; prompts are encoded as
Flux2Pipeline.encode_prompt encodes them (the system message in Mistral's chat format, the hidden states 10, 20 and
30 side by side); the training call patchifies, packs and positions the latents and sets the guidance embedding as
the pipeline does; the export loads in plain Flux2Pipeline and draws the same pixels as `sdtrain generate` (the
guidance in the embedding); LoRA exports in diffusers' layout, loads into the base pipeline and names only modules
ComfyUI's FLUX.2 mapping reads; a transformer built from scratch trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.errors import Unsupported
from sdtrain.models.families import detect
from sdtrain.models.families.flux2 import FAMILY as FLUX2
from sdtrain.models.families.flux2 import TRAIN_GUIDANCE
from sdtrain.models.vae import decode_latents, encode_moments, scale_latents, unscale_latents
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
from tests.test_flux2_klein import comfyui_flux2_modules

TOKENS = ["model.text_encoder.max_length=320"]  # the tiny tokenizer's length (the pipeline's is 512)
FLOW = ["train.objective.dynamic_shift=true", "train.objective.timestep_sampling=logit_normal", *TOKENS]


def _plain(folder) -> Flux2Pipeline:
    pipe = Flux2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, flux2_dir):
    root = tmp_path_factory.mktemp("flux2-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, flux2_dir) + FLOW))
    return root, data, final


def test_a_flux2_folder_fine_tunes_and_samples_as_diffusers(tuned, flux2_dir):
    _, _, final = tuned
    assert detect(flux2_dir) is FLUX2 and detect(final) is FLUX2
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "Flux2Pipeline"
    before = load_file(flux2_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48, seed=4).images
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    theirs = _plain(final)(prompt=prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48,
                           generator=generators, max_sequence_length=320).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Unsupported, match="no negative prompt"):
        ours.generate(prompts[0], negative_prompt="blurry", num_inference_steps=1, height=32, width=32)
    with pytest.raises(Unsupported, match="no image-to-image pipeline"):
        ours.reconstruct("a green square", images[0])


def test_flux2_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size[0] == 2 * grid.size[1]


def test_prompts_latents_and_the_training_call_are_the_pipelines(flux2_dir):
    """encode_prompts gives the pipeline's embeddings; the latents are the pipeline's, patchified and normalised by
    the batch norm's statistics, and decode back; predict calls the transformer as the pipeline does (patchified,
    packed, the position ids of time, row, column and layer, the time sigma) on a non-square latent."""
    pipe = _plain(flux2_dir)
    components = FLUX2.components_of(pipe)
    prompts = ["a red circle", "a green triangle on blue"]
    cond = FLUX2.encode_prompts(components, prompts, "cpu")
    with torch.no_grad():
        theirs, text_ids = pipe.encode_prompt(prompts, max_sequence_length=320)
    assert theirs.shape == (2, 320, 48) and torch.equal(cond["encoder_hidden_states"], theirs)

    pixels = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = encode_moments(pipe.vae, pixels)
    latents = scale_latents(pipe.vae, mean)
    with torch.no_grad():
        their_latents = pipe._encode_vae_image(pixels, generator=None)  # the mode, patchified and normalised
    assert latents.shape == (1, 4, 8, 12) and torch.equal(pipe._patchify_latents(latents), their_latents)
    assert torch.allclose(unscale_latents(pipe.vae, latents), mean, atol=1e-6)
    assert decode_latents(pipe.vae, latents).shape == pixels.shape

    latents, t = torch.randn(2, 4, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = FLUX2.predict(pipe.transformer, latents, t, cond)
        patches = pipe._patchify_latents(latents)
        ids = pipe._prepare_latent_ids(patches)
        guidance = torch.full((2,), TRAIN_GUIDANCE)  # the embedding's value in training
        out = pipe.transformer(hidden_states=pipe._pack_latents(patches), timestep=t / 1000, guidance=guidance,
                               encoder_hidden_states=theirs, txt_ids=text_ids, img_ids=ids,
                               return_dict=False)[0]  # fmt: skip
    assert torch.equal(ours, pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, ids)))


def test_flux2_lora_exports_in_the_layout_diffusers_and_comfyui_load(tmp_path, flux2_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *FLOW]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, flux2_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert_comfyui_transformer_layout(adapters, flux2_dir)
    modules = {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in adapters}
    assert {"single_transformer_blocks.0.attn.to_qkv_mlp_proj", "transformer_blocks.0.attn.to_q"} <= modules
    assert modules <= comfyui_flux2_modules(1, 1)  # each one ComfyUI maps onto its FLUX.2 weights
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=320, height=32,
                  width=32)  # fmt: skip
    base = _plain(flux2_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_a_flux2_transformer_from_scratch_trains_with_the_family_named(tmp_path, flux2_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = tiny_overrides(tmp_path / "run", data, flux2_dir, str(flux2_dir), "text_encoder") + [
        "model.vae.subfolder=vae", "model.family=flux2", "model.transformer.num_layers=1",
        "model.transformer.num_single_layers=1", "model.transformer.num_attention_heads=2",
        "model.transformer.attention_head_dim=16", *FLOW,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    pipe = Pipeline.from_pretrained(final, device="cpu")
    assert pipe.family is FLUX2 and len(pipe.denoiser.single_transformer_blocks) == 1
    assert list(pipe.denoiser.config.axes_dims_rope) == [4, 4, 4, 4] and pipe.denoiser.config.in_channels == 16


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_flux2_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, flux2_dir):
    resumes_and_shares(tmp_path, flux2_dir, FLOW)

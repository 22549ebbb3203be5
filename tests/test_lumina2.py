"""Lumina 2: a tiny folder saved by diffusers fine-tunes with model.pretrained alone; prompts are encoded as
Lumina2Pipeline.encode_prompt encodes them (the system prompt, Gemma's second-to-last hidden state, the mask of the
real tokens) and the empty prompt as its negative; the training call is the pipeline's (the time 1 - sigma, the mask)
and its negated output the velocity; the export loads in plain Lumina2Pipeline and draws the same pixels as `sdtrain
generate`; LoRA exports in diffusers' layout (loaded into the base pipeline: the merged export) and under the names
ComfyUI's Lumina 2 mapping reads, each key one it maps; a transformer built from scratch trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Lumina2Pipeline
from safetensors.torch import load_file

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.errors import Unsupported
from sdtrain.models.families import detect
from sdtrain.models.families.lumina2 import FAMILY as LUMINA2
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
from tests.test_zimage import comfyui_zimage_modules

FLOW = ["train.objective.dynamic_shift=true", "train.objective.timestep_sampling=logit_normal"]


def _plain(folder) -> Lumina2Pipeline:
    pipe = Lumina2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, lumina2_dir):
    root = tmp_path_factory.mktemp("lumina2-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, lumina2_dir) + FLOW))
    return root, data, final


def test_a_lumina2_folder_fine_tunes_and_samples_as_diffusers(tuned, lumina2_dir):
    _, _, final = tuned
    assert detect(lumina2_dir) is LUMINA2 and detect(final) is LUMINA2
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "Lumina2Pipeline"
    before = load_file(lumina2_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48, seed=4).images
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    theirs = _plain(final)(prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48,
                           generator=generators).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Unsupported, match="no image-to-image pipeline"):
        ours.reconstruct("a green square", images[0])


def test_lumina2_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size[0] == 2 * grid.size[1]


def test_prompts_and_the_training_call_are_the_pipelines(lumina2_dir):
    """encode_prompts gives the pipeline's embeddings and mask, the empty prompt its negative's; predict calls the
    transformer as the pipeline does (the time 1 - sigma, the mask) and negates its output, on a non-square latent."""
    pipe = _plain(lumina2_dir)
    components = LUMINA2.components_of(pipe)
    prompts = ["a red circle", "a green triangle on blue"]
    cond = LUMINA2.encode_prompts(components, prompts, "cpu")
    with torch.no_grad():
        theirs, mask, negative, negative_mask = pipe.encode_prompt(prompts, negative_prompt=["", ""])
    assert torch.equal(cond["encoder_hidden_states"], theirs) and torch.equal(cond["encoder_attention_mask"], mask)
    empty = LUMINA2.encode_prompts(components, [""], "cpu")
    assert torch.equal(empty["encoder_hidden_states"], negative[:1])
    assert torch.equal(empty["encoder_attention_mask"], negative_mask[:1])
    latents, t = torch.randn(2, 4, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = LUMINA2.predict(pipe.transformer, latents, t, cond)
        out = pipe.transformer(hidden_states=latents, timestep=1 - t / 1000, encoder_hidden_states=theirs,
                               encoder_attention_mask=mask, return_dict=False)[0]  # fmt: skip
    assert torch.equal(ours, -out)


def test_lumina2_lora_exports_for_diffusers_and_under_comfyuis_names(tmp_path, lumina2_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *FLOW]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, lumina2_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert_comfyui_transformer_layout(adapters, lumina2_dir)  # diffusers' names, for load_lora_weights
    comfy = load_file(final / "lora" / "lora_comfyui.safetensors")
    modules = {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in comfy}
    assert modules == comfyui_zimage_modules(2, 2)  # every module ComfyUI's z_image_to_diffusers maps, by its names
    renamed = {k.replace(".attn.", ".attention.").replace(".linear_", ".w"): v for k, v in adapters.items()}
    assert comfy.keys() == renamed.keys() and all(torch.equal(comfy[k], renamed[k]) for k in comfy)  # the same tensors
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", height=32, width=32,
                  guidance_scale=3.0)  # fmt: skip
    base = _plain(lumina2_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_a_lumina2_transformer_from_scratch_trains_with_the_family_named(tmp_path, lumina2_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = tiny_overrides(tmp_path / "run", data, lumina2_dir, str(lumina2_dir), "text_encoder") + [
        "model.vae.subfolder=vae", "model.family=lumina2", "model.transformer.num_layers=1",
        "model.transformer.num_attention_heads=2", "model.transformer.attention_head_dim=12", *FLOW,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    pipe = Pipeline.from_pretrained(final, device="cpu")
    assert pipe.family is LUMINA2 and len(pipe.denoiser.layers) == 1
    assert list(pipe.denoiser.config.axes_dim_rope) == [4, 4, 4]
    other = tiny_overrides(tmp_path / "other", data, vae_dir, str(lumina2_dir), "text_encoder")  # factor 2
    with pytest.raises(ConfigError, match="8 pixels per latent"):
        train(load_config(Config, None, other + ["model.family=lumina2", *FLOW]))


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_lumina2_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, lumina2_dir):
    resumes_and_shares(tmp_path, lumina2_dir, FLOW)

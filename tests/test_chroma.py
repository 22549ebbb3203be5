"""Chroma: a tiny folder saved by diffusers fine-tunes with model.pretrained alone; prompts are encoded as
ChromaPipeline.encode_prompt encodes them (T5 with its padding masked, the transformer's text mask); the training call
packs the latents and extends the mask as the pipeline does; the export loads in plain ChromaPipeline and draws the
same pixels as `sdtrain generate` under real classifier-free guidance; reconstruct runs through ChromaImg2ImgPipeline;
LoRA exports in diffusers' layout, which ComfyUI's Flux mapping (its Chroma model is a Flux model) reads key by key; a
transformer built from scratch trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import ChromaPipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.chroma import FAMILY as CHROMA
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

TOKENS = ["model.text_encoder.max_length=32"]  # the tiny T5's length (Chroma's is 512)
FLOW = ["train.objective.dynamic_shift=true", "train.objective.timestep_sampling=logit_normal", *TOKENS]


def _plain(folder) -> ChromaPipeline:
    pipe = ChromaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def comfyui_flux_modules(double: int, single: int) -> set[str]:
    """The diffusers module names ComfyUI's ``comfy.utils.flux_to_diffusers`` maps onto its Flux (and Chroma) model,
    the weights a LoRA may adapt: both streams' attention and MLPs of each double block, a single block's q, k, v, MLP
    input and output."""
    pair = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
            "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
            "ff_context.net.2"]  # fmt: skip
    alone = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
    return {f"transformer_blocks.{i}.{m}" for i in range(double) for m in pair} | {
        f"single_transformer_blocks.{i}.{m}" for i in range(single) for m in alone
    }


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, chroma_dir):
    root = tmp_path_factory.mktemp("chroma-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, chroma_dir) + FLOW))
    return root, data, final


def test_a_chroma_folder_fine_tunes_and_samples_as_diffusers(tuned, chroma_dir):
    _, _, final = tuned
    assert detect(chroma_dir) is CHROMA and detect(final) is CHROMA
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "ChromaPipeline"
    before = load_file(chroma_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=4.0, height=32, width=48, seed=4).images
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    plain = _plain(final)
    with torch.no_grad():  # the prompts' embeddings with boolean masks, the padding excluded (see the family module)
        states, _, mask, negative, _, negative_mask = plain.encode_prompt(prompts, None, max_sequence_length=32)
    theirs = plain(prompt_embeds=states, prompt_attention_mask=mask.bool(), negative_prompt_embeds=negative,
                   negative_prompt_attention_mask=negative_mask.bool(), num_inference_steps=3, guidance_scale=4.0,
                   height=32, width=48, generator=generators).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    edited = ours.reconstruct("a green square", images[0], strength=0.6, num_inference_steps=3).images
    assert edited[0].size == images[0].size


def test_chroma_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size[0] == 2 * grid.size[1]


def test_prompts_and_the_training_call_are_the_pipelines(chroma_dir):
    """encode_prompts gives the pipeline's embeddings and text mask; predict packs B x C x H x W latents with their
    position ids, extends the mask over the image tokens and passes the timestep as sigma: the pipeline's call, on a
    non-square latent, its mask boolean (the padding excluded, as Chroma trained: diffusers' pipeline, given
    strings, hands the mask to attention as floats, which only bias the scores): what lies past the first padding
    token changes nothing."""
    pipe = _plain(chroma_dir)
    components = CHROMA.components_of(pipe)
    prompts = ["a red circle", "a green triangle"]
    cond = CHROMA.encode_prompts(components, prompts, "cpu")
    states, _, mask, *_ = pipe.encode_prompt(prompts, None, do_classifier_free_guidance=False, max_sequence_length=32)
    assert torch.allclose(states, cond["encoder_hidden_states"], atol=1e-6)  # T5 under no_grad: other kernels
    assert torch.equal(mask, cond["attention_mask"]) and 0 < mask[0].sum() < mask[1].sum() < 32
    latents, t = torch.randn(2, 4, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = CHROMA.predict(pipe.transformer, latents, t, cond)
        packed = ChromaPipeline._pack_latents(latents, 2, 4, 8, 12)
        out = pipe.transformer(
            hidden_states=packed, timestep=t / 1000, encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=torch.zeros(states.shape[1], 3),
            img_ids=ChromaPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32),
            attention_mask=pipe._prepare_attention_mask(2, 24, torch.float32, mask.bool()),
        ).sample  # fmt: skip
        f = pipe.vae_scale_factor
        assert torch.equal(ours, ChromaPipeline._unpack_latents(out, 8 * f, 12 * f, f))
        hidden = cond["encoder_hidden_states"].clone()
        hidden[mask == 0] = 100.0  # the masked text tokens
        assert torch.allclose(CHROMA.predict(pipe.transformer, latents, t, cond | {"encoder_hidden_states": hidden}),
                              ours, atol=1e-5)  # fmt: skip


def test_chroma_lora_exports_in_the_layouts_diffusers_and_comfyui_load(tmp_path, chroma_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *FLOW]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, chroma_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert any("add_q_proj" in k for k in adapters) and any("single_transformer_blocks" in k for k in adapters)
    assert_comfyui_transformer_layout(adapters, chroma_dir)
    mapped = comfyui_flux_modules(1, 1)
    assert {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in adapters} <= mapped
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=32, height=32,
                  width=32, guidance_scale=3.0)  # fmt: skip
    base = _plain(chroma_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_a_chroma_transformer_from_scratch_trains_with_the_family_named(tmp_path, chroma_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = tiny_overrides(tmp_path / "run", data, vae_dir, str(chroma_dir), "text_encoder") + [
        "model.family=chroma", "model.transformer.num_layers=1", "model.transformer.num_single_layers=2",
        "model.transformer.num_attention_heads=2", "model.transformer.attention_head_dim=16", *TOKENS,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    pipe = Pipeline.from_pretrained(final, device="cpu")
    assert pipe.family is CHROMA and len(pipe.denoiser.single_transformer_blocks) == 2
    assert tuple(pipe.denoiser.config.axes_dims_rope) == (4, 6, 6)


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_chroma_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, chroma_dir):
    resumes_and_shares(tmp_path, chroma_dir, FLOW)

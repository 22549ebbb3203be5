"""Z-Image: a tiny folder saved by diffusers fine-tunes with model.pretrained alone; prompts are encoded as
ZImagePipeline.encode_prompt encodes them (the chat template, the second-to-last hidden state, the padding dropped);
the training call hands the transformer the pipeline's list of latents and of each prompt's real tokens at the
pipeline's time and turns its negated output into the velocity; the export loads in plain ZImagePipeline and draws
the same pixels as `sdtrain generate`; reconstruct runs through ZImageImg2ImgPipeline; LoRA exports in diffusers'
layout, every key one that ComfyUI's Z-Image mapping reads; a transformer built from scratch trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.zimage import FAMILY as ZIMAGE
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

TOKENS = ["model.text_encoder.max_length=96"]  # the tiny tokenizer's length (Z-Image's is 512)
FLOW = ["train.objective.shift=3.0", "train.objective.timestep_sampling=logit_normal", *TOKENS]


def _plain(folder) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def comfyui_zimage_modules(layers: int, refiners: int) -> set[str]:
    """The diffusers module names ComfyUI's ``comfy.utils.z_image_to_diffusers`` maps onto its Z-Image (Lumina 2)
    model, the weights a LoRA may adapt: each block's attention q, k, v and output and its feed-forward w1, w2, w3, in
    the main layers and both refiners."""
    inside = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
              "feed_forward.w2", "feed_forward.w3"]  # fmt: skip
    blocks = [f"layers.{i}" for i in range(layers)]
    blocks += [f"{name}.{i}" for name in ("context_refiner", "noise_refiner") for i in range(refiners)]
    return {f"{block}.{m}" for block in blocks for m in inside}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, zimage_dir):
    root = tmp_path_factory.mktemp("zimage-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, zimage_dir) + FLOW))
    return root, data, final


def test_a_zimage_folder_fine_tunes_and_samples_as_diffusers(tuned, zimage_dir):
    _, _, final = tuned
    assert detect(zimage_dir) is ZIMAGE and detect(final) is ZIMAGE
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"
    before = load_file(zimage_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48, seed=4).images
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    theirs = _plain(final)(prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48,
                           generator=generators, max_sequence_length=96).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    edited = ours.reconstruct("a green square", images[0], strength=0.6, num_inference_steps=3).images
    assert edited[0].size == images[0].size


def test_zimage_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size[0] == 2 * grid.size[1]


def test_prompts_and_the_training_call_are_the_pipelines(zimage_dir):
    """encode_prompts gives the pipeline's per-prompt embeddings, padded, with the mask of the real tokens; predict
    calls the transformer as the pipeline does (a frame axis, each prompt's real tokens, the time 1 - sigma) and
    negates its output into the velocity, on a non-square latent; the padding's states change nothing."""
    pipe = _plain(zimage_dir)
    components = ZIMAGE.components_of(pipe)
    prompts = ["a red circle", "a green triangle on blue"]
    cond = ZIMAGE.encode_prompts(components, prompts, "cpu")
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=96)
    mask = cond["attention_mask"].bool()
    assert [len(t) for t in theirs] == mask.sum(1).tolist() and len(theirs[0]) < len(theirs[1]) < 96
    for states, real, expected in zip(cond["encoder_hidden_states"], mask, theirs):
        assert torch.equal(states[real], expected)
    latents, t = torch.randn(2, 4, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = ZIMAGE.predict(pipe.transformer, latents, t, cond)
        out = pipe.transformer(list(latents.unsqueeze(2).unbind(0)), (1000 - t) / 1000, theirs, return_dict=False)[0]
        assert torch.equal(ours, -torch.stack(out).squeeze(2))
        padded = cond["encoder_hidden_states"].clone()
        padded[~mask] = 100.0
        assert torch.equal(
            ZIMAGE.predict(pipe.transformer, latents, t, cond | {"encoder_hidden_states": padded}), ours
        )


def test_zimage_lora_exports_in_the_layouts_diffusers_and_comfyui_load(tmp_path, zimage_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *FLOW]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, zimage_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert any("feed_forward.w2" in k for k in adapters) and any("context_refiner" in k for k in adapters)
    assert_comfyui_transformer_layout(adapters, zimage_dir)
    modules = {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in adapters}
    assert modules == comfyui_zimage_modules(2, 1)  # every block's attention and feed-forward, each one ComfyUI maps
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=96, height=32,
                  width=32, guidance_scale=3.0)  # fmt: skip
    base = _plain(zimage_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_a_zimage_transformer_from_scratch_trains_with_the_family_named(tmp_path, zimage_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = tiny_overrides(tmp_path / "run", data, vae_dir, str(zimage_dir), "text_encoder") + [
        "model.family=zimage", "model.transformer.num_layers=1", "model.transformer.num_attention_heads=2",
        "model.transformer.attention_head_dim=16", *FLOW,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    pipe = Pipeline.from_pretrained(final, device="cpu")
    assert pipe.family is ZIMAGE and len(pipe.denoiser.layers) == 1
    assert list(pipe.denoiser.config.axes_dims) == [4, 6, 6]


def test_a_zimage_lora_run_with_block_swap_equals_the_run_without(tmp_path, zimage_dir):
    """`train.offload.blocks=1` swaps one of the S3-DiT's main layers (bf16 base, checkpointing): the losses and the
    LoRA file equal the run without block swap bit for bit."""
    data = write_image_folder(tmp_path / "data", count=4, size=32)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.mixed_precision=bf16",
             "train.gradient_checkpointing=true", "train.num_steps=3", *FLOW]  # fmt: skip
    for name, swap in (("plain", []), ("swap", ["train.offload.blocks=1"])):
        train(load_config(Config, None, pipeline_overrides(tmp_path / name, data, zimage_dir) + extra + swap))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "log.jsonl").read_text().splitlines()
               if '"loss"' in line] for n in ("plain", "swap")]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 3
    a, b = (load_file(tmp_path / n / "final" / "lora" / "pytorch_lora_weights.safetensors") for n in ("plain", "swap"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_zimage_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, zimage_dir):
    # the S3-DiT pads each call's captions to the longest of its batch: two processes' halves pad otherwise than one
    # process's whole batch, which moves the sums of the (masked) attention by float rounding (1.7e-6 after 6 steps)
    resumes_and_shares(tmp_path, zimage_dir, FLOW, tolerance=5e-6)

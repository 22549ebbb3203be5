"""Qwen-Image: a tiny folder saved by diffusers fine-tunes with model.pretrained alone; prompts are encoded as
QwenImagePipeline.encode_prompt encodes them (the system template, the last hidden state of the real tokens after the
template's first 34); the training call hands the transformer the pipeline's packed latents, image shapes, time and
masked prompts; the export loads in plain QwenImagePipeline and draws the same pixels as `sdtrain generate` (real
classifier-free guidance, true_cfg_scale); reconstruct runs through QwenImageImg2ImgPipeline; the autoencoder's
per-channel statistics round-trip; LoRA exports in diffusers' layout, every key one ComfyUI's Qwen-Image mapping reads;
a transformer built from scratch trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import load_file

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.qwenimage import FAMILY as QWENIMAGE
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

TOKENS = ["model.text_encoder.max_length=256"]  # the tiny tokenizer's length (Qwen-Image's is 1024)
FLOW = ["train.objective.dynamic_shift=true", "train.objective.max_shift=0.9", "train.objective.max_seq_len=8192",
        "train.objective.shift_terminal=0.02", "train.objective.timestep_sampling=logit_normal", *TOKENS]  # fmt: skip


def _plain(folder) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def comfyui_qwenimage_modules(blocks: int) -> set[str]:
    """The module names of ComfyUI's Qwen-Image model (``comfy/ldm/qwen_image/model.py``, diffusers' names; its
    ``comfy/lora.py`` maps ``transformer.<name>`` onto them) that the default LoRA adapts: each block's attention
    projections of both streams."""
    inside = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    return {f"transformer_blocks.{i}.attn.{m}" for i in range(blocks) for m in inside}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, qwenimage_dir):
    root = tmp_path_factory.mktemp("qwenimage-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, qwenimage_dir) + FLOW))
    return root, data, final


def test_a_qwenimage_folder_fine_tunes_and_samples_as_diffusers(tuned, qwenimage_dir):
    _, _, final = tuned
    assert detect(qwenimage_dir) is QWENIMAGE and detect(final) is QWENIMAGE
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift_terminal"] == 0.02 and scheduler["use_dynamic_shifting"]
    before = load_file(qwenimage_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=3.0, height=32, width=48, seed=4).images
    generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
    theirs = _plain(final)(prompts, negative_prompt=[" ", " "], true_cfg_scale=3.0, num_inference_steps=3, height=32,
                           width=48, generator=generators, max_sequence_length=256).images  # fmt: skip
    unguided = _plain(final)(prompts, num_inference_steps=3, height=32, width=48, max_sequence_length=256,
                             generator=[torch.Generator().manual_seed(4 + i) for i in range(2)]).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(unguided[0]))  # the guidance is real
    edited = ours.reconstruct("a green square", images[0], strength=0.6, num_inference_steps=3).images
    assert edited[0].size == images[0].size


def test_qwenimage_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size[0] == 2 * grid.size[1]


def test_prompts_latents_and_the_training_call_are_the_pipelines(qwenimage_dir):
    """encode_prompts gives the pipeline's embeddings, padded, with the mask of the real tokens; the latents are
    normalised per channel as the pipeline normalises them, and decode back; predict calls the transformer as the
    pipeline does (packed latents, their shape, the time sigma, the prompts and their mask) on a non-square latent;
    the padding's states change nothing."""
    pipe = _plain(qwenimage_dir)
    components = QWENIMAGE.components_of(pipe)
    components.tokenizer.model_max_length = 256
    prompts = ["a red circle", "a green triangle on blue"]
    cond = QWENIMAGE.encode_prompts(components, prompts, "cpu")
    with torch.no_grad():
        theirs, their_mask = pipe.encode_prompt(prompts, max_sequence_length=256)
    mask = cond["attention_mask"].bool()
    longest = theirs.shape[1]
    assert torch.equal(mask[:, :longest], their_mask.bool()) and not mask[:, longest:].any()
    assert mask.sum(1)[0] < mask.sum(1)[1] == longest < 256
    assert torch.equal(cond["encoder_hidden_states"][:, :longest][mask[:, :longest]], theirs[their_mask.bool()])
    empty = QWENIMAGE.encode_prompts(components, [""], "cpu")  # caption dropout: the negative sampling guides against
    with torch.no_grad():
        negative, _ = pipe.encode_prompt([" "], max_sequence_length=256)
    assert torch.equal(empty["encoder_hidden_states"][:, : negative.shape[1]], negative)

    pixels = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = encode_moments(pipe.vae, pixels)
    latents = scale_latents(pipe.vae, mean)
    with torch.no_grad():
        their_latents = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    c = pipe.vae.config
    expected = (their_latents - torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)) * (
        1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    )
    assert latents.shape == (1, 16, 4, 6) and torch.equal(latents, expected.squeeze(2))
    assert torch.allclose(unscale_latents(pipe.vae, latents), mean, atol=1e-6)
    assert decode_latents(pipe.vae, latents).shape == pixels.shape

    latents, t = torch.randn(2, 16, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = QWENIMAGE.predict(pipe.transformer, latents, t, cond)
        packed = pipe._pack_latents(latents.unsqueeze(2), 2, 16, 8, 12)
        out = pipe.transformer(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=theirs,
                               encoder_hidden_states_mask=their_mask, img_shapes=[[(1, 4, 6)]] * 2,
                               return_dict=False)[0]  # fmt: skip
        assert torch.equal(ours, pipe._unpack_latents(out, 8 * 8, 12 * 8, 8).squeeze(2))
        padded = cond["encoder_hidden_states"].clone()
        padded[~mask] = 100.0
        assert torch.equal(
            QWENIMAGE.predict(pipe.transformer, latents, t, cond | {"encoder_hidden_states": padded}), ours
        )


def test_qwenimage_lora_exports_in_the_layouts_diffusers_and_comfyui_load(tmp_path, qwenimage_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *FLOW]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, qwenimage_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert_comfyui_transformer_layout(adapters, qwenimage_dir)
    modules = {k.removeprefix("transformer.").rpartition(".lora_")[0] for k in adapters}
    assert modules == comfyui_qwenimage_modules(2)
    kwargs = dict(prompt="a red square", negative_prompt=" ", true_cfg_scale=3.0, num_inference_steps=3,
                  output_type="np", max_sequence_length=256, height=32, width=32)  # fmt: skip
    base = _plain(qwenimage_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_a_qwenimage_transformer_from_scratch_trains_with_the_family_named(tmp_path, qwenimage_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = tiny_overrides(tmp_path / "run", data, qwenimage_dir, str(qwenimage_dir), "text_encoder") + [
        "model.vae.subfolder=vae", "model.family=qwenimage", "model.transformer.num_layers=1",
        "model.transformer.num_attention_heads=2", "model.transformer.attention_head_dim=16", *FLOW,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    pipe = Pipeline.from_pretrained(final, device="cpu")
    assert pipe.family is QWENIMAGE and len(pipe.denoiser.transformer_blocks) == 1
    assert list(pipe.denoiser.config.axes_dims_rope) == [4, 6, 6] and pipe.denoiser.config.in_channels == 64
    # another family's autoencoder is refused: the pipeline normalises and decodes Qwen-Image's own
    other = tiny_overrides(tmp_path / "other", data, vae_dir, str(qwenimage_dir), "text_encoder")
    with pytest.raises(ConfigError, match="AutoencoderKLQwenImage"):
        train(load_config(Config, None, other + ["model.family=qwenimage", *FLOW]))


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_qwenimage_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, qwenimage_dir):
    resumes_and_shares(tmp_path, qwenimage_dir, FLOW)

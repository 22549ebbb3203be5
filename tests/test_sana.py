"""Sana: a tiny folder saved by diffusers (Gemma 2, AutoencoderDC, SanaTransformer2DModel, DPM-Solver on flow
sigmas) fine-tunes with model.pretrained alone by flow matching; its prompts encode as SanaPipeline.encode_prompt
encodes them (its complex human instruction prepended); the export loads in plain SanaPipeline and draws the same
pixels as `sdtrain generate`; LoRA exports for load_lora_weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.sana import FAMILY as SANA
from sdtrain.models.families.sana import INSTRUCTION
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import (
    TINY_TRAINING,
    evaluate_and_serve,
    pipeline_overrides,
    resumes_and_shares,
    write_image_folder,
)

SAMPLER = ["sample.scheduler=dpmpp_2m"]  # the folder's own sampler (sdtrain's default name is euler)


def _plain(folder) -> SanaPipeline:
    pipe = SanaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_sana_folder_fine_tunes_and_samples_as_diffusers(tmp_path, sana_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = pipeline_overrides(tmp_path / "run", data, sana_dir) + SAMPLER + ["train.objective.shift=3.0"]
    final = train(load_config(Config, None, overrides))
    assert detect(sana_dir) is SANA and detect(final) is SANA
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "SanaPipeline"
    before = load_file(sana_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=4.5, height=32, width=32, seed=3).images
    plain = _plain(final)
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    theirs = plain(prompts, num_inference_steps=3, guidance_scale=4.5, height=32, width=32, generator=generators,
                   max_sequence_length=24, use_resolution_binning=False).images  # fmt: skip
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="no image-to-image pipeline"):
        ours.reconstruct("a red square", images[0])


def test_sana_prompts_encode_with_the_pipelines_instruction(sana_dir):
    pipe = _plain(sana_dir)
    cond = SANA.encode_prompts(SANA.components_of(pipe), ["A red square"], "cpu")
    # as SanaPipeline.__call__ calls it, with its default instruction
    kwargs = dict(do_classifier_free_guidance=False, max_sequence_length=24, complex_human_instruction=INSTRUCTION)
    states, mask, _, _ = pipe.encode_prompt("A red square", **kwargs)
    assert INSTRUCTION and torch.equal(cond["encoder_hidden_states"], states)
    assert torch.equal(cond["encoder_attention_mask"], mask) and cond["encoder_hidden_states"].shape[1] == 24
    plain, _, _, _ = pipe.encode_prompt(
        "A red square", do_classifier_free_guidance=False, max_sequence_length=24, complex_human_instruction=None
    )
    assert not torch.equal(plain, states)  # the instruction changes the encoding: training must see it


def test_sana_empty_prompt_encodes_as_the_pipelines_negative(sana_dir):
    # caption dropout trains the unconditional branch that guidance samples against: SanaPipeline encodes its
    # negative "" without the instruction, so training must too, in a batch beside prompts that keep it
    pipe = _plain(sana_dir)
    cond = SANA.encode_prompts(SANA.components_of(pipe), ["", "A red square", ""], "cpu")
    kwargs = dict(max_sequence_length=24, complex_human_instruction=INSTRUCTION)
    states, mask, empty, empty_mask = pipe.encode_prompt("A red square", negative_prompt="", **kwargs)
    ours = cond["encoder_hidden_states"]
    assert torch.equal(ours[1], states[0]) and torch.equal(cond["encoder_attention_mask"][1], mask[0])
    for i in (0, 2):
        assert torch.equal(ours[i], empty[0]) and torch.equal(cond["encoder_attention_mask"][i], empty_mask[0])
    with_instruction, _, _, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, **kwargs)
    assert not torch.equal(with_instruction[0], empty[0])  # the test can tell the two encodings apart
    # a disk cache from before, whose empty prompt has the instruction, differs in its fingerprint: it is refused
    assert SANA.encoders(SANA.components_of(pipe)).text_identity()["empty_prompt"] == "negative"


def test_sana_lora_exports_for_load_lora_weights(tmp_path, sana_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *SAMPLER]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, sana_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") for k in adapters)
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np", max_sequence_length=24, height=32,
                  width=32, use_resolution_binning=False)  # fmt: skip
    base = _plain(sana_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4 and np.abs(again - with_lora).max() < 1e-4


def test_sana_models_are_evaluated_and_served(tmp_path, sana_dir, inception_file, clip_model_dir):
    """`sdtrain evaluate` (FID, KID, CLIP score) and the run browser's generation work on a Sana export."""
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, sana_dir) + SAMPLER))
    scores, grid = evaluate_and_serve(tmp_path, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size == (64, 32)  # two 32 px images side by side (the transformer's 16 latents, factor 2)


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_sana_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, sana_dir):
    resumes_and_shares(tmp_path, sana_dir, SAMPLER)


def test_a_sana_transformer_from_scratch_trains_with_the_family_named(tmp_path, sana_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", f"data.path={data}", "data.resolution=32", "model.family=sana",
        f"model.vae.path={sana_dir}", "model.vae.subfolder=vae", f"model.text_encoder.path={sana_dir}",
        "model.text_encoder.subfolder=text_encoder", "model.text_encoder.max_length=24",
        "model.transformer.num_layers=2", "model.transformer.num_attention_heads=2",
        "model.transformer.attention_head_dim=4", "model.transformer.patch_size=1", *SAMPLER, *TINY_TRAINING,
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    transformer = Pipeline.from_pretrained(final, device="cpu").denoiser
    assert len(transformer.transformer_blocks) == 2 and transformer.config.sample_size == 16
    assert transformer.config.caption_channels == 8  # the tiny Gemma's width

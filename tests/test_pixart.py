"""PixArt-Sigma: a tiny folder saved by diffusers fine-tunes with model.pretrained alone (the noise half of its
output trained with DDPM), the export loads in plain PixArtSigmaPipeline and draws the same pixels as sdtrain's
sampling, its prompts encode as the pipeline encodes them (T5 with its attention mask), and the latent caches carry
the mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.pixart import FAMILY as PIXART
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


def test_a_pixart_folder_fine_tunes_and_samples_as_diffusers(tmp_path, pixart_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, pixart_dir)))
    assert detect(pixart_dir) is PIXART and detect(final) is PIXART
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    before = load_file(pixart_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["A Red Square ", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=2.0, seed=2).images
    plain = PixArtSigmaPipeline.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(2 + i) for i in range(2)]
    kwargs = dict(max_sequence_length=24, clean_caption=False, use_resolution_binning=False)
    theirs = plain(prompts, num_inference_steps=3, guidance_scale=2.0, generator=generators, **kwargs).images
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="no image-to-image pipeline"):
        ours.reconstruct("a red square", images[0])


def test_pixart_prompts_encode_as_the_pipeline_encodes_them(pixart_dir):
    pipe = PixArtSigmaPipeline.from_pretrained(pixart_dir)
    cond = PIXART.encode_prompts(PIXART.components_of(pipe), ["A Red Square "], "cpu")
    states, mask, _, _ = pipe.encode_prompt(
        "A Red Square ", do_classifier_free_guidance=False, clean_caption=False, max_sequence_length=24
    )
    assert torch.allclose(cond["encoder_hidden_states"], states, atol=1e-5)  # (T5 under no_grad here)
    assert torch.equal(cond["encoder_attention_mask"], mask) and 0 < mask.sum() < mask.numel()  # padding masked


def test_pixart_trains_from_the_disk_cache(tmp_path, pixart_dir):
    from sdtrain.train.encode import cache_dataset

    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = pipeline_overrides(tmp_path / "run", data, pixart_dir)
    overrides += ["train.num_steps=2", f"data.cache_dir={tmp_path / 'cache'}"]
    cache_dataset(load_config(Config, None, overrides))
    part = load_file(next((tmp_path / "cache").glob("part-*.safetensors")))
    assert {"cond.encoder_hidden_states", "cond.encoder_attention_mask"} <= part.keys()
    assert (train(load_config(Config, None, overrides)) / "model_index.json").is_file()


def test_pixart_lora_adapters_applied_to_the_base_transformer_give_the_merged_export(tmp_path, pixart_dir):
    """diffusers' PixArt transformer has no adapter mixin and its pipeline no LoRA loader: peft adds the adapters,
    the export merges them, and the file beside it (diffusers' transformer layout, peft's names) applied to the base
    transformer with peft gives the merged transformer's output."""
    import peft
    from diffusers import PixArtTransformer2DModel

    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2"]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, pixart_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") and ".lora_" in k for k in adapters)
    assert_comfyui_transformer_layout(adapters, pixart_dir)
    base = PixArtTransformer2DModel.from_pretrained(pixart_dir, subfolder="transformer")
    merged = PixArtTransformer2DModel.from_pretrained(final, subfolder="transformer")
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, 16), timestep=torch.tensor([100, 800]),
        encoder_hidden_states=torch.randn(2, 24, 32), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )  # fmt: skip
    with torch.no_grad():
        plain = base(**inputs).sample
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(PIXART.lora_targets))
        peft.inject_adapter_in_model(config, base)
        peft.set_peft_model_state_dict(base, {k.removeprefix("transformer."): v for k, v in adapters.items()})
        adapted, expected = base(**inputs).sample, merged(**inputs).sample
    assert (adapted - plain).abs().mean() > 1e-5  # the adapters trained ...
    assert torch.allclose(adapted, expected, atol=1e-5)  # ... and the merged export is base + adapters


def scratch_overrides(tmp_path, clip_dir, vae_dir) -> list[str]:
    """A tiny PixArt transformer from scratch, trained with flow matching, conditioned by the tiny CLIP."""
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    return tiny_overrides(tmp_path / "run", data, vae_dir, str(clip_dir), "text_encoder") + [
        "model.family=pixart",
        "model.transformer.num_layers=2",
        "model.transformer.num_attention_heads=2",
        "model.transformer.attention_head_dim=8",
        "train.objective.kind=flow",
        "train.objective.timestep_sampling=logit_normal",
        "sample.scheduler=dpmpp_2m_sde",  # stochastic: the parity below holds for the images' own generators
    ]


def test_a_pixart_transformer_from_scratch_trains_with_flow_matching_and_samples_as_diffusers(
    tmp_path, clip_dir, vae_dir
):
    final = train(load_config(Config, None, scratch_overrides(tmp_path, clip_dir, vae_dir)))
    scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DPMSolverMultistepScheduler" and scheduler["use_flow_sigmas"]
    assert scheduler["algorithm_type"] == "sde-dpmsolver++"
    assert scheduler["prediction_type"] == "flow_prediction"
    ours = Pipeline.from_pretrained(final, device="cpu")
    assert ours.objective.kind == "flow" and ours.denoiser.config.out_channels == 4
    prompts = ["a red square", "a blue circle"]
    images = ours.generate(prompts, num_inference_steps=3, guidance_scale=2.0, seed=5).images
    unipc = ours.generate(prompts, num_inference_steps=3, guidance_scale=2.0, seed=5, scheduler="unipc").images
    plain = PixArtSigmaPipeline.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    tokens = ours.tokenizer.model_max_length
    kwargs = dict(max_sequence_length=tokens, clean_caption=False, use_resolution_binning=False)
    theirs = plain(prompts, num_inference_steps=3, guidance_scale=2.0, generator=generators, **kwargs).images
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, unipc))
    with pytest.raises(ValueError, match=r"samples with dpmpp_2m, dpmpp_2m_sde, unipc \(flow matching\), not 'euler'"):
        ours.generate(prompts, num_inference_steps=2, scheduler="euler")


def test_a_transformer_from_scratch_on_a_pretrained_folder_keeps_its_t5(tmp_path, pixart_dir):
    # the default text path ("minilm") means the bundled MiniLM only where nothing is pretrained (the demo's)
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = pipeline_overrides(tmp_path / "run", data, pixart_dir) + [
        "model.unet.from_scratch=true",
        "model.transformer.num_layers=1",
        "model.transformer.num_attention_heads=2",
        "model.transformer.attention_head_dim=8",
    ]
    components = PIXART.load(load_config(Config, None, overrides))
    folder = PixArtSigmaPipeline.from_pretrained(pixart_dir)
    assert type(components.text_encoder) is type(folder.text_encoder)
    theirs = folder.text_encoder.state_dict()
    assert all(torch.equal(w, theirs[k]) for k, w in components.text_encoder.state_dict().items())
    assert len(components.transformer.transformer_blocks) == 1  # built, not loaded
    assert components.transformer.config.caption_channels == folder.text_encoder.config.d_model


def test_an_objective_or_sampler_the_family_cannot_run_is_refused_before_work(tmp_path, clip_dir, vae_dir):
    overrides = scratch_overrides(tmp_path, clip_dir, vae_dir)
    with pytest.raises(ValueError, match="not 'euler'"):
        train(load_config(Config, None, overrides + ["sample.scheduler=euler"]))
    assert not (tmp_path / "run").exists()
    sd = tiny_overrides(tmp_path / "run", tmp_path / "data", vae_dir, str(clip_dir), "text_encoder")
    sd += ["train.objective.kind=flow"]
    with pytest.raises(ValueError, match="sd models train with ddpm"):
        train(load_config(Config, None, sd))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # SIGKILL chains and a two-process launch: make test-all
def test_pixart_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, pixart_dir):
    resumes_and_shares(tmp_path, pixart_dir, [])


def test_pixart_models_are_evaluated_and_served(tmp_path, clip_dir, vae_dir, inception_file, clip_model_dir):
    """`sdtrain evaluate` (FID, KID, CLIP score) and the run browser's generation work on a PixArt export (a flow
    matching one from scratch)."""
    final = train(load_config(Config, None, scratch_overrides(tmp_path, clip_dir, vae_dir)))
    data = tmp_path / "data"
    scores, grid = evaluate_and_serve(tmp_path, data, final, tmp_path / "scores", inception_file, clip_model_dir, 4)
    assert scores["num_images"] == 4 and np.isfinite(scores["fid"]) and 0 <= scores["clip_score"] <= 100
    assert grid.size == (64, 32)  # two 32 px images side by side

"""FLUX.1 Kontext: a tiny Kontext folder (Flux's tiny components saved as a FluxKontextPipeline) fine-tunes on edit
pairs with model.pretrained and data.conditions alone; the training call appends the reference's packed latents at
position index 1 and cuts the output as FluxKontextPipeline does; the export loads in plain FluxKontextPipeline and
`sdtrain generate --reference` draws its pixels; LoRA exports in diffusers' layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.flux import TRAIN_GUIDANCE
from sdtrain.models.families.flux_kontext import FAMILY as KONTEXT
from sdtrain.models.families.flux_kontext import REFERENCE
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import assert_comfyui_transformer_layout, pipeline_overrides
from tests.test_conditions import write_pairs

EDIT = ["data.conditions=[ref]", "model.text_encoder_2.max_length=32", "train.objective.dynamic_shift=true"]


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory, flux_dir) -> object:
    """The tiny Flux components as a FluxKontextPipeline folder (Kontext-dev is FLUX.1 dev's architecture)."""
    root = tmp_path_factory.mktemp("kontext")
    FluxKontextPipeline(**FluxPipeline.from_pretrained(flux_dir).components).save_pretrained(root)
    return root


def _plain(folder) -> FluxKontextPipeline:
    pipe = FluxKontextPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_kontext_folder_fine_tunes_on_pairs_and_draws_its_pipelines_pixels(tmp_path, kontext_dir):
    data = write_pairs(tmp_path / "pairs", count=6, size=32)
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, kontext_dir) + EDIT))
    assert detect(kontext_dir) is KONTEXT and detect(final) is KONTEXT
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    before = load_file(kontext_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    reference = Image.open(data / "002.ref.png").convert("RGB").resize((48, 32))
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["make the square red", "make the square blue"]
    images = ours.generate(prompts, reference=reference, num_inference_steps=3, guidance_scale=2.5, height=32,
                           width=48, seed=7).images  # fmt: skip
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    theirs = _plain(final)(prompt=prompts, image=[reference, reference], num_inference_steps=3, guidance_scale=2.5,
                           height=32, width=48, max_area=32 * 48, _auto_resize=False, generator=generators,
                           max_sequence_length=32).images  # fmt: skip
    assert images[0].size == (48, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("reference_size", [(16, 24), (12, 32)])  # the image's size, and one of its own
def test_the_training_call_is_the_pipelines(kontext_dir, reference_size):
    """predict appends the reference's packed latents (encoded as the pipeline encodes its image) to the noisy ones'
    sequence at position index 1, and keeps the noisy tokens' output: the pipeline's transformer call, on a
    non-square latent, with a reference of the image's size or of its own (data.condition_resolution)."""
    pipe = _plain(kontext_dir)
    components = KONTEXT.components_of(pipe)
    encoders = KONTEXT.encoders(components)
    cond = KONTEXT.encode_prompts(components, ["make it red", "make it blue"], "cpu")
    pixels = torch.rand(2, 3, *reference_size) * 2 - 1
    reference = encoders.encode_conditions([pixels])[REFERENCE]
    assert torch.equal(reference, pipe._encode_vae_image(pixels, None))
    latents, t = torch.randn(2, 4, 8, 12), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = KONTEXT.predict(pipe.transformer, latents, t, cond | {REFERENCE: reference})
        _, packed_reference, latent_ids, image_ids = pipe.prepare_latents(
            reference, 2, 4, 8 * pipe.vae_scale_factor, 12 * pipe.vae_scale_factor, torch.float32, "cpu"
        )
        packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 12)
        out = pipe.transformer(
            hidden_states=torch.cat([packed, packed_reference], dim=1), timestep=t / 1000,
            guidance=torch.full((2,), TRAIN_GUIDANCE), pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
        ).sample[:, : packed.shape[1]]  # fmt: skip
    f = pipe.vae_scale_factor
    assert torch.equal(ours, FluxPipeline._unpack_latents(out, 8 * f, 12 * f, f))


def test_kontext_lora_exports_in_diffusers_layout(tmp_path, kontext_dir):
    data = write_pairs(tmp_path / "pairs", count=4, size=32)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *EDIT]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, kontext_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all(k.startswith("transformer.") for k in adapters)
    assert_comfyui_transformer_layout(adapters, kontext_dir)  # ComfyUI reads Kontext's as FLUX.1's
    reference = Image.open(data / "000.ref.png").convert("RGB")
    kwargs = dict(prompt="make it red", image=reference, num_inference_steps=2, output_type="np", height=32,
                  width=40, max_area=32 * 40, _auto_resize=False, max_sequence_length=32)  # fmt: skip
    base = _plain(kontext_dir)
    base.load_lora_weights(final / "lora")  # FluxKontextPipeline reads the file the export wrote
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - again).max() < 2e-3


def test_references_at_their_own_size_train_from_the_disk_cache(tmp_path, kontext_dir):
    """data.condition_resolution: references of other aspects than their images are cached at their own buckets,
    batched by both buckets, served as the autoencoder encodes them, and train Kontext (whose pipeline takes a
    reference at its own size)."""
    from sdtrain.data.buckets import condition_bucket_of
    from sdtrain.data.disk_cache import DiskCache, DiskCacheStream, write_cache
    from sdtrain.data.transforms import load_pixels
    from sdtrain.train.randomness import SharedDraws
    from tests.test_conditions import _halves

    data = write_pairs(tmp_path / "pairs", count=8, size=32)  # 40 x 32 images
    for i in range(8):  # references of three aspects, none the image's
        _halves(*[(64, 32), (32, 64), (48, 48)][i % 3]).save(data / f"{i:03d}.ref.png")
    own = ["data.condition_resolution=48", "data.buckets=true", "data.bucket_step=16",
           f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    config = load_config(Config, None, pipeline_overrides(tmp_path / "run", data, kontext_dir) + EDIT + own)
    pipe = _plain(kontext_dir)
    encoders = KONTEXT.encoders(KONTEXT.components_of(pipe))
    write_cache(config.data, encoders)
    cache = DiskCache(config.data, encoders)
    assert {cache.group(i) for i in range(len(cache))} == {"32x32x48x48", "32x32x64x32", "32x32x32x64"}
    draws = SharedDraws(torch.Generator().manual_seed(0), 0, 1, 2)
    stream = DiskCacheStream(cache, encoders, 2, 0.0, "cpu")
    seen = set()
    for _ in range(6):
        latents, cond = stream.next(draws)
        seen.add(tuple(cond[REFERENCE].shape[-2:]))
        assert latents.shape[-2:] == (16, 16)  # the image's bucket, 32 x 32 pixels
    f = pipe.vae_scale_factor
    assert seen == {(48 // f, 48 // f), (32 // f, 64 // f), (64 // f, 32 // f)}  # (height, width)
    pixels = load_pixels(data / "000.png", 32, conditions=[data / "000.ref.png"],
                         condition_bucket_of=condition_bucket_of(config.data))[1]["conditions"][0]  # fmt: skip
    wide = next(i for i in range(len(cache)) if cache.group(i).endswith("x64x32"))  # every wide reference is 000's
    stored = cache.conditions(wide)[REFERENCE].float()
    torch.testing.assert_close(stored[None], pipe._encode_vae_image(pixels[None], None), atol=2e-2, rtol=1e-2)
    final = train(config)
    before = load_file(kontext_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

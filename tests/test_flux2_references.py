"""FLUX.2's reference images (klein's and dev's pipelines take the same): pairs with data.conditions fine-tune a tiny
klein folder, the references' tokens after the noisy ones at time 10, 20, ... as Flux2KleinPipeline places them; the
export draws the plain pipeline's pixels from the same references; a text-to-image run needs none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.models.families.flux2 import REFERENCE, TRAIN_GUIDANCE
from sdtrain.models.families.flux2_klein import FAMILY as KLEIN
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides
from tests.test_conditions import write_pairs

TOKENS = ["model.text_encoder.max_length=96"]  # the tiny tokenizer's length (the pipeline's is 512)


def _plain(folder) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_klein_fine_tunes_on_references_and_draws_its_pipelines_pixels(tmp_path, flux2_klein_dir):
    data = write_pairs(tmp_path / "pairs", count=4, size=64)  # the pipeline reads references of 64 px and more
    extra = ["data.conditions=[ref]", "data.resolution=64", "train.num_steps=2", *TOKENS]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, flux2_klein_dir) + extra))
    reference = Image.open(data / "001.ref.png").convert("RGB").crop((0, 0, 64, 64))
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["make the square red", "make the square blue"]
    images = ours.generate(prompts, reference=reference, num_inference_steps=3, guidance_scale=3.0, height=64,
                           width=64, seed=5).images  # fmt: skip
    generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    theirs = _plain(final)(prompt=prompts, image=[reference], num_inference_steps=3, guidance_scale=3.0, height=64,
                           width=64, generator=generators, max_sequence_length=96).images  # fmt: skip
    without = ours.generate(prompts[:1], num_inference_steps=3, guidance_scale=3.0, height=64, width=64, seed=5)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(without.images[0]))  # the reference is read


def test_the_training_call_places_the_references_as_the_pipeline_does(flux2_klein_dir):
    """Two references: each encoded as the pipeline's _encode_vae_image encodes it, packed after the noisy tokens
    with the ids of its prepare_image_latents (time 10, then 20), the output cut to the noisy tokens."""
    pipe = _plain(flux2_klein_dir)
    components = KLEIN.components_of(pipe)
    encoders = KLEIN.encoders(components)
    cond = KLEIN.encode_prompts(components, ["make it red", "make it blue"], "cpu")
    first, second = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    references = encoders.encode_conditions([first, second])
    assert sorted(references) == [f"{REFERENCE}0", f"{REFERENCE}1"]
    patched = Flux2KleinPipeline._patchify_latents(references[f"{REFERENCE}0"])
    torch.testing.assert_close(patched, pipe._encode_vae_image(first, None), atol=1e-5, rtol=1e-5)
    c, h, w = references[f"{REFERENCE}0"].shape[1:]
    noisy, t = torch.randn(2, c, h, w + 2), torch.tensor([300.0, 700.0])  # another width than the references'
    with torch.no_grad():
        ours = KLEIN.predict(pipe.transformer, noisy, t, cond | references)
        patches = Flux2KleinPipeline._patchify_latents(noisy)
        latent_ids = Flux2KleinPipeline._prepare_latent_ids(patches)
        parts = [Flux2KleinPipeline._patchify_latents(r) for r in references.values()]
        reference_ids = Flux2KleinPipeline._prepare_image_ids([p[:1] for p in parts]).expand(2, -1, -1)
        assert reference_ids[0, 0, 0] == 10 and reference_ids[0, -1, 0] == 20
        states = cond["encoder_hidden_states"]
        guidance = torch.full((2,), TRAIN_GUIDANCE) if pipe.transformer.config.guidance_embeds else None
        out = pipe.transformer(
            hidden_states=torch.cat([Flux2KleinPipeline._pack_latents(p) for p in [patches, *parts]], dim=1),
            timestep=t / 1000, guidance=guidance, encoder_hidden_states=states,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(states), img_ids=torch.cat([latent_ids, reference_ids], 1),
            return_dict=False,
        )[0][:, : latent_ids.shape[1]]  # fmt: skip
        unpacked = Flux2KleinPipeline._unpack_latents_with_ids(out, latent_ids, h // 2, (w + 2) // 2)
    assert torch.equal(ours, Flux2KleinPipeline._unpatchify_latents(unpacked))


def test_references_are_optional_and_counted_as_the_pipeline_takes_them(tmp_path, flux2_klein_dir):
    from sdtrain.train.preflight import check_conditions

    data = write_pairs(tmp_path / "pairs", count=2)
    base = pipeline_overrides(tmp_path / "r", data, flux2_klein_dir) + TOKENS
    check_conditions(load_config(Config, None, base))  # text to image: no references needed
    with pytest.raises(ConfigError, match="one per data.conditions name"):
        check_conditions(load_config(Config, None, base + [
            "data.conditions=[ref]", "train.sample_prompts=[a, b]",
            f"sample.images=[{data}/000.ref.png, {data}/001.ref.png]",
        ]))  # fmt: skip

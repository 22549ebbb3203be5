"""Qwen-Image-Edit: each prompt is encoded as QwenImageEditPipeline.encode_prompt encodes it, with its reference
through the processor and Qwen2.5-VL's vision tower; the reference's latents are the pipeline's; the training call
hands the transformer the pipeline's packed latents with the reference's after them and both shapes; online, the
memory cache and the disk cache serve the same prompt encodings (each sample's empty prompt with its own reference);
a tiny Qwen-Image-Edit folder fine-tunes with model.pretrained and data.conditions alone, and its export loads in
plain QwenImageEditPipeline and draws the pixels `sdtrain generate --reference` draws.

The processor is transformers' ``Qwen2VLProcessor`` with its image processor and a byte-level ``Qwen2Tokenizer``;
without torchvision it is built without its constructor's class check (``tests/conftest.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.errors import MissingPackage
from sdtrain.models.families import detect
from sdtrain.models.families.qwenimage_edit import FAMILY as EDIT
from sdtrain.models.families.qwenimage_edit import REFERENCE, encode_prompts
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides
from tests.test_conditions import write_pairs

PAIRS = ["data.conditions=[ref]", "data.condition_resolution=32", "train.objective.dynamic_shift=true"]


def _plain(folder) -> QwenImageEditPipeline:
    pipe = QwenImageEditPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(image: Image.Image) -> torch.Tensor:
    """An 8-bit image as the data layer reads it: 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _reference(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_prompt_encoding_and_the_training_call_are_the_pipelines(qwenimage_edit_dir):
    pipe = _plain(qwenimage_edit_dir)
    components = EDIT.components_of(pipe)
    prompts = ["make it red", ""]  # the empty prompt is the negative prompt sampling guides against, " "
    images = [_reference(64, 48, 0), _reference(64, 48, 1)]
    references = torch.stack([_pixels(i) for i in images])
    cond = encode_prompts(components, prompts, "cpu", [references])
    with torch.no_grad():
        states, mask = pipe.encode_prompt(["make it red", " "], image=images, device="cpu")
    n = states.shape[1]
    mask = torch.ones(states.shape[:2]) if mask is None else mask
    assert torch.equal(cond["encoder_hidden_states"][:, :n], states)  # the vision tokens among them
    assert torch.equal(cond["attention_mask"][:, :n], mask.float()) and not cond["attention_mask"][:, n:].any()
    assert n > 250  # the byte-level tokenizer's long template, kept whole as the pipeline keeps it

    encoders = EDIT.encoders(components)
    latents_of_reference = encoders.encode_conditions([references])[REFERENCE]
    assert torch.equal(latents_of_reference, pipe._encode_vae_image(references.unsqueeze(2), None).squeeze(2))
    noisy, t = torch.randn(2, 16, 8, 6), torch.tensor([300.0, 700.0])  # another shape than the reference's 12 x 16
    with torch.no_grad():
        ours = EDIT.predict(pipe.transformer, noisy, t, cond | {REFERENCE: latents_of_reference})
        packed = pipe._pack_latents(noisy, 2, 16, 8, 6)
        packed_reference = pipe._pack_latents(latents_of_reference, 2, 16, 12, 16)
        out = pipe.transformer(
            hidden_states=torch.cat([packed, packed_reference], dim=1), timestep=t / 1000,
            encoder_hidden_states=states, encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=[[(1, 4, 3), (1, 6, 8)]] * 2, return_dict=False,
        )[0][:, : packed.shape[1]]  # fmt: skip
    f = pipe.vae_scale_factor
    torch.testing.assert_close(ours, pipe._unpack_latents(out, 8 * f, 6 * f, f).squeeze(2), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_every_stream_encodes_each_prompt_with_its_reference(tmp_path, qwenimage_edit_dir):
    """Online, from the memory cache and from the disk cache, a batch's prompt encodings are the same: each
    caption and each dropped caption's empty prompt encoded with the sample's own reference."""
    from sdtrain.data.disk_cache import DiskCache, DiskCacheStream, write_cache
    from sdtrain.data.memory_cache import MemoryCacheStream, build_memory_cache
    from sdtrain.data.streams import OnlineStream
    from sdtrain.train.randomness import SharedDraws

    data = write_pairs(tmp_path / "pairs", count=4)
    overrides = pipeline_overrides(tmp_path / "run", data, qwenimage_edit_dir) + PAIRS
    overrides += [f"data.cache_dir={tmp_path / 'cache'}", "data.caption_dropout=0.5"]
    config = load_config(Config, None, overrides)
    components = EDIT.load(config, denoiser=False)
    encoders = EDIT.encoders(components)
    write_cache(config.data, encoders)

    def first(stream) -> dict:
        return stream.next(SharedDraws(torch.Generator().manual_seed(0), 0, 1, 4))[1]

    online = first(OnlineStream(config.data, encoders, 4, torch.device("cpu")))
    memory = first(MemoryCacheStream(build_memory_cache(config.data, encoders), encoders, 4, 0.5, "cpu"))
    disk = first(DiskCacheStream(DiskCache(config.data, encoders), encoders, 4, 0.5, "cpu"))
    states = online["encoder_hidden_states"]
    alone = encoders.encode_text_seeing([""] * 4, [torch.zeros(4, 3, 32, 32)])["encoder_hidden_states"]
    assert not torch.allclose(states, alone)  # the references are seen
    torch.testing.assert_close(memory["encoder_hidden_states"], states, atol=1e-5, rtol=0)
    torch.testing.assert_close(disk["encoder_hidden_states"], states, atol=2e-2, rtol=1e-2)  # stored in fp16
    for cond in (memory, disk):
        assert torch.equal(cond["attention_mask"], online["attention_mask"])
        torch.testing.assert_close(cond[REFERENCE], online[REFERENCE], atol=2e-2, rtol=1e-2)


@pytest.mark.slow
def test_an_edit_folder_fine_tunes_and_draws_its_pipelines_pixels(tmp_path, qwenimage_edit_dir):
    data = write_pairs(tmp_path / "pairs", count=4, size=32)
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, qwenimage_edit_dir) + PAIRS))
    assert detect(qwenimage_edit_dir) is EDIT and detect(final) is EDIT
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "QwenImageEditPipeline"
    before = load_file(qwenimage_edit_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    reference = Image.open(data / "001.ref.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    images = ours.generate(["make the square blue", "make the square red"], reference=reference,
                           num_inference_steps=2, guidance_scale=2.0, height=32, width=32, seed=7).images  # fmt: skip
    # the pipeline as its users call it: one prompt, the reference alone (which it resizes for the vision tower)
    theirs = _plain(final)(prompt="make the square red", negative_prompt=" ", image=reference, num_inference_steps=2,
                           true_cfg_scale=2.0, height=32, width=32,
                           generator=torch.Generator().manual_seed(8)).images[0]  # fmt: skip
    assert images[1].size == (32, 32)
    assert np.array_equal(np.asarray(images[1]), np.asarray(theirs))


def test_refusals(tmp_path, qwenimage_edit_dir, qwenimage_dir):
    data = write_pairs(tmp_path / "pairs", count=2)
    config = load_config(Config, None, pipeline_overrides(tmp_path / "a", data, qwenimage_dir)
                         + ["model.family=qwenimage-edit", *PAIRS])  # fmt: skip
    with pytest.raises(ConfigError, match="processor"):  # a Qwen-Image folder has none, and no text encoder is named
        EDIT.load(config, denoiser=False)
    components = EDIT.components_of(_plain(qwenimage_edit_dir))
    with pytest.raises(ConfigError, match="one reference"):
        encode_prompts(components, ["a"], "cpu", [torch.zeros(1, 3, 32, 32)] * 2)
    with pytest.raises(ConfigError, match="never alone"):
        EDIT.encoders(components).encode_text(["a"])


def test_a_missing_torchvision_is_said_in_one_line(qwenimage_edit_dir, monkeypatch):
    """Where torchvision is missing, loading the processor as transformers does fails: one line says why, for
    training (the processor alone) and for sampling (the whole pipeline, which diffusers loads)."""
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    from sdtrain.models.families.qwenimage_edit import load_processor

    if is_torchvision_available():
        pytest.skip("torchvision is installed: the processor loads")
    monkeypatch.delattr(Qwen2VLProcessor, "from_pretrained")  # transformers' own (the tests' is set on the class)
    with pytest.raises(MissingPackage, match="needs torchvision, which is not installed"):
        load_processor(str(qwenimage_edit_dir), "processor")
    with pytest.raises(MissingPackage, match="QwenImageEditPipeline.* needs a package .*Torchvision"):
        Pipeline.from_pretrained(qwenimage_edit_dir, device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Qwen-Image-Edit-Plus: several references, each seen by the vision tower at about 384 x 384 pixels


def test_edit_plus_encodes_and_calls_as_its_pipeline_with_two_references(qwenimage_edit_plus_dir):
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    from sdtrain.models.families import qwenimage_edit_plus as plus

    pipe = QwenImageEditPlusPipeline.from_pretrained(qwenimage_edit_plus_dir)
    components = plus.FAMILY.components_of(pipe)
    first, second = _reference(64, 48, 0), _reference(48, 80, 1)  # two aspects
    cond = plus.encode_prompts(components, ["make it red", ""], "cpu",
                               [torch.stack([_pixels(first)] * 2), torch.stack([_pixels(second)] * 2)])  # fmt: skip
    seen = []  # the pipeline's own resize of each reference for the vision tower
    for image in (first, second):
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
        seen.append(pipe.image_processor.resize(image, height, width))
    for row, prompt in enumerate(["make it red", " "]):  # its processor pairs one prompt with every reference
        with torch.no_grad():
            states, mask = pipe.encode_prompt([prompt], image=seen, device="cpu")
        n = states.shape[1]
        # batched with another prompt here (as the caches encode them): equal up to float rounding
        torch.testing.assert_close(cond["encoder_hidden_states"][row, :n], states[0], atol=1e-5, rtol=1e-5)
        assert cond["attention_mask"][row, :n].all() and not cond["attention_mask"][row, n:].any()
    alone = plus.encode_prompts(components, ["make it red"], "cpu", [_pixels(first)[None], _pixels(second)[None]])
    with torch.no_grad():
        states, _ = pipe.encode_prompt(["make it red"], image=seen, device="cpu")
    assert torch.equal(alone["encoder_hidden_states"][:, : states.shape[1]], states)  # alone: bit for bit

    encoders = plus.FAMILY.encoders(components)
    references = [torch.stack([_pixels(image)] * 2) for image in (first, second)]
    latents_of = encoders.encode_conditions(references)
    noisy, t = torch.randn(2, 16, 8, 6), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        ours = plus.FAMILY.predict(pipe.transformer, noisy, t, cond | latents_of)
        _, packed_references = pipe.prepare_latents([r.unsqueeze(2) for r in references], 2, 16, 8 * 4, 6 * 4,
                                                    torch.float32, "cpu", None)  # fmt: skip
        packed = pipe._pack_latents(noisy, 2, 16, 8, 6)
        mask = cond["attention_mask"] > 0
        longest = int(mask.sum(1).max())
        out = pipe.transformer(
            hidden_states=torch.cat([packed, packed_references], dim=1), timestep=t / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"][:, :longest],
            encoder_hidden_states_mask=mask[:, :longest], img_shapes=[[(1, 4, 3), (1, 6, 8), (1, 10, 6)]] * 2,
            return_dict=False,
        )[0][:, : packed.shape[1]]  # fmt: skip
    f = pipe.vae_scale_factor
    torch.testing.assert_close(ours, pipe._unpack_latents(out, 8 * f, 6 * f, f).squeeze(2), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_an_edit_plus_folder_fine_tunes_on_two_references_and_draws_its_pipelines_pixels(
    tmp_path, qwenimage_edit_plus_dir
):
    from diffusers import QwenImageEditPlusPipeline

    from sdtrain.models.families import qwenimage_edit_plus as plus

    data = write_pairs(tmp_path / "pairs", count=4, size=32)
    for i in range(4):  # a second reference of another aspect
        _reference(48, 32, i).save(data / f"{i:03d}.style.png")
    two = ["data.conditions=[ref, style]", "data.condition_resolution=32", "train.objective.dynamic_shift=true"]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, qwenimage_edit_plus_dir) + two))
    assert detect(qwenimage_edit_plus_dir) is plus.FAMILY and detect(final) is plus.FAMILY
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "QwenImageEditPlusPipeline"

    reference = Image.open(data / "001.ref.png").convert("RGB")  # one reference: the pipeline's cost grows with each
    ours = Pipeline.from_pretrained(final, device="cpu")
    image = ours.generate("make the square red", reference=[reference], num_inference_steps=2, guidance_scale=2.0,
                          height=32, width=32, seed=7).images[0]  # fmt: skip
    plain = QwenImageEditPlusPipeline.from_pretrained(final)
    theirs = plain(
        prompt="make the square red",
        negative_prompt=" ",
        image=[reference],
        num_inference_steps=2,
        true_cfg_scale=2.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(theirs))


@pytest.mark.slow
def test_an_edit_lora_loads_in_its_plain_pipeline_and_in_comfyuis_layout(tmp_path, qwenimage_edit_dir):
    """A LoRA trained on pairs: diffusers' layout (every key one of the transformer's weights, as ComfyUI maps
    Qwen-Image's), which plain QwenImageEditPipeline.load_lora_weights reads onto the base and draws what the merged
    export draws."""
    from tests.conftest import assert_comfyui_transformer_layout

    data = write_pairs(tmp_path / "pairs", count=4, size=32)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2", *PAIRS]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, qwenimage_edit_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    assert_comfyui_transformer_layout(adapters, qwenimage_edit_dir)
    kwargs = dict(prompt="make it red", negative_prompt=" ", image=Image.open(data / "000.ref.png").convert("RGB"),
                  true_cfg_scale=3.0, num_inference_steps=2, output_type="np", height=32, width=32)  # fmt: skip
    base = _plain(qwenimage_edit_dir)
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged = _plain(final)
    merged.scheduler = base.scheduler
    again = merged(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.isfinite(with_lora).all() and np.abs(again - with_lora).max() < 1e-4

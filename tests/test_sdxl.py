"""Stable Diffusion XL as the second family: a tiny SDXL folder saved by diffusers fine-tunes with model.pretrained
alone, the export loads in plain StableDiffusionXLPipeline and draws the same pixels as `sdtrain generate`, the time
ids are the pipeline's, LoRA exports in diffusers' and kohya's layouts, the caches carry the pooled embeddings and the
sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtrain.config import Config, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.sdxl import FAMILY as SDXL
from sdtrain.train.loop import train
from tests.conftest import evaluate_and_serve, pipeline_overrides, write_image_folder


def _plain(folder) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, sdxl_dir):
    """A 4-step SDXL fine-tune of the tiny folder (EMA on, caption dropout on)."""
    root = tmp_path_factory.mktemp("sdxl-run")
    data = write_image_folder(root / "data", count=8, size=40)
    final = train(load_config(Config, None, pipeline_overrides(root / "run", data, sdxl_dir)))
    return root, data, final


def test_an_sdxl_folder_fine_tunes_with_model_pretrained_alone(tuned, sdxl_dir, tmp_path):
    from sdtrain.cli import main

    root, _, final = tuned
    assert detect(sdxl_dir) is SDXL and detect(final) is SDXL
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    before = load_file(sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    for name in ("text_encoder", "text_encoder_2"):  # frozen: exported as loaded
        a = load_file(sdxl_dir / name / "model.safetensors")
        b = load_file(final / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    # `sdtrain generate` draws what plain diffusers draws from the export, for the same seeds, steps and guidance
    prompts = ["a red square", "a blue circle"]
    args = ["--steps", "3", "--guidance", "2.5", "--seed", "7", "--scheduler", "euler_a"]
    assert main(["generate", "--model", str(final), "--out", str(tmp_path / "out"), "--device", "cpu", *args,
                 *prompts]) == 0  # fmt: skip
    pipe = _plain(final)
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
    theirs = pipe(prompts, num_inference_steps=3, guidance_scale=2.5, generator=generators).images
    for i, expected in enumerate(theirs):
        ours = Image.open(tmp_path / "out" / f"generate-{i:04d}.png")
        assert np.array_equal(np.asarray(ours), np.asarray(expected)), prompts[i]


def test_reconstruct_runs_sdxls_img2img(tuned, tmp_path):
    from sdtrain.sample.pipeline import Pipeline

    _, data, final = tuned
    pipe = Pipeline.from_pretrained(final, device="cpu")
    image = Image.open(data / "000.png").convert("RGB")
    out = pipe.reconstruct("a green square", image, strength=0.5, num_inference_steps=4, seed=1).images[0]
    again = pipe.reconstruct("a green square", image, strength=0.5, num_inference_steps=4, seed=1).images[0]
    assert out.size == image.size and np.array_equal(np.asarray(out), np.asarray(again))


def test_time_ids_of_bucketed_cropped_samples_are_the_pipelines(tmp_path, sdxl_dir):
    """A shard batch of one aspect bucket, randomly cropped: each sample's time ids are what
    StableDiffusionXLPipeline._get_add_time_ids builds for that original size, crop and target size."""
    from sdtrain.config import DataConfig
    from sdtrain.data.shards import ShardDataset
    from sdtrain.data.streams import encode_batch
    from sdtrain.models.families.sdxl import encoders
    from sdtrain.train.randomness import SharedDraws
    from tests.test_shards import write_shards

    spec = write_shards(tmp_path / "s", shards=2, per_shard=6)
    config = DataConfig(path=spec, resolution=64, buckets=True, bucket_step=16, center_crop=False, random_flip=True)
    batch = next(b for b in ShardDataset(config, 3, seed=0) if tuple(b["image"].shape[-2:]) != (64, 64))
    pipe = _plain(sdxl_dir)
    draws = SharedDraws(torch.Generator().manual_seed(0))
    sizes = (batch["original_size"], batch["crop_top_left"])
    _, cond = encode_batch(batch["image"], batch["text"], encoders(SDXL.components_of(pipe)), 0.0, draws, "cpu", sizes)
    target = tuple(batch["image"].shape[-2:])
    assert any(crop != (0, 0) for crop in batch["crop_top_left"])  # a real crop, not the centre of a square
    for row, original, crop in zip(cond["time_ids"], *sizes):
        expected = pipe._get_add_time_ids(tuple(original), tuple(crop), target, torch.float32, 32)[0]
        assert torch.equal(row, expected)


def test_prompts_encode_as_the_pipeline_encodes_them_and_empty_ones_are_zeros(sdxl_dir):
    pipe = _plain(sdxl_dir)
    components = SDXL.components_of(pipe)
    cond = SDXL.encode_prompts(components, ["a red square"], "cpu")
    states, _, pooled, _ = pipe.encode_prompt("a red square", do_classifier_free_guidance=False)
    assert torch.equal(cond["encoder_hidden_states"], states) and torch.equal(cond["text_embeds"], pooled)
    both = SDXL.encode_prompts(components, ["a red square", ""], "cpu")
    assert torch.allclose(both["text_embeds"][0], pooled[0], atol=1e-6)  # (batched: the same to rounding)
    assert not both["encoder_hidden_states"][1].any() and not both["text_embeds"][1].any()  # caption dropout: zeros
    _, negative, _, negative_pooled = pipe.encode_prompt("a red square", do_classifier_free_guidance=True)
    assert not negative.any() and not negative_pooled.any()  # what the pipeline samples the unconditional branch with


def test_sdxl_lora_exports_for_diffusers_and_kohya(tmp_path, sdxl_dir):
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2"]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, sdxl_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    kohya = load_file(final / "lora" / "lora_kohya.safetensors")
    modules = {k.rsplit(".lora", 1)[0] for k in adapters}  # unet.…to_q.lora.down.weight -> unet.…to_q
    kohya_modules = {k.split(".")[0] for k in kohya}
    assert len(modules) == len(kohya_modules) and all(k.startswith("lora_unet_") for k in kohya_modules)
    assert len(kohya) == 3 * len(kohya_modules)  # lora_down, lora_up and alpha for each adapted module, no more
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np")
    base = _plain(sdxl_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged_pipe = _plain(final)
    merged_pipe.scheduler = base.scheduler  # the export carries sdtrain's sampler; compare on the base's
    merged = merged_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4  # the adapters change the output ...
    assert np.abs(merged - with_lora).max() < 1e-4  # ... and the merged export draws what base + adapters draw
    from_kohya = _plain(sdxl_dir)
    from_kohya.load_lora_weights(final / "lora", weight_name="lora_kohya.safetensors")
    third = from_kohya(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(third - with_lora).max() < 1e-4


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_sdxl_trains_from_both_latent_caches(tmp_path, sdxl_dir, cache):
    """The caches hold the pooled embeddings and each sample's size and crop; the disk cache's fingerprint covers
    both text encoders."""
    from sdtrain.train.encode import cache_dataset

    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = pipeline_overrides(tmp_path / "run", data, sdxl_dir) + [
        "train.num_steps=2",
        "data.caption_dropout=0.5",
    ]
    if cache == "memory":
        overrides.append("data.cache_latents=true")
    else:
        overrides.append(f"data.cache_dir={tmp_path / 'cache'}")
        cache_dataset(load_config(Config, None, overrides))
        stamp = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())
        assert {"text_encoder", "text_encoder_2"} <= stamp.keys()
        part = load_file(next((tmp_path / "cache").glob("part-*.safetensors")))
        assert {"cond.encoder_hidden_states", "cond.text_embeds"} <= part.keys()
    final = train(load_config(Config, None, overrides))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert (final / "model_index.json").is_file() and all(np.isfinite(r["loss"]) for r in log)


@pytest.mark.slow  # SIGKILL chains: make test-all
def test_sdxl_sigkill_then_resume_is_bit_exact(tmp_path, sdxl_dir):
    """SIGKILL at micro-batches and inside a save, then a rerun: the same per-step losses and the same weights, bit
    for bit, as an uninterrupted SDXL run (2 dataloader workers, accumulation 2, EMA, caption dropout)."""
    from tests.test_faults import KILLED, _losses, _train, _weights

    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["data.num_workers=2", "train.gradient_accumulation=2", "train.num_steps=8", "train.save_every=3"]
    straight = _train(pipeline_overrides(tmp_path / "a", data, sdxl_dir) + extra)
    assert straight.returncode == 0, straight.stderr[-3000:]
    overrides = pipeline_overrides(tmp_path / "b", data, sdxl_dir) + extra
    for fault in ("kill_micro=3", "kill_save=1:manifest", "kill_micro=5"):
        assert _train(overrides, fault).returncode == KILLED, fault
    assert _train(overrides).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a two-process launch: make test-all
def test_sdxl_two_processes_train_what_one_process_trains(tmp_path, sdxl_dir):
    from tests.test_distributed import ADAM_EPS, _launch_ddp
    from tests.test_faults import _losses, _train, _weights

    data = write_image_folder(tmp_path / "data", count=5, size=40)  # epochs end mid-batch
    extra = ["train.num_steps=4", "data.caption_dropout=0.3", ADAM_EPS]
    assert _train(pipeline_overrides(tmp_path / "one", data, sdxl_dir) + extra).returncode == 0
    result = _launch_ddp(pipeline_overrides(tmp_path / "two", data, sdxl_dir) + extra)
    assert result.returncode == 0 and "world size 2" in result.stderr, result.stderr[-3000:]
    (steps_a, losses_a), (steps_b, losses_b) = zip(*_losses(tmp_path / "one")), zip(*_losses(tmp_path / "two"))
    assert steps_a == steps_b == (1, 2, 3, 4) and losses_b == pytest.approx(losses_a, rel=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_sdxl_from_scratch_with_the_family_named(tmp_path, sdxl_dir, vae_dir):
    """model.family=sdxl with the two text encoders and the autoencoder given as folders, the UNet built from the
    knobs with SDXL's text-time embedding sized for them."""
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    overrides = [
        f"train.output_dir={tmp_path / 'run'}", f"data.path={data}", "data.resolution=32", "model.family=sdxl",
        f"model.vae.path={vae_dir}", f"model.text_encoder.path={sdxl_dir}",
        "model.text_encoder.subfolder=text_encoder",
        f"model.text_encoder_2.path={sdxl_dir}", "model.text_encoder_2.subfolder=text_encoder_2",
        "model.unet.block_out_channels=[16, 32]", "model.unet.attention=[false, true]", "model.unet.norm_num_groups=8",
        "model.unet.transformer_layers=[1, 2]", "model.unet.addition_time_embed_dim=8", "train.batch_size=4",
        "train.num_steps=2", "sample.num_inference_steps=2",
    ]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    unet = _plain(final).unet.config
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == 32 + 48
    assert unet.projection_class_embeddings_input_dim == 6 * 8 + 32 and list(unet.transformer_layers_per_block) == [
        1,
        2,
    ]
    with pytest.raises(ValueError, match="model.text_encoder_2.path"):
        train(load_config(Config, None, [o for o in overrides if "text_encoder_2" not in o]))


def test_sdxl_single_file_round_trips_every_tensor_and_draws_the_same_images(tuned, tmp_path):
    """`sdtrain convert` writes SDXL's single-file layout (conditioner.embedders.0 / .1, OpenCLIP-G with q / k / v
    fused, the UNet's text-time embedding as label_emb); diffusers' own from_single_file reads it back offline into
    the very tensors it came from, and the pipeline draws the same images."""
    from sdtrain.cli import main
    from sdtrain.models.single_file import load_single_file

    _, _, final = tuned
    file = tmp_path / "sdxl.safetensors"
    assert main(["convert", str(final), str(file)]) == 0
    keys = load_file(file).keys()
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert (
        "conditioner.embedders.1.model.text_projection" in keys
        and "model.diffusion_model.label_emb.0.0.weight" in keys
    )
    assert not file.with_suffix(".yaml").exists()  # SDXL is recognised by its keys
    loaded, original = load_single_file(file, final), _plain(final)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        ours = {k: v for k, v in ours.items() if not k.endswith("position_ids")}
        assert ours.keys() <= theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items()), name
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np")
    a = original(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.array_equal(a, b)
    assert main(["convert", str(file), str(tmp_path / "back"), "--config", str(final)]) == 0
    assert detect(tmp_path / "back") is SDXL


def test_sdxl_models_are_evaluated_and_served(tuned, tmp_path, inception_file, clip_model_dir):
    """`sdtrain evaluate` (FID, KID, CLIP score) and the run browser's generation work on an SDXL export as on SD's."""
    root, data, final = tuned
    scores, grid = evaluate_and_serve(root, data, final, tmp_path / "scores", inception_file, clip_model_dir, 6)
    assert scores["num_images"] == 6 and scores["resolution"] == 32 and np.isfinite(scores["fid"])
    assert grid.size == (64, 32)  # two 32 px images side by side


def test_sdxl_text_encoders_train_with_lora_at_their_own_lr_and_export_for_diffusers_and_kohya(tmp_path, sdxl_dir):
    """train.text_encoder.mode=lora: adapters on both CLIPs (a lower lr than the UNet's), in both LoRA files beside
    the UNet's; base + adapters draws what the merged export draws, which carries the merged encoders."""
    data = write_image_folder(tmp_path / "data", count=8, size=40)
    extra = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null", "train.num_steps=2",
             "train.text_encoder.mode=lora", "train.text_encoder.rank=2", "train.text_encoder.lr=5e-3",
             "train.optim.warmup_steps=0", "train.optim.schedule=constant"]  # fmt: skip
    run = tmp_path / "run"
    final = train(load_config(Config, None, pipeline_overrides(run, data, sdxl_dir) + extra))
    adapters = load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    kohya = load_file(final / "lora" / "lora_kohya.safetensors")
    modules = {k.rsplit(".lora", 1)[0] for k in adapters}
    kohya_modules = {k.split(".")[0] for k in kohya}
    by_prefix = {p: {m for m in kohya_modules if m.startswith(p)} for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert all(by_prefix.values()) and sum(map(len, by_prefix.values())) == len(kohya_modules) == len(modules)
    assert len(kohya) == 3 * len(kohya_modules)
    te_layers = 2 * 4  # q, k, v, out on each of the tiny CLIPs' 2 layers
    assert len(by_prefix["lora_te1_"]) == len(by_prefix["lora_te2_"]) == te_layers
    assert {m.split(".")[0] for m in modules} == {"unet", "text_encoder", "text_encoder_2"}
    before = load_file(sdxl_dir / "text_encoder_2" / "model.safetensors")
    after = load_file(final / "text_encoder_2" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    checkpoint = torch.load(next((run / "checkpoints").glob("step-*")) / "optimizer.pt", weights_only=False)
    rates = sorted({g["lr"] for g in checkpoint["param_groups"]})
    assert rates == [5e-3, 1e-2]  # the encoders' adapters at their own rate
    kwargs = dict(prompt="a red square", num_inference_steps=3, output_type="np")
    base = _plain(sdxl_dir)
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base.load_lora_weights(final / "lora")
    with_lora = base(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    merged_pipe = _plain(final)
    merged_pipe.scheduler = base.scheduler
    merged = merged_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(with_lora - before).mean() > 1e-4
    assert np.abs(merged - with_lora).max() < 1e-4
    from_kohya = _plain(sdxl_dir)
    from_kohya.load_lora_weights(final / "lora", weight_name="lora_kohya.safetensors")
    third = from_kohya(generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(third - with_lora).max() < 1e-4

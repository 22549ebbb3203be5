"""ControlNet for Stable Diffusion (model.family=sd-controlnet): made from a tiny SD folder's UNet as diffusers does,
trained on image + control pairs while the UNet stays frozen, exported as a StableDiffusionControlNetPipeline that
`sdtrain generate --control` samples pixel for pixel; the training call is the pipeline's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.models.families import detect
from sdtrain.models.families.sd_controlnet import CONTROL, ControlledUNet
from sdtrain.models.families.sd_controlnet import FAMILY as CONTROLNET
from sdtrain.sample.pipeline import Pipeline
from sdtrain.train.loop import train
from tests.conftest import pipeline_overrides, save_pipeline, tiny_unet
from tests.test_conditions import write_pairs


def controls(folder: Path) -> Path:
    """``write_pairs``' references renamed as control images (``NAME.control.png``)."""
    for ref in sorted(folder.glob("*.ref.png")):
        ref.rename(ref.with_name(ref.name.replace(".ref.", ".control.")))
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir, vae_dir) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("sd") / "sd", tiny_unet(), clip_dir, vae_dir)


def overrides(out: Path, data: Path, base: Path) -> list[str]:
    return pipeline_overrides(out, data, base) + ["model.family=sd-controlnet", "data.conditions=[control]"]


def test_a_controlnet_trains_for_a_frozen_unet_and_draws_its_pipelines_pixels(tmp_path, sd_dir):
    data = controls(write_pairs(tmp_path / "pairs", count=6, size=32))
    final = train(load_config(Config, None, overrides(tmp_path / "run", data, sd_dir)))
    assert detect(final) is CONTROLNET
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "StableDiffusionControlNetPipeline"
    unet, base = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (final, sd_dir))
    assert all(torch.equal(unet[k], base[k]) for k in base)  # the UNet stayed as it was
    zero = load_file(final / "controlnet" / "diffusion_pytorch_model.safetensors")["controlnet_mid_block.weight"]
    assert zero.abs().max() > 0  # the zero convolutions left zero

    control = Image.open(data / "001.control.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    prompts = ["a red square", "a blue square"]
    images = ours.generate(prompts, control=control, num_inference_steps=3, guidance_scale=2.0, height=32, width=40,
                           seed=2).images  # fmt: skip
    plain = StableDiffusionControlNetPipeline.from_pretrained(final, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(2 + i) for i in range(2)]
    theirs = plain(prompts, image=[control, control], num_inference_steps=3, guidance_scale=2.0, height=32, width=40,
                   generator=generators).images  # fmt: skip
    assert images[0].size == (40, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    from sdtrain.errors import Unsupported

    with pytest.raises(Unsupported, match="edit model"):
        ours.generate("a red square", reference=control)


def test_the_training_call_is_the_pipelines(sd_dir):
    """A ControlNet made from the UNet starts at the base's own prediction (its zero convolutions), and the training
    call is the pipeline's: the control image as its prepare_image gives it, the residuals into the UNet."""
    config = load_config(Config, None, [f"model.pretrained={sd_dir}", "model.family=sd-controlnet",
                                        "data.conditions=[control]", "data.path=x"])  # fmt: skip
    components = CONTROLNET.load(config)
    model = components.controlnet
    assert isinstance(model, ControlledUNet) and not any(p.requires_grad for p in model.unet.parameters())
    encoders = CONTROLNET.encoders(components)
    pixels = torch.rand(2, 3, 32, 40) * 2 - 1
    cond = CONTROLNET.encode_prompts(components, ["a red square", ""], "cpu")
    cond |= encoders.encode_conditions([pixels])
    x, t = torch.randn(2, 4, 16, 20), torch.tensor([100, 800])
    with torch.no_grad():
        torch.testing.assert_close(CONTROLNET.predict(model, x, t, cond), model.unet(x, t, **{
            "encoder_hidden_states": cond["encoder_hidden_states"]}).sample)  # fmt: skip
        for p in model.controlnet.controlnet_mid_block.parameters():
            p.normal_()  # as if trained: the residuals are no longer zero
        pipe = StableDiffusionControlNetPipeline(**CONTROLNET.pipeline_components(components), scheduler=None)
        images = [Image.fromarray(((p.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for p in pixels]
        prepared = pipe.prepare_image(images, 40, 32, 2, 1, "cpu", torch.float32)
        torch.testing.assert_close(encoders.encode_conditions([pixels])[CONTROL], prepared, atol=1 / 255, rtol=0)
        down, middle = pipe.controlnet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                                       controlnet_cond=cond[CONTROL], return_dict=False)  # fmt: skip
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": middle}
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], **residuals).sample
        assert torch.equal(CONTROLNET.predict(model, x, t, cond), theirs)


def test_controlnet_settings_are_checked(tmp_path, sd_dir):
    from sdtrain.train.preflight import check_conditions

    data = controls(write_pairs(tmp_path / "pairs", count=2))
    with pytest.raises(ConfigError, match="no LoRA"):
        check_conditions(load_config(Config, None, overrides(tmp_path / "r", data, sd_dir) + ["train.lora.rank=4"]))
    with pytest.raises(ConfigError, match="has no ControlNet"):
        check_conditions(load_config(Config, None, pipeline_overrides(tmp_path / "r", data, sd_dir)
                                     + ["model.controlnet=x"]))  # fmt: skip
    with pytest.raises(ConfigError, match="not model.unet.from_scratch"):
        CONTROLNET.load(load_config(Config, None, overrides(tmp_path / "r", data, sd_dir)
                                    + ["model.unet.from_scratch=true"]))  # fmt: skip


@pytest.mark.slow
def test_controlnet_resumes_bit_exact_after_sigkill_and_two_processes_train_what_one_does(tmp_path, sd_dir):
    """The ControlNet's run killed mid-accumulation after a checkpoint and rerun ends with the uninterrupted run's
    losses and weights bit for bit; under DDP 2 processes train what one does (the frozen UNet inside the trained
    model has no gradients to reduce)."""
    from tests.test_distributed import ADAM_EPS, _launch_ddp
    from tests.test_faults import KILLED, _losses, _train

    data = controls(write_pairs(tmp_path / "pairs", count=5, size=40))
    extra = ["train.gradient_accumulation=2", "train.num_steps=6", "train.save_every=3", ADAM_EPS]

    def weights(run: str) -> dict:
        return load_file(tmp_path / run / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")

    assert _train(overrides(tmp_path / "a", data, sd_dir) + extra).returncode == 0
    assert _train(overrides(tmp_path / "b", data, sd_dir) + extra, "kill_micro=8").returncode == KILLED
    assert _train(overrides(tmp_path / "b", data, sd_dir) + extra).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = weights("a"), weights("b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = _launch_ddp(overrides(tmp_path / "two", data, sd_dir) + extra)
    assert result.returncode == 0 and "world size 2" in result.stderr, result.stderr[-3000:]
    one_losses = [loss for _, loss in _losses(tmp_path / "a")]
    assert [loss for _, loss in _losses(tmp_path / "two")] == pytest.approx(one_losses, rel=1e-5)
    two = weights("two")
    assert max((a[k] - two[k]).abs().max().item() for k in a) < 1e-6


def test_an_sdxl_controlnet_trains_and_draws_its_pipelines_pixels(tmp_path, sdxl_dir):
    """SDXL's: the ControlNet made from SDXL's UNet reads the pooled text and size ids too; the export loads in plain
    StableDiffusionXLControlNetPipeline and draws what `sdtrain generate --control` draws."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from sdtrain.models.families.sdxl_controlnet import FAMILY as SDXL_CONTROLNET

    data = controls(write_pairs(tmp_path / "pairs", count=4, size=32))
    extra = ["model.family=sdxl-controlnet", "data.conditions=[control]", "train.num_steps=2"]
    final = train(load_config(Config, None, pipeline_overrides(tmp_path / "run", data, sdxl_dir) + extra))
    assert detect(final) is SDXL_CONTROLNET
    control = Image.open(data / "003.control.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    images = ours.generate(["a red square"], control=control, num_inference_steps=3, guidance_scale=2.0, height=32,
                           width=40, seed=1).images  # fmt: skip
    plain = StableDiffusionXLControlNetPipeline.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    theirs = plain(["a red square"], image=[control], num_inference_steps=3, guidance_scale=2.0, height=32, width=40,
                   generator=[torch.Generator().manual_seed(1)]).images  # fmt: skip
    assert np.array_equal(np.asarray(images[0]), np.asarray(theirs[0]))


# --- SD3 and Flux: a ControlNet made from the transformer, the control image as latents -------------------------


def _transformer_ones(family: str, sd3_two_blocks_dir: Path, flux_dir: Path):
    """(family, its tiny base folder, the plain pipeline class) of a transformer ControlNet."""
    from diffusers import FluxControlNetPipeline, StableDiffusion3ControlNetPipeline

    from sdtrain.models.families.flux_controlnet import FAMILY as FLUX_CONTROLNET
    from sdtrain.models.families.sd3_controlnet import FAMILY as SD3_CONTROLNET

    if family == "sd3-controlnet":
        return SD3_CONTROLNET, sd3_two_blocks_dir, StableDiffusion3ControlNetPipeline
    return FLUX_CONTROLNET, flux_dir, FluxControlNetPipeline


@pytest.mark.parametrize("name", ["sd3-controlnet", "flux-controlnet"])
def test_a_transformer_controlnet_trains_and_draws_its_pipelines_pixels(tmp_path, name, sd3_two_blocks_dir, flux_dir):
    """SD3's and Flux's: made from the base's transformer, trained on pairs while the transformer stays frozen, the
    export loads in the plain ControlNet pipeline and `sdtrain generate --control` draws its pixels."""
    family, base, plain_class = _transformer_ones(name, sd3_two_blocks_dir, flux_dir)
    data = controls(write_pairs(tmp_path / "pairs", count=4, size=32))
    extra = [f"model.family={name}", "data.conditions=[control]", "train.num_steps=2", "model.controlnet_layers=1"]
    config = load_config(Config, None, pipeline_overrides(tmp_path / "run", data, base) + extra)
    from sdtrain.train.loop import estimate

    memory = estimate(config)  # the pre-flight estimate: the ControlNet's gradients, the two models' weights
    assert not (tmp_path / "run").exists()
    final = train(config)
    assert detect(final) is family
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == plain_class.__name__
    saved, before = (load_file(f / "transformer" / "diffusion_pytorch_model.safetensors") for f in (final, base))
    assert set(saved) == set(before) and all(torch.equal(saved[k], before[k]) for k in before)  # frozen
    controlnet = load_file(final / "controlnet" / "diffusion_pytorch_model.safetensors")
    zero_layers = [k for k in controlnet if k.startswith("controlnet_blocks.")]
    assert zero_layers and all(controlnet[k].abs().max() > 0 for k in zero_layers)  # they left zero
    config = json.loads((final / "controlnet" / "config.json").read_text())
    assert config["num_layers"] == 1 and config.get("force_zeros_for_pooled_projection") in (False, None)

    control = Image.open(data / "002.control.png").convert("RGB")
    ours = Pipeline.from_pretrained(final, device="cpu")
    images = ours.generate(["a red square", "a blue square"], control=control, num_inference_steps=3,
                           guidance_scale=2.0, height=32, width=32, seed=3).images  # fmt: skip
    plain = plain_class.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    trained = sum(p.numel() for p in plain.controlnet.parameters())
    held = sum(t.numel() for m in (plain.controlnet, plain.transformer) for t in m.state_dict().values())
    assert memory.gradients == 4 * trained and memory.weights == 4 * held  # fp32; the position tables too
    kwargs = ours._family_kwargs()
    generators = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    theirs = plain(["a red square", "a blue square"], control_image=[control, control], num_inference_steps=3,
                   guidance_scale=2.0, height=32, width=32, generator=generators, **kwargs).images  # fmt: skip
    assert images[0].size == (32, 32)
    for a, b in zip(images, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name,instantx", [("sd3-controlnet", False), ("sd3-controlnet", True),
                                           ("flux-controlnet", False)])  # fmt: skip
def test_a_transformer_controlnets_training_call_is_its_pipelines(name, instantx, sd3_two_blocks_dir, flux_dir):
    """The training call is what the plain pipeline calls, captured from one of its steps: the same control latents
    (the posterior's mean on both sides; shifted or, for InstantX's SD3 ControlNets, not), the pooled text (zeros
    for InstantX's), position ids and guidance; the transformer's output equals ours."""
    from unittest.mock import patch

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from sdtrain.models.families import flux

    family, base, plain_class = _transformer_ones(name, sd3_two_blocks_dir, flux_dir)
    keys = [f"model.pretrained={base}", f"model.family={name}", "model.controlnet_layers=1"]
    config = load_config(Config, None, keys + ["data.conditions=[control]", "data.path=x"])
    components = family.load(config)
    model = components.controlnet
    assert not any(p.requires_grad for p in model.transformer.parameters())
    with torch.no_grad():
        for p in model.controlnet.controlnet_blocks.parameters():
            p.normal_(std=0.1)  # as if trained: the block outputs are no longer zero
        c = model.controlnet
        for p in (c.pos_embed_input if name == "sd3-controlnet" else c.controlnet_x_embedder).parameters():
            p.normal_(std=0.1)
    model.controlnet.register_to_config(force_zeros_for_pooled_projection=instantx)
    pipe = plain_class(**family.pipeline_components(components), scheduler=Pipeline(components, family).scheduler)
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    calls = {}
    hooks = [m.register_forward_hook(lambda _m, _a, kw, out, key=key: calls.setdefault(key, (kw, out)) and None,
                                     with_kwargs=True)  # the first step's call (None: the output kept)
             for key, m in (("controlnet", pipe.controlnet), ("transformer", pipe.transformer))]  # fmt: skip
    with patch.object(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean):
        pipe("a red square", control_image=control, num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
             generator=torch.Generator().manual_seed(0), output_type="latent",
             **family.sampling_kwargs(components))  # fmt: skip
    for h in hooks:
        h.remove()
    seen, out = calls["transformer"]
    pixels = torch.from_numpy(np.asarray(control)).permute(2, 0, 1)[None].float() / 127.5 - 1
    cond = family.encode_prompts(components, ["a red square"], "cpu") | family.encoders(components).encode_conditions(
        [pixels])  # fmt: skip
    latents, timesteps, theirs = seen["hidden_states"], seen["timestep"], out[0]
    given = calls["controlnet"][0]["controlnet_cond"]
    if name == "flux-controlnet":  # packed on the pipeline's side; its timestep is sigma
        latents, theirs, given = (flux.unpack(x, 16, 16) for x in (latents, theirs, given))
        timesteps = timesteps * 1000
    torch.testing.assert_close(cond[CONTROL], given, atol=1e-5, rtol=1e-5)
    if instantx:
        assert not calls["controlnet"][0]["pooled_projections"].any()
    with torch.no_grad():
        ours = family.predict(model, latents, timesteps, cond)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    from sdtrain.models.families import sd3

    text = {k: v for k, v in cond.items() if k != CONTROL}
    unsteered = (sd3 if name == "sd3-controlnet" else flux).predict(model.transformer, latents, timesteps, text)
    assert (ours - unsteered).abs().max() > 1e-3  # the ControlNet steers


def test_transformer_controlnets_refuse_what_they_cannot_steer(tmp_path, sd3_dir, flux_dir):
    """A one-block SD3 transformer has no block a ControlNet can copy; a Flux ControlNet of XLabs' kind (pixels
    through an input hint block) or a union one is refused by name, before any training."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    from sdtrain.models.families.flux_controlnet import FAMILY as FLUX_CONTROLNET
    from sdtrain.models.families.sd3_controlnet import FAMILY as SD3_CONTROLNET

    def config(base: Path, *extra: str) -> Config:
        return load_config(Config, None, [f"model.pretrained={base}", "data.conditions=[control]", "data.path=x",
                                          *extra])  # fmt: skip

    with pytest.raises(ConfigError, match="but its last: this one has one"):
        SD3_CONTROLNET.load(config(sd3_dir, "model.family=sd3-controlnet"))
    c = FluxTransformer2DModel.load_config(flux_dir / "transformer")
    shape = dict(num_layers=1, num_single_layers=0, attention_head_dim=c["attention_head_dim"],
                 num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
                 pooled_projection_dim=c["pooled_projection_dim"], in_channels=c["in_channels"],
                 axes_dims_rope=c["axes_dims_rope"], guidance_embeds=True)  # fmt: skip
    for i, (kind, extra) in enumerate((("XLabs' kind", {"conditioning_embedding_channels": 16}),
                                       ("a union one", {"num_mode": 3}))):  # fmt: skip
        FluxControlNetModel(**shape, **extra).save_pretrained(tmp_path / f"c{i}")
        with pytest.raises(ConfigError, match=kind):
            FLUX_CONTROLNET.load(config(flux_dir, "model.family=flux-controlnet", f"model.controlnet={tmp_path}/c{i}"))
    with pytest.raises(ConfigError, match="model.controlnet_layers must be at least 1"):
        config(flux_dir, "model.controlnet_layers=0")


@pytest.mark.slow  # two-process launches: make test-all
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_a_controlnet_sharded_trains_what_one_process_trains(strategy, tmp_path, sd_dir):
    """The ControlNet with its frozen UNet inside, sharded over 2 processes (FSDP2 or DeepSpeed ZeRO-3): the losses and
    the exported ControlNet are one process's, the frozen UNet exported unchanged."""
    from tests.test_distributed import ADAM_EPS, _launch_deepspeed, _launch_fsdp
    from tests.test_faults import _losses, _train

    data = controls(write_pairs(tmp_path / "pairs", count=4, size=32))
    extra = ["train.num_steps=4", "train.mixed_precision=no", ADAM_EPS]
    assert _train(overrides(tmp_path / "one", data, sd_dir) + extra).returncode == 0
    sharded = overrides(tmp_path / "two", data, sd_dir) + extra
    result = _launch_fsdp(sharded) if strategy == "fsdp2" else _launch_deepspeed(sharded, "--zero_stage", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    (steps_a, losses_a), (steps_b, losses_b) = zip(*_losses(tmp_path / "one")), zip(*_losses(tmp_path / "two"))
    assert steps_a == steps_b == (1, 2, 3, 4) and losses_b == pytest.approx(losses_a, rel=1e-5)
    for part in ("controlnet", "unet"):
        a, b = (load_file(tmp_path / run / "final" / part / "diffusion_pytorch_model.safetensors")
                for run in ("one", "two"))  # fmt: skip
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    base = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(b[k], base[k]) for k in base)


def test_a_controlnets_base_is_held_in_bf16_checkpointed_never_and_exported_as_its_files_hold_it(tmp_path, sd_dir):
    """Under bf16 the frozen UNet inside the trained model is held in bf16 (the ControlNet trains in fp32), as a LoRA
    run's base is: the checkpoints hold the ControlNet's weights alone, the export (and `sdtrain export` of a
    checkpoint) writes the base UNet as its files hold it, bit for bit, beside the trained ControlNet; killed and
    rerun, the run ends as the uninterrupted one."""
    from sdtrain.train import placement
    from sdtrain.train.export import export_checkpoint
    from tests.test_faults import KILLED, _losses, _train

    data = controls(write_pairs(tmp_path / "pairs", count=4, size=32))
    extra = ["train.mixed_precision=bf16", "train.num_steps=4", "train.save_every=2"]
    config = load_config(Config, None, overrides(tmp_path / "run", data, sd_dir) + extra)
    components = CONTROLNET.load(config)
    placed = placement.prepare(CONTROLNET, components, config, torch.device("cpu"), sharded=False)
    model = components.controlnet
    assert placed.base_reloads and model.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.controlnet.parameters())
    assert all(not p.requires_grad for p in model.unet.parameters())

    assert _train(overrides(tmp_path / "run", data, sd_dir) + extra).returncode == 0
    final = tmp_path / "run" / "final"
    held = load_file(tmp_path / "run" / "checkpoints" / "step-00000004" / "controlnet.safetensors")
    assert held and all(k.startswith("controlnet.") for k in held)  # the trained weights alone
    assert all(v.dtype == torch.float32 for v in held.values())
    unet = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    exported = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == unet.keys() and all(torch.equal(exported[k], unet[k]) for k in unet)
    again = export_checkpoint(tmp_path / "run", 4, tmp_path / "again")
    a, b = (load_file(f / "controlnet" / "diffusion_pytorch_model.safetensors") for f in (final, again))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA of step 4, as the final export
    assert _train(overrides(tmp_path / "b", data, sd_dir) + extra, "kill_micro=4").returncode == KILLED
    assert _train(overrides(tmp_path / "b", data, sd_dir) + extra).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "run")
    c = load_file(tmp_path / "b" / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)

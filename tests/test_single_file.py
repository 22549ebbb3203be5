"""Single-file (LDM layout) export: diffusers' own importer maps every tensor back, and the loaded pipeline draws the
same images as the folder it came from."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel

from sdtrain.models.single_file import SingleFileError, load_single_file, save_single_file
from tests.conftest import save_pipeline


def _unet(**overrides) -> UNet2DConditionModel:
    """SD 1.x's block layout in miniature: cross-attention on the upper levels, two layers per level, a plain
    bottom level, channel changes (so shortcut convolutions exist)."""
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**(config | overrides))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, clip_dir, vae_dir):
    """A tiny SD 1.x-shaped pipeline folder with non-zero weights everywhere (so a swapped tensor shows)."""
    unet = _unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised output convs would hide a mapping error
    return save_pipeline(tmp_path_factory.mktemp("sd") / "pipe", unet, clip_dir, vae_dir)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, clip_dir, vae_dir):
    """SD 2.x's shape in miniature: linear projections in the transformers, an OpenCLIP-style (gelu) text encoder."""
    from transformers import CLIPTextConfig

    unet = _unet(use_linear_projection=True, attention_head_dim=(2, 4, 4))
    config = CLIPTextConfig.from_pretrained(clip_dir / "text_encoder")
    config.hidden_act = "gelu"
    torch.manual_seed(1)
    text = CLIPTextModel(config)
    with torch.no_grad():
        for p in list(unet.parameters()) + list(text.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    folder = save_pipeline(tmp_path_factory.mktemp("sd2") / "pipe", unet, clip_dir, vae_dir, text_encoder=text)
    scheduler = folder / "scheduler" / "scheduler_config.json"  # SD 2.x 768's v-prediction
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    return folder


def test_diffusers_importer_maps_every_exported_tensor_back(sd_folder, tmp_path):
    file = save_single_file(sd_folder, tmp_path / "model.safetensors")
    ldm = load_file(file)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in ldm)
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    vae = AutoencoderKL.from_pretrained(sd_folder / "vae")
    text = CLIPTextModel.from_pretrained(sd_folder / "text_encoder")
    for ours, theirs in (
        (unet.state_dict(), convert_ldm_unet_checkpoint(ldm, unet.config)),
        (vae.state_dict(), convert_ldm_vae_checkpoint(ldm, vae.config)),
        (
            {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if not k.endswith("position_ids")},
            {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()},
        ),
    ):
        assert sorted(theirs) == sorted(ours)
        assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    # SD 1.x key names where SD's own checkpoints have them
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in ldm
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # plain up level: upsampler in slot 1
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # attention level: slot 2
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ldm


def test_sd2_text_encoder_is_written_in_open_clip_layout(sd2_folder, tmp_path):
    """SD 2.x files hold OpenCLIP's names (q, k, v fused into in_proj): what A1111 and ComfyUI look for to load an
    SD 2.x text encoder. diffusers' OpenCLIP importer gives back every tensor."""
    ldm = load_file(save_single_file(sd2_folder, tmp_path / "model.safetensors"))
    text = CLIPTextModel.from_pretrained(sd2_folder / "text_encoder")
    unet = UNet2DConditionModel.from_pretrained(sd2_folder / "unet")
    assert not any(k.startswith("cond_stage_model.transformer.") for k in ldm)
    assert ldm["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert "cond_stage_model.model.positional_embedding" in ldm and "cond_stage_model.model.ln_final.bias" in ldm
    ours = {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    theirs = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, ldm).items()}
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    unet_back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert all(torch.equal(unet_back[k], v) for k, v in unet.state_dict().items())
    assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear, as in SD 2.x files


@pytest.mark.parametrize("folder", ["sd_folder", "sd2_folder"])
def test_single_file_loads_offline_and_draws_the_same_images(folder, tmp_path, request):
    sd_folder = request.getfixturevalue(folder)
    file = save_single_file(sd_folder, tmp_path / "model.safetensors")
    loaded = load_single_file(file, sd_folder)
    original = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    images = []
    for pipe in (original, loaded):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            ["a red square", "a blue circle"],
            num_inference_steps=3,
            height=16,
            width=16,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        images.append(out.images)
    assert np.array_equal(images[0], images[1])
    assert images[0].std() > 0


@pytest.mark.parametrize("folder", ["sd_folder", "sd2_folder"])
def test_the_yaml_beside_the_file_describes_the_model(folder, tmp_path, request):
    """diffusers' readers of the original LDM config rebuild our UNet and VAE configs from the .yaml (scaling factor
    included: the tiny VAE's is 3.0, not SD's); betas, parameterization and text encoder are those of the model."""
    import yaml
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    sd_folder = request.getfixturevalue(folder)
    file = save_single_file(sd_folder, tmp_path / "model.safetensors")
    config = yaml.safe_load((tmp_path / "model.yaml").read_text())
    ldm = load_file(file)
    unet = UNet2DConditionModel.load_config(sd_folder / "unet")
    unet_back = create_unet_diffusers_config_from_ldm(config, ldm)
    keys = ["block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim"]
    keys += ["attention_head_dim", "use_linear_projection", "in_channels", "out_channels"]
    assert {k: _plain(unet_back[k]) for k in keys} == {k: _plain(unet[k]) for k in keys}
    assert unet_back["transformer_layers_per_block"] == unet.get("transformer_layers_per_block", 1)
    vae = AutoencoderKL.load_config(sd_folder / "vae")
    vae_back = create_vae_diffusers_config_from_ldm(config, ldm)
    keys = ["block_out_channels", "latent_channels", "layers_per_block", "scaling_factor", "in_channels"]
    assert {k: _plain(vae_back[k]) for k in keys} == {k: _plain(vae[k]) for k in keys}
    params = config["model"]["params"]
    scheduler = json.loads((sd_folder / "scheduler" / "scheduler_config.json").read_text())
    assert (params["linear_start"], params["linear_end"]) == (scheduler["beta_start"], scheduler["beta_end"])
    assert params.get("parameterization", "eps") == ("v" if folder == "sd2_folder" else "eps")
    encoder = params["cond_stage_config"]["target"].rsplit(".", 1)[1]
    assert encoder == ("FrozenOpenCLIPEmbedder" if folder == "sd2_folder" else "FrozenCLIPEmbedder")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_half_precision_file(sd_folder, tmp_path):
    full = load_file(save_single_file(sd_folder, tmp_path / "f32.safetensors"))
    half = load_file(save_single_file(sd_folder, tmp_path / "f16.safetensors", dtype=torch.float16))
    assert sorted(full) == sorted(half)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())


def test_what_the_layout_cannot_hold_is_refused(tmp_path, sd_folder):
    extra = _unet(addition_embed_type="text", encoder_hid_dim=32)
    folder = tmp_path / "extra"
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.unet = extra
    pipe.save_pretrained(folder)
    with pytest.raises(SingleFileError, match="addition_embed_type"):
        save_single_file(folder, tmp_path / "x.safetensors")
    with pytest.raises(SingleFileError, match=".safetensors"):
        save_single_file(sd_folder, tmp_path / "x.ckpt")
    bert = tmp_path / "bert"
    shutil.copytree(sd_folder, bert)
    index = json.loads((bert / "model_index.json").read_text())
    (bert / "model_index.json").write_text(json.dumps(index | {"text_encoder": ["transformers", "BertModel"]}))
    with pytest.raises(SingleFileError, match="BertModel"):
        save_single_file(bert, tmp_path / "x.safetensors")


def test_cli_converts_both_ways(sd_folder, tmp_path, capsys):
    from sdtrain.cli import main

    file = tmp_path / "model.safetensors"
    assert main(["convert", str(sd_folder), str(file), "--half"]) == 0
    assert main(["convert", str(file), str(tmp_path / "back")]) == 2
    assert "pass --config" in capsys.readouterr().err
    assert main(["convert", str(file), str(tmp_path / "back"), "--config", str(sd_folder)]) == 0
    back = UNet2DConditionModel.from_pretrained(tmp_path / "back" / "unet").state_dict()
    original = UNet2DConditionModel.from_pretrained(sd_folder / "unet").state_dict()
    # an fp16 file comes back as fp32 (ready to fine-tune), holding exactly the rounded values
    assert all(back[k].dtype == torch.float32 for k in original)
    assert all(torch.equal(back[k], original[k].half().float()) for k in original)


def test_training_from_a_single_file_says_how(tmp_path, sd_folder):
    from sdtrain.config import Config, ConfigError, load_config

    file = save_single_file(sd_folder, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="sdtrain convert"):
        load_config(Config, None, [f"model.pretrained={file}"])


def test_sd15_sized_model_gets_sd15s_key_set():
    """At SD 1.5's size (built on the meta device: no memory, no download) the export has the tensor counts of SD
    1.5's own single file: 686 UNet, 248 VAE, 196 text-encoder tensors (its 197th is the position_ids buffer); and
    SD 2.x's text encoder those of SD 2.1's file less what diffusers' encoder does not hold."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig

    from sdtrain.models.single_file import open_clip_text_to_ldm, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

    with init_empty_weights():
        unet = _unet(
            sample_size=64,
            cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        text = CLIPTextModel(CLIPTextConfig(num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu"))
        # SD 2.x's OpenCLIP ViT-H as diffusers holds it: 23 of its 24 layers (SD reads the penultimate one)
        open_clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_attention_heads=16,
                num_hidden_layers=23,
                max_position_embeddings=77,
                hidden_act="gelu",
            )
        )
    unet_keys = unet_to_ldm(unet.state_dict(), dict(unet.config))
    vae_keys = vae_to_ldm(vae.state_dict(), dict(vae.config))
    assert (len(unet_keys), len(vae_keys), len(text_encoder_to_ldm(text.state_dict()))) == (686, 248, 196)
    for name in ("input_blocks.9.0.op", "output_blocks.2.1.conv", "output_blocks.8.2.conv", "middle_block.1.proj_in"):
        assert f"model.diffusion_model.{name}.weight" in unet_keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in vae_keys  # LDM numbers decoder levels upwards
    # SD 2.1's file holds 294 text tensors: 24 layers of 12, the embeddings, ln_final, text_projection, logit_scale;
    # the penultimate-layer encoder has no place for the last layer, the projection or the scale (diffusers' importer
    # skips them too), which leaves 280
    open_clip_keys = open_clip_text_to_ldm(open_clip.state_dict())
    assert len(open_clip_keys) == 294 - 12 - 2
    assert open_clip_keys["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)

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


def test_single_file_loads_offline_and_draws_the_same_images(sd_folder, tmp_path):
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
    assert "pass config" in capsys.readouterr().err
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
    1.5's own single file: 686 UNet, 248 VAE, 196 text-encoder tensors (its 197th is the position_ids buffer)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig

    from sdtrain.models.single_file import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

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
    unet_keys = unet_to_ldm(unet.state_dict(), dict(unet.config))
    vae_keys = vae_to_ldm(vae.state_dict(), dict(vae.config))
    assert (len(unet_keys), len(vae_keys), len(text_encoder_to_ldm(text.state_dict()))) == (686, 248, 196)
    for name in ("input_blocks.9.0.op", "output_blocks.2.1.conv", "output_blocks.8.2.conv", "middle_block.1.proj_in"):
        assert f"model.diffusion_model.{name}.weight" in unet_keys
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in vae_keys  # LDM numbers decoder levels upwards

"""The family interface: detection from a folder, what every family provides, and the package's shape (no import
cycles, no front-end imports, short functions) checked by tools/check_layout.py."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)

from sdtrain.config import Config, load_config
from sdtrain.models.families import Encoders, detect, families, for_config
from sdtrain.models.families.sd import FAMILY as SD
from sdtrain.models.unet import build_unet
from sdtrain.models.vae import latent_channels
from sdtrain.sample.pipeline import Pipeline
from tests.conftest import save_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _tiny_pipeline(folder: Path, clip_dir: Path, vae_dir: Path) -> Path:
    from sdtrain.config import UNetConfig

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8), 4, 16, 32)
    return save_pipeline(folder, unet, clip_dir, vae_dir)


def _tiny_edit_pipeline(folder: Path, clip_dir: Path, vae_dir: Path) -> Path:
    """The tiny Stable Diffusion pipeline as an InstructPix2Pix folder: its UNet takes the reference's channels too."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from sdtrain.config import UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8)
    sd = StableDiffusionPipeline.from_pretrained(_tiny_pipeline(folder.with_name("t2i"), clip_dir, vae_dir))
    pipe = StableDiffusionInstructPix2PixPipeline(**sd.components | {"unet": build_unet(config, 4, 16, 32,
                                                                                        in_channels=8)})  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def test_a_family_is_detected_from_model_index(tmp_path, clip_dir, vae_dir):
    folder = _tiny_pipeline(tmp_path / "sd", clip_dir, vae_dir)
    assert detect(folder) is SD
    assert for_config(load_config(Config, None, [f"model.pretrained={folder}"]).model) is SD
    assert detect(None) is SD and detect(tmp_path / "no-index") is SD  # no model_index.json: Stable Diffusion
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="KandinskyV22Pipeline folder; sdtrain trains these families: sd"):
        detect(folder)


def test_every_family_provides_the_interface(
    tmp_path,
    clip_dir,
    vae_dir,
    sdxl_dir,
    sd3_dir,
    sd3_two_blocks_dir,
    flux_dir,
    pixart_dir,
    sana_dir,
    chroma_dir,
    zimage_dir,
    qwenimage_dir,
    flux2_klein_dir,
    flux2_dir,
    lumina2_dir,
    qwenimage_edit_dir,
    qwenimage_edit_plus_dir,
):
    """Each family's functions agree with one another on tiny components saved by diffusers: its encoders condition
    its denoiser, its pipeline kwargs build its diffusers pipelines, whose components come back as its components."""
    folders = {"sd": _tiny_pipeline(tmp_path / "sd", clip_dir, vae_dir), "sdxl": sdxl_dir, "sd3": sd3_dir}
    folders |= {"pixart": pixart_dir, "flux": flux_dir, "sana": sana_dir, "chroma": chroma_dir, "zimage": zimage_dir}
    folders |= {"qwenimage": qwenimage_dir, "flux2-klein": flux2_klein_dir, "flux2": flux2_dir, "lumina2": lumina2_dir}
    folders["instruct-pix2pix"] = _tiny_edit_pipeline(tmp_path / "edit", clip_dir, vae_dir)
    folders["sd-controlnet"] = tmp_path / "controlnet"  # SD's, with a ControlNet made from its UNet
    sd = StableDiffusionPipeline.from_pretrained(folders["sd"])
    control = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(16, 32))
    controlled = StableDiffusionControlNetPipeline(**sd.components | {"controlnet": control})
    controlled.save_pretrained(folders["sd-controlnet"])
    folders["sdxl-controlnet"] = tmp_path / "sdxl-controlnet"
    xl = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    control = ControlNetModel.from_unet(xl.unet, conditioning_embedding_out_channels=(16, 32))
    controlled = StableDiffusionXLControlNetPipeline(**xl.components | {"controlnet": control})
    controlled.save_pretrained(folders["sdxl-controlnet"])
    folders["sd3-controlnet"] = tmp_path / "sd3-controlnet"  # SD3's, with a ControlNet made from its transformer
    sd3 = StableDiffusion3Pipeline.from_pretrained(sd3_two_blocks_dir)
    # (from_transformer writes into the config it reads: given a copy)
    control = SD3ControlNetModel.from_transformer(copy.deepcopy(sd3.transformer), 1, num_extra_conditioning_channels=0)
    StableDiffusion3ControlNetPipeline(**sd3.components | {"controlnet": control}).save_pretrained(
        folders["sd3-controlnet"]
    )
    folders["flux-controlnet"] = tmp_path / "flux-controlnet"
    fl = FluxPipeline.from_pretrained(flux_dir)
    c = fl.transformer.config
    control = FluxControlNetModel.from_transformer(fl.transformer, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=c.attention_head_dim,
                                                   num_attention_heads=c.num_attention_heads)  # fmt: skip
    FluxControlNetPipeline(**fl.components | {"controlnet": control}).save_pretrained(folders["flux-controlnet"])
    folders["flux-kontext"] = tmp_path / "kontext"  # Flux's components, the edit pipeline's class
    FluxKontextPipeline(**FluxPipeline.from_pretrained(flux_dir).components).save_pretrained(folders["flux-kontext"])
    folders |= {"qwenimage-edit": qwenimage_edit_dir, "qwenimage-edit-plus": qwenimage_edit_plus_dir}
    assert set(folders) == set(families())  # a new family brings its tiny folder here
    for name, family in families().items():
        config = load_config(Config, None, [f"model.pretrained={folders[name]}", "data.resolution=32"])
        assert for_config(config.model) is family
        components = family.load(config)
        encoders = family.encoders(components)
        assert isinstance(encoders, Encoders)
        gray = [torch.zeros(2, 3, 32, 32)]
        if encoders.encode_text_seeing is None:
            cond = encoders.encode_text(["a red circle", ""])
        else:  # Qwen-Image-Edit's prompts are encoded with their references
            cond = encoders.encode_text_seeing(["a red circle", ""], gray)
        if encoders.encode_sizes is not None:
            cond |= encoders.encode_sizes([(40, 30), (32, 32)], [(4, 0), (0, 0)], (32, 32))
        if encoders.encode_conditions is not None:  # an edit model's reference
            cond |= encoders.encode_conditions(gray)
        assert all(v.shape[0] == 2 and v.dtype == torch.float32 for v in cond.values())
        assert encoders.text_identity() == family.encoders(family.load(config)).text_identity()  # exact, repeatable
        model = family.denoiser_of(components)
        latents = torch.randn(2, latent_channels(encoders.vae), 16, 16)
        out = family.predict(model, latents, torch.tensor([10, 900]), cond)
        assert out.shape == latents.shape
        scheduler = Pipeline(components, family).scheduler
        for img2img, cls in ((False, family.txt2img), (True, family.img2img)):
            if cls is None:  # no image-to-image pipeline in diffusers (PixArt)
                continue
            pipe = cls(**family.pipeline_components(components, img2img), scheduler=scheduler)
            assert family.components_of(pipe) == components
        assert set(family.frozen(components)) | {family.denoiser} <= set(pipe.components)
        assert family.with_denoiser(components, None) != components and family.denoiser_of(components) is model
        family_key = [f"model.family={name}", f"model.pretrained={folders[name]}"]
        assert load_config(Config, None, family_key).model.family == name  # the config knows the name


def test_pipeline_from_pretrained_draws_what_diffusers_draws(tmp_path, clip_dir, vae_dir):
    """Pipeline.from_pretrained on a plain diffusers folder samples the same pixels as the family's diffusers
    pipeline for the same seeds (the parity every family's export must show)."""
    folder = _tiny_pipeline(tmp_path / "sd", clip_dir, vae_dir)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    assert ours.family is SD and type(ours.scheduler).__name__ == "EulerDiscreteScheduler"
    a = ours.generate(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=2.0, seed=5).images
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        b = plain(prompt, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(5 + i))
        assert np.array_equal(np.asarray(a[i]), np.asarray(b.images[0]))


def test_the_package_keeps_its_shape():
    """No library package imports a front end, no import cycle, no function over 120 lines: the script in tools/
    that anyone can rerun."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layout.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_layout_check_finds_a_cycle_and_a_front_end_import(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_layout
    finally:
        sys.path.remove(str(ROOT / "tools"))
    package = tmp_path / "sdtrain"
    (package / "train").mkdir(parents=True)
    (package / "sample").mkdir()
    (package / "__init__.py").write_text("")
    (package / "api.py").write_text("from sdtrain.train import loop\n")
    (package / "train" / "loop.py").write_text("def f():\n    from sdtrain.api import StableDiffusion\n")
    (package / "sample" / "pipeline.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sdtrain.api\n"
    )
    monkeypatch.setattr(check_layout, "SRC", tmp_path)
    edges = check_layout.graph()
    assert edges["train"] == {"api"} and edges["sample"] == set()  # lazy imports count, type-checking ones do not
    assert check_layout.cycles(edges) == [["api", "train", "api"]]
    assert check_layout.main([]) == 1

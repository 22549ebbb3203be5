"""The article's Python API end to end, and the CLI sub-commands."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import load_image

from sdtrain import StableDiffusion
from sdtrain.cli import EXAMPLES, main
from sdtrain.config import DataConfig, UNetConfig
from sdtrain.data.folder import make_dataloader
from sdtrain.models.text import load_text_encoder
from sdtrain.models.unet import build_unet


def test_article_style_script(tmp_path, clip_dir, vae_dir, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text_encoder, tokenizer = load_text_encoder(str(clip_dir), subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    unet = build_unet(
        UNetConfig(block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8),
        latent_channels=4,
        sample_size=16,
        cross_attention_dim=32,
    )
    dl = make_dataloader(DataConfig(path=str(image_folder), resolution=32), batch_size=4)
    before = unet.conv_in.weight.detach().clone()

    pipe = StableDiffusion(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, image_decoder=unet, device="cpu")
    pipe.fit(
        dataloader=dl,
        num_steps=3,
        lr=2e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        clip_norm=1.0,
        log_interval=1,
        save_interval=2,
        save_dir="runs/x",
    )
    assert not torch.equal(before, pipe.unet.conv_in.weight)
    assert (tmp_path / "runs/x/checkpoints/step-00000002/manifest.json").exists()
    pipe.generate("a cat wearing a hat and sunglasses", num_inference_steps=3).images[0].save("cat.png")
    dog = load_image(str(image_folder / "000.png"))
    pipe.reconstruct("a dog with blue fur and yellow eyes", dog, num_inference_steps=4).images[0].save("dog_recon.png")
    pipe.save_pretrained("out")
    again = StableDiffusion.from_pretrained("out", device="cpu")
    a = again.generate("a red square", num_inference_steps=3, seed=1).images[0]
    b = pipe.generate("a red square", num_inference_steps=3, seed=1).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(StableDiffusionPipeline.from_pretrained("out").unet, UNet2DConditionModel)
    assert load_image("cat.png").size == (32, 32)
    assert load_image("dog_recon.png").size == dog.size  # reconstruct keeps the input size (40 x 32 here)


def test_fit_accepts_tuples_of_pil_images(tmp_path, clip_dir, vae_dir):
    from PIL import Image

    text_encoder, tokenizer = load_text_encoder(str(clip_dir), subfolder="text_encoder")
    unet = build_unet(UNetConfig(block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8), 4, 16, 32)
    batches = [([Image.new("RGB", (32, 32), (200, 20, 20))] * 2, ["red", "red"])]
    pipe = StableDiffusion(AutoencoderKL.from_pretrained(vae_dir), text_encoder, tokenizer, unet, device="cpu")
    pipe.fit(dataloader=batches, num_steps=2, save_dir=tmp_path / "r", batch_size=2, log_interval=1, save_interval=1)
    assert (tmp_path / "r" / "final" / "model_index.json").exists()


def test_fit_takes_a_generator_of_dict_batches(tmp_path, clip_dir, vae_dir):
    """Any iterable: a one-shot generator's batch size is read from its first batch, which still trains; a generator
    that runs out before the run ends gets a message saying so."""
    text_encoder, tokenizer = load_text_encoder(str(clip_dir), subfolder="text_encoder")
    unet = build_unet(UNetConfig(block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8), 4, 16, 32)
    pipe = StableDiffusion(AutoencoderKL.from_pretrained(vae_dir), text_encoder, tokenizer, unet, device="cpu")

    def batches(n):
        for i in range(n):
            yield {"image": torch.full((3, 3, 32, 32), i / 4 - 0.5), "text": ["a", "b", "c"]}

    pipe.fit(dataloader=batches(3), num_steps=3, save_dir=tmp_path / "g", log_interval=1, save_interval=10)
    log = (tmp_path / "g" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3
    assert '"images_per_s"' in log[0]
    with pytest.raises(ValueError, match="ran out after 2"):
        pipe.fit(dataloader=batches(2), num_steps=3, save_dir=tmp_path / "h", log_interval=1, save_interval=10)


def test_a_failing_run_gives_the_signal_handlers_back(tmp_path, clip_dir, vae_dir):
    """The loop installs SIGTERM / SIGUSR1 handlers; when it raises (here: the data runs out), the caller's come back
    (a notebook that called fit() keeps its own)."""
    import signal

    text_encoder, tokenizer = load_text_encoder(str(clip_dir), subfolder="text_encoder")
    unet = build_unet(UNetConfig(block_out_channels=[16, 32], attention=[False, True], norm_num_groups=8), 4, 16, 32)
    pipe = StableDiffusion(AutoencoderKL.from_pretrained(vae_dir), text_encoder, tokenizer, unet, device="cpu")
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        batches = iter([{"image": torch.zeros(2, 3, 32, 32), "text": ["a", "b"]}])
        with pytest.raises(ValueError, match="ran out"):
            pipe.fit(dataloader=batches, num_steps=3, save_dir=tmp_path / "f", log_interval=1, save_interval=10)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_constructor_rejects_two_unets(clip_dir, vae_dir):
    text_encoder, tokenizer = load_text_encoder(str(clip_dir), subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with pytest.raises(TypeError):
        StableDiffusion(vae, text_encoder, tokenizer)


def test_cli_train_generate_reconstruct(tmp_path, clip_dir, vae_dir, image_folder, capsys):
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path / "run", image_folder, vae_dir, str(clip_dir), "text_encoder")
    assert main(["train", *overrides, "train.num_steps=2"]) == 0
    model = tmp_path / "run" / "final"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model),
                "--out",
                str(tmp_path / "g"),
                "--steps",
                "3",
                "--num",
                "2",
                "--device",
                "cpu",
                "a red square",
                "a blue square",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "g").glob("generate-*.png"))) == 4 and (tmp_path / "g" / "grid.png").exists()
    assert (
        main(
            [
                "reconstruct",
                "--model",
                str(model),
                "--image",
                str(image_folder / "001.png"),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "r"),
                "--steps",
                "4",
                "--strength",
                "0.5",
                "a green square",
            ]
        )
        == 0
    )
    assert (tmp_path / "r" / "reconstruct-0000.png").exists()


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert re.search(r"\bexamples?:\n  sdtrain ", capsys.readouterr().out)

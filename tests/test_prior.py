"""DreamBooth's prior preservation: class images drawn by the base model once and reused, mixed into training in
their share with their loss weight; refused before any work without a prompt or a model to draw them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sdtrain.config import Config, ConfigError, ObjectiveConfig, load_config
from sdtrain.data.streams import MixedStream, WeightedStream
from sdtrain.objective import DDPM, LOSS_WEIGHT, Draw
from sdtrain.train import prior
from sdtrain.train.loop import train
from sdtrain.train.preflight import check_run
from tests.conftest import pipeline_overrides, save_pipeline, tiny_unet, write_image_folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, clip_dir, vae_dir):
    return save_pipeline(tmp_path_factory.mktemp("prior-base"), tiny_unet((32, 64)), clip_dir, vae_dir)


def _overrides(tmp_path, base_dir, name, count):
    data = write_image_folder(tmp_path / "data", count=4)
    classes = tmp_path / "classes"
    return pipeline_overrides(tmp_path / name, data, base_dir) + [
        f"data.prior.path={classes}", "data.prior.prompt='a square'", f"data.prior.count={count}",
        "data.prior.num_inference_steps=2", "data.prior.loss_weight=0.5", "train.num_steps=2",
    ]  # fmt: skip


def test_class_images_are_drawn_once_and_reused(tmp_path, base_dir):
    train(load_config(Config, None, _overrides(tmp_path, base_dir, "run1", count=3)))
    classes = tmp_path / "classes"
    drawn = {p.name: p.read_bytes() for p in prior.existing(classes)}
    assert sorted(drawn) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert all((classes / n).with_suffix(".txt").read_text() == "a square" for n in drawn)
    assert len(set(drawn.values())) == 3  # each its own seed
    # a rerun that asks for one more draws only the missing one (here in the run's bf16); the others stay as they were
    train(load_config(Config, None, _overrides(tmp_path, base_dir, "run2", count=4) + ["train.mixed_precision=bf16"]))
    again = {p.name: p.read_bytes() for p in prior.existing(classes)}
    assert sorted(again) == [*sorted(drawn), "class-00003.png"]
    assert all(again[n] == drawn[n] for n in drawn)
    assert prior.missing(load_config(Config, None, _overrides(tmp_path, base_dir, "run3", count=4))) == []


def test_class_batches_come_in_their_share_with_their_loss_weight():
    class Source:  # a stream of one-sample batches naming where they came from
        skipped = {}

        def __init__(self, value):
            self.value = value

        def next(self, draws):
            return torch.full((1, 4, 8, 8), self.value), {}

    weights = [1.0, 3.0]  # data.path and one of data.datasets
    share = 0.25
    streams = [Source(0.0), Source(1.0), WeightedStream(Source(2.0), 0.5)]
    mix = MixedStream(streams, [*weights, prior.share_weight(weights, share)], seed=0)
    drawn = [mix.next(None) for _ in range(4000)]
    classes = [cond for latents, cond in drawn if latents[0, 0, 0, 0] == 2.0]
    assert abs(len(classes) / len(drawn) - share) < 0.02
    assert all(torch.equal(cond[LOSS_WEIGHT], torch.tensor([0.5])) for cond in classes)
    assert all(LOSS_WEIGHT not in cond for latents, cond in drawn if latents[0, 0, 0, 0] != 2.0)
    # the objective scales a weighted sample's loss by its weight
    objective, latents = DDPM(ObjectiveConfig()), torch.randn(2, 4, 8, 8)
    output = torch.randn(2, 4, 8, 8)
    draw = Draw(torch.randn(2, 4, 8, 8), torch.tensor([5, 9]))
    plain, _ = objective.loss(lambda *args: output, None, {}, latents, draw)
    half, _ = objective.loss(lambda *args: output, None, {LOSS_WEIGHT: torch.tensor([0.5, 0.5])}, latents, draw)
    assert torch.allclose(half, plain * 0.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.prior.path=classes"], "data.prior.prompt is empty"),
        (["data.prior.path=classes", "data.prior.prompt=a dog", "data.prior.share=1"], r"share must be in \(0, 1\)"),
    ],
)
def test_prior_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Config, None, overrides)


def test_class_images_to_draw_need_a_base_model(tmp_path, clip_dir, vae_dir):
    from tests.conftest import tiny_overrides

    data = write_image_folder(tmp_path / "data", count=4)
    overrides = tiny_overrides(tmp_path / "run", data, vae_dir, str(clip_dir), "text_encoder")
    overrides += [f"data.prior.path={tmp_path / 'classes'}", "data.prior.prompt='a square'", "data.prior.count=2"]
    with pytest.raises(ConfigError, match="no base model to draw the rest: set model.pretrained"):
        check_run(load_config(Config, None, overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigkill_then_resume_with_two_datasets_prior_tokens_and_masks_is_bit_exact(tmp_path, base_dir):
    """Pivotal tuning (a new token and LoRA) on two datasets with class images, masked loss, a trigger and tag
    shuffling and dropout, killed twice at micro-batches, ends with the uninterrupted run's losses, weights and
    embedding bit for bit."""
    from safetensors.torch import load_file

    from tests.test_faults import KILLED, _losses, _train

    data = write_image_folder(tmp_path / "data", count=5, size=40)
    for i, path in enumerate(sorted(data.glob("*.png"))):
        path.with_suffix(".txt").write_text(f"picture {i}, square, plain background, small")
        if i < 2:  # the left half learns
            mask = Image.new("L", (48, 40), 0)
            mask.paste(255, (0, 0, 24, 40))
            mask.save(path.with_name(path.stem + ".mask.png"))
    style = write_image_folder(tmp_path / "style", count=3, size=40, seed=3)
    extra = [f"data.prior.path={tmp_path / 'classes'}", "data.prior.prompt='a square'", "data.prior.count=3",
             "data.prior.num_inference_steps=2", "data.masked_loss=true", "data.trigger='<zqx>'",
             "data.shuffle_tags=true", "data.keep_tokens=1", "data.tag_dropout=0.3", "data.repeats=2",
             f"data.datasets=[{{path: '{style}', trigger: '', masked_loss: false, loss_weight: 0.5}}]",
             "train.textual_inversion.tokens=['<zqx>']", "train.textual_inversion.init=[square]", "train.lora.rank=4",
             "train.gradient_accumulation=2", "train.num_steps=6", "train.save_every=2"]  # fmt: skip
    first = _train(pipeline_overrides(tmp_path / "a", data, base_dir) + extra)
    assert first.returncode == 0, first.stderr[-3000:]
    overrides = pipeline_overrides(tmp_path / "b", data, base_dir) + extra
    for fault in ("kill_micro=3", "kill_micro=7"):
        assert _train(overrides, fault).returncode == KILLED, fault
    assert _train(overrides).returncode == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "embeddings/zqx.safetensors"):  # fmt: skip
        weights = [load_file(tmp_path / run / "final" / file) for run in "ab"]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), file

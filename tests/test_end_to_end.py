"""Train a tiny model on the CPU, checkpoint, resume, export, and load the export with plain diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from sdtrain.api import StableDiffusion
from sdtrain.config import SCHEDULER_NAMES, Config, load_config
from sdtrain.train import checkpoint
from sdtrain.train.loop import train
from tests.conftest import tiny_overrides

PROMPTS = ["a red square", "a blue square"]


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory, clip_dir, vae_dir):
    """A 4-step run with the tiny CLIP text encoder loaded from a folder we saved."""
    from tests.conftest import write_image_folder

    root = tmp_path_factory.mktemp("run_clip")
    data = write_image_folder(root / "data")
    config = load_config(Config, None, tiny_overrides(root / "run", data, vae_dir, str(clip_dir), "text_encoder"))
    final = train(config)
    return root / "run", final


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_run_writes_config_log_checkpoints_and_export(trained_clip):
    run, final = trained_clip
    assert (run / "config.yaml").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in log)
    assert log[-1]["skipped_samples"] == {}
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000002", "step-00000004"]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000004"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (final / name).is_dir(), name
    index = json.loads((final / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["safety_checker"] == [None, None]


def test_export_holds_ema_weights(trained_clip):
    run, final = trained_clip
    tensors, _, _ = checkpoint.load_checkpoint(run / "checkpoints" / "step-00000004")
    exported = UNet2DConditionModel.from_pretrained(final / "unet").state_dict()
    name = "conv_in.weight"
    assert torch.equal(exported[name], tensors["ema"][name])
    assert not torch.equal(exported[name], tensors["unet"][name])  # EMA differs from the raw weights


def test_generate_matches_plain_diffusers(trained_clip):
    _, final = trained_clip
    ours = StableDiffusion.from_pretrained(final, device="cpu").generate(
        PROMPTS, num_inference_steps=4, guidance_scale=5.0, seed=7
    )
    plain = StableDiffusionPipeline.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
    theirs = plain(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=generators).images
    assert len(ours.images) == 2 and ours.images[0].size == (32, 32)
    for a, b in zip(ours.images, theirs):
        assert np.array_equal(_pixels(a), _pixels(b))


def test_image_i_does_not_depend_on_batch(trained_clip):
    _, final = trained_clip
    pipe = StableDiffusion.from_pretrained(final, device="cpu")
    both = pipe.generate(PROMPTS, num_inference_steps=3, seed=3).images
    alone = pipe.generate(PROMPTS[1], num_inference_steps=3, seed=4).images
    assert np.array_equal(_pixels(both[1]), _pixels(alone[0]))
    assert not np.array_equal(_pixels(both[0]), _pixels(both[1]))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_samples(trained_clip, scheduler):
    _, final = trained_clip
    image = (
        StableDiffusion.from_pretrained(final, device="cpu", scheduler=scheduler)
        .generate("a red square", num_inference_steps=4)
        .images[0]
    )
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_reconstruct_distance_grows_with_strength(trained_clip, image_folder):
    _, final = trained_clip
    pipe = StableDiffusion.from_pretrained(final, device="cpu")
    # A 4-step UNet predicts noise badly; one that predicts zero noise isolates what reconstruct itself does:
    # encode, noise to the strength's level, denoise, decode. (The trained demo model is tested in test_demo.)
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    image = Image.open(image_folder / "000.png").convert("RGB").resize((32, 32))
    # reference: the autoencoder's own round trip of the input (the tiny VAE is random, so it is not the input)
    from sdtrain.models.vae import decode_latents, encode_moments, scale_latents

    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    mean, _ = encode_moments(pipe.vae, x)
    roundtrip = decode_latents(pipe.vae, scale_latents(pipe.vae, mean)).clamp(-1, 1)
    ref = ((roundtrip[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    distances = []
    for strength in (0.02, 0.5, 1.0):
        out = pipe.reconstruct("a blue square", image, strength=strength, num_inference_steps=50, seed=0).images[0]
        distances.append(float(np.abs(_pixels(out) - ref).mean()))
    # a zero-noise prediction leaves the strength's noise in: tiny strength stays close, full strength is far
    assert distances[0] < 0.35 * distances[2], distances
    assert distances[0] < distances[1] < distances[2], distances


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, clip_dir, vae_dir, image_folder, optimizer):
    """A run stopped at step 2 and resumed to step 4 ends with the weights of an uninterrupted 4-step run (Muon's
    momentum and its AdamW part's moments resume too)."""
    chosen = [f"train.optim.name={optimizer}"]
    base = tiny_overrides(tmp_path / "a", image_folder, vae_dir, str(clip_dir), "text_encoder") + chosen
    straight = train(load_config(Config, None, base))
    split = tiny_overrides(tmp_path / "b", image_folder, vae_dir, str(clip_dir), "text_encoder") + chosen
    train(load_config(Config, None, split + ["train.num_steps=2"]))
    resumed = train(load_config(Config, None, split))
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_minilm_trains_and_exports_to_plain_diffusers(tmp_path, vae_dir, image_folder):
    overrides = tiny_overrides(tmp_path / "run", image_folder, vae_dir, "minilm") + [
        "model.text_encoder.max_length=16",
        "data.cache_latents=true",
    ]
    final = train(load_config(Config, None, overrides))
    tokenizer_config = json.loads((final / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 16
    plain = StableDiffusionPipeline.from_pretrained(final)
    plain.set_progress_bar_config(disable=True)
    assert type(plain.text_encoder).__name__ == "BertModel"
    image = plain("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    ours = StableDiffusion.from_pretrained(final, device="cpu").generate("a red square", num_inference_steps=3)
    assert np.array_equal(_pixels(image), _pixels(ours.images[0]))


def test_export_of_last_checkpoint_equals_final(trained_clip, tmp_path):
    from sdtrain.train.export import export_checkpoint

    run, final = trained_clip
    exported = export_checkpoint(run, 4, tmp_path / "e")
    a = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (exported / "model_index.json").read_text() == (final / "model_index.json").read_text()


def test_export_carries_the_configured_sampling(tmp_path, clip_dir, vae_dir, image_folder):
    """sample.scheduler is the exported pipeline's scheduler, with the run's noise schedule, in plain diffusers too;
    sample's steps and guidance are generate's defaults for the model, and survive save_pretrained."""
    from diffusers import EulerAncestralDiscreteScheduler

    overrides = tiny_overrides(tmp_path / "run", image_folder, vae_dir, str(clip_dir), "text_encoder")
    overrides += ["train.num_steps=1", "sample.scheduler=euler_a", "sample.num_inference_steps=3"]
    overrides += ["sample.guidance_scale=2.0"]
    final = train(load_config(Config, None, overrides))
    scheduler = StableDiffusionPipeline.from_pretrained(final).scheduler
    assert isinstance(scheduler, EulerAncestralDiscreteScheduler)
    assert scheduler.config.prediction_type == load_config(Config, None, overrides).train.objective.prediction_type

    model = StableDiffusion.from_pretrained(final, device="cpu")
    assert model.sampling == {"num_inference_steps": 3, "guidance_scale": 2.0}
    default = _pixels(model.generate("a red square").images[0])
    assert np.array_equal(default, _pixels(model.generate("a red square", None, 1, 3, 2.0).images[0]))
    assert not np.array_equal(default, _pixels(model.generate("a red square", None, 1, 3, 7.5).images[0]))
    again = StableDiffusion.from_pretrained(model.save_pretrained(tmp_path / "saved"), device="cpu")
    assert again.sampling == model.sampling


def _other_vae(vae_dir, folder, scaling_factor=None):
    """The test VAE with nudged weights (another training of it), or only another scaling factor."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    if scaling_factor is None:
        with torch.no_grad():
            for p in vae.parameters():
                p.mul_(1.1)
    else:
        vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(folder)
    return folder


def test_export_and_resume_refuse_another_frozen_model(trained_clip, tmp_path, vae_dir, clip_dir, image_folder):
    """A run's checkpoints record its frozen VAE and text encoder; exporting or resuming with others (a relative path
    read from another directory, a retrained VAE) is refused instead of silently decoding wrong latents."""
    import shutil

    from sdtrain.train.export import export_checkpoint

    run, _ = trained_clip
    for i, other in enumerate((_other_vae(vae_dir, tmp_path / "v1"), _other_vae(vae_dir, tmp_path / "v2", 2.5))):
        copy = tmp_path / f"run{i}"
        shutil.copytree(run / "checkpoints", copy / "checkpoints")
        text = (run / "config.yaml").read_text().replace(f"path: {vae_dir}", f"path: {other}")
        assert text != (run / "config.yaml").read_text()
        (copy / "config.yaml").write_text(text)
        with pytest.raises(checkpoint.CheckpointError, match="the vae differs"):
            export_checkpoint(copy, 4, tmp_path / f"e{i}")
    overrides = tiny_overrides(tmp_path / "r", image_folder, vae_dir, str(clip_dir), "text_encoder")
    train(load_config(Config, None, overrides + ["train.num_steps=2"]))
    with pytest.raises(checkpoint.CheckpointError, match="the vae differs"):
        train(load_config(Config, None, overrides + [f"model.vae.path={tmp_path / 'v1'}"]))
    # the same VAE in another precision is the same VAE
    final = train(load_config(Config, None, overrides + ["model.vae.dtype=bfloat16"]))
    assert final.is_dir()


def test_t5_encoder_from_a_folder_trains(tmp_path, clip_dir, vae_dir, image_folder):
    """A T5 checkpoint (saved as the full encoder-decoder, as T5 repos are) is loaded as T5EncoderModel."""
    from transformers import AutoTokenizer, T5Config, T5Model

    folder = tmp_path / "t5"
    config = T5Config(vocab_size=600, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)
    T5Model(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(clip_dir / "tokenizer").save_pretrained(folder)  # any tokenizer with ids < 600
    overrides = tiny_overrides(tmp_path / "run", image_folder, vae_dir, str(folder)) + ["train.num_steps=2"]
    final = train(load_config(Config, None, overrides))
    plain = StableDiffusionPipeline.from_pretrained(final)
    assert type(plain.text_encoder).__name__ == "T5EncoderModel"
    assert plain.unet.config.cross_attention_dim == 32


def test_bf16_autocasts_over_fp32_weights_and_fp16_on_a_cpu_says_it_trains_fp32(
    tmp_path, clip_dir, vae_dir, image_folder, caplog
):
    def run(precision):
        overrides = tiny_overrides(tmp_path / precision, image_folder, vae_dir, str(clip_dir), "text_encoder")
        final = train(
            load_config(Config, None, overrides + [f"train.mixed_precision={precision}", "train.num_steps=2"])
        )
        losses = [json.loads(x)["loss"] for x in (tmp_path / precision / "log.jsonl").read_text().splitlines()]
        return load_file(final / "unet" / "diffusion_pytorch_model.safetensors"), losses

    _, fp32 = run("no")
    weights, bf16 = run("bf16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())  # fp32 master weights
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # the same step, in bf16
    with caplog.at_level("WARNING", logger="sdtrain.train.run"):
        _, fp16 = run("fp16")
    assert "trains in fp32" in caplog.text and fp16 == fp32


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, clip_dir, vae_dir, image_folder):
    from sdtrain.models.families.sd import load_components

    overrides = tiny_overrides(tmp_path / "run", image_folder, vae_dir, str(clip_dir), "text_encoder")
    config = load_config(
        Config, None, overrides + ["train.num_steps=3", "train.save_every=100", "train.ema_decay=null"]
    )
    components = load_components(config)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    nan_batch = {"image": torch.full((2, 3, 32, 32), float("nan")), "text": ["a", "b"]}
    train(config, components=components, batches=[nan_batch])
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == 3
    after = components.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights unchanged

    config.train.max_consecutive_skips = 2
    config.train.output_dir = str(tmp_path / "run2")
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        train(config, components=components, batches=[nan_batch])


def test_sigterm_checkpoints_and_exits_with_documented_code(tmp_path, clip_dir, vae_dir, image_folder):
    import os
    import signal
    import subprocess
    import sys
    import time

    from sdtrain.train.preemption import EXIT_PREEMPTED

    run = tmp_path / "run"
    overrides = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder")
    overrides += ["train.num_steps=100000", "train.save_every=100000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtrain", "train", *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log = run / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err.decode()[-2000:]
    latest = checkpoint.find_latest(run / "checkpoints")
    assert latest is not None
    stopped_at = json.loads((latest / "state.json").read_text())["step"]
    assert stopped_at >= 2
    # the same command resumes from there
    final = train(load_config(Config, None, overrides[:-2] + [f"train.num_steps={stopped_at + 2}"]))
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps[-1] == stopped_at + 2 and (final / "model_index.json").exists()


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, clip_dir, vae_dir):
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", count=8)
    (data / "002.png").write_bytes(b"\x89PNG truncated")
    (data / "005.png").write_bytes(b"")
    overrides = tiny_overrides(tmp_path / "run", data, vae_dir, str(clip_dir), "text_encoder")
    train(load_config(Config, None, overrides + ["train.num_steps=6", "train.save_every=100"]))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # 6 steps x 4 = 24 draws = 3 epochs of 8 files: each bad file is met (and counted) 3 times
    assert log[-1]["skipped_samples"] == {"not_an_image": 3, "empty": 3}


def test_fp16_loss_scaler_backs_off_on_an_overflow_trains_on_and_resumes(
    tmp_path, clip_dir, vae_dir, image_folder, monkeypatch
):
    """fp16 with a loss scaler: a step whose scaled gradients overflow is skipped by the scaler, which must still see
    it to lower its scale (its update() runs in the optimizer's step); the next steps train, and a run stopped after
    the overflow resumes with the lowered scale, ending with the uninterrupted run's weights. accelerate builds the
    scaler on GPUs only: here its set-up is done by hand on the CPU (fp16 autocast and torch's CPU GradScaler), as
    accelerate does it on CUDA; everything after that is accelerate's code. The overflow is a NaN loss on step 2."""
    from sdtrain import objective
    from sdtrain.train import loop

    make, loss = loop.make_accelerator, objective.diffusion_loss

    def with_a_scaler(tc, *args):
        accelerator = make(tc, *args)
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu")  # accelerate's CUDA fp16
        return accelerator

    def nan_on_step_2(calls):
        def diffusion_loss(*args, **kwargs):
            calls.append(1)
            value, per_sample = loss(*args, **kwargs)
            return (value * float("nan"), per_sample) if len(calls) == 2 else (value, per_sample)

        return diffusion_loss

    monkeypatch.setattr(loop, "make_accelerator", with_a_scaler)

    def run(name, steps, calls):
        monkeypatch.setattr(objective, "diffusion_loss", nan_on_step_2(calls))
        overrides = tiny_overrides(tmp_path / name, image_folder, vae_dir, str(clip_dir), "text_encoder")
        return train(load_config(Config, None, overrides + ["train.mixed_precision=fp16", f"train.num_steps={steps}"]))

    straight = run("a", 4, [])
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [0, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(log) if i != 1)
    scales = {}
    for step in (2, 4):
        path = tmp_path / "a" / "checkpoints" / f"step-{step:08d}" / "scaler.pt"
        scales[step] = torch.load(path, weights_only=True)["scale"]
    assert scales == {2: 65536.0 / 2, 4: 65536.0 / 2}  # backed off once, not grown (that takes 2000 good steps)
    calls = []
    run("b", 2, calls)
    resumed = run("b", 4, calls)  # the NaN stays on step 2: the calls go on counting
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_does_not_take_trust_remote_code_from_the_runs_config(trained_clip, tmp_path, monkeypatch):
    """A run folder from elsewhere whose config.yaml says trust_remote_code: true does not get code run by `sdtrain
    export`; only the command line's --trust-remote-code lets it."""
    import shutil

    from sdtrain.cli import main
    from sdtrain.models.families import sd

    run, _ = trained_clip
    copy = tmp_path / "received"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "export"))
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config.replace("trust_remote_code: false", "trust_remote_code: true"))
    asked, real = [], sd.load_text_encoder
    monkeypatch.setattr(sd, "load_text_encoder", lambda *a: asked.append(a[-1]) or real(*a))
    assert main(["export", "--run", str(copy), "--out", str(tmp_path / "a")]) == 0
    assert main(["export", "--run", str(copy), "--out", str(tmp_path / "b"), "--trust-remote-code"]) == 0
    assert asked == [False, True]


def test_a_stop_signal_while_the_run_sets_up_stops_it_cleanly(tmp_path, clip_dir, vae_dir, image_folder, monkeypatch):
    """SIGTERM before the first step (here: right after the models loaded; for a large model that takes minutes, and
    the web UI's Stop may come then) stops the run with Preempted (the CLI's exit 75), where it used to kill it
    (exit -15, read as a failure): the caller's handlers come back, nothing was checkpointed, and the same command
    then trains. The autoencoder's stage does the same."""
    import os
    import signal

    from sdtrain.config import AutoencoderConfig
    from sdtrain.train import autoencoder, loop
    from sdtrain.train.autoencoder import train_autoencoder
    from sdtrain.train.preemption import Preempted

    def terminated(original):
        def send_then_go_on(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)

        return send_then_go_on

    run = tmp_path / "run"
    overrides = tiny_overrides(run, image_folder, vae_dir, str(clip_dir), "text_encoder") + ["train.num_steps=2"]
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(loop, "check_disk", terminated(loop.check_disk))
            with pytest.raises(Preempted, match="SIGTERM before the first step"):
                train(load_config(Config, None, overrides))
        assert signal.getsignal(signal.SIGTERM) is mine
        assert checkpoint.find_latest(run / "checkpoints") is None
        assert (train(load_config(Config, None, overrides)) / "model_index.json").exists()
        assert signal.getsignal(signal.SIGTERM) is mine

        vae_overrides = ["model.block_out_channels=[8, 16]", "model.norm_num_groups=4", f"data.path={image_folder}",
                         "data.resolution=32", f"train.output_dir={tmp_path / 'vae'}", "train.batch_size=4",
                         "train.num_steps=2", "train.eval_images=4"]  # fmt: skip
        with monkeypatch.context() as patch:
            patch.setattr(autoencoder, "_data", terminated(autoencoder._data))
            with pytest.raises(Preempted, match="SIGTERM before the first step"):
                train_autoencoder(load_config(AutoencoderConfig, None, vae_overrides))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)

"""The training engine's parts: trackers and loss.png, validation loss, LoRA export, optimizers, speed switches,
EMA, FLOP count and the memory estimate."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdtrain.config import Config, ConfigError, LoRAConfig, OptimConfig, TrainConfig, UNetConfig, load_config
from sdtrain.models.families.sd import FAMILY
from sdtrain.models.unet import build_unet
from sdtrain.train.loop import train
from sdtrain.train.optim import make_optimizer, set_lr
from sdtrain.train.perf import advice, estimate_memory, profile_denoiser
from tests.conftest import tiny_overrides, write_image_folder


def _run(tmp_path, clip_dir, vae_dir, data, extra, name="run"):
    overrides = tiny_overrides(tmp_path / name, data, vae_dir, str(clip_dir), "text_encoder") + extra
    return train(load_config(Config, None, overrides))


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory, clip_dir, vae_dir):
    """A tiny SD pipeline folder, trained one step, that the LoRA-variant tests fine-tune (made once)."""
    root = tmp_path_factory.mktemp("lora-base")
    data = write_image_folder(root / "data")
    return _run(root, clip_dir, vae_dir, data, ["train.num_steps=1", "train.ema_decay=null"], "base")


def _log(run):
    from sdtrain.train.tracking import read_log

    return read_log(run / "log.jsonl")  # a step's validation loss merged into its training record


def test_tensorboard_loss_png_and_validation_loss(tmp_path, clip_dir, vae_dir):
    data = write_image_folder(tmp_path / "data", count=12)
    extra = ["data.validation_split=4", "train.validation_every=2", "train.sample_prompts=['a red square']"]
    extra += ["train.sample_every=2"]
    _run(tmp_path, clip_dir, vae_dir, data, extra)
    run = tmp_path / "run"
    log = _log(run)
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4] and all(np.isfinite(val))
    # TensorBoard event files hold the scalars and the sample images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tracking")).Reload()
    assert {"loss", "lr", "images_per_s", "val_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert "samples" in events.Tags()["images"]
    plot = Image.open(run / "loss.png")
    assert plot.size == (800, 450)
    pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (31, 119, 180)).all(1)).sum() > 50  # the train-loss curve is drawn
    assert ((pixels == (214, 39, 40)).all(1)).sum() > 10  # and the validation points


def test_validation_loss_is_fixed_for_fixed_weights(tmp_path, clip_dir, vae_dir):
    from sdtrain import objective
    from sdtrain.models.families.sd import FAMILY, load_components
    from sdtrain.train.validation import build_validation_set, validation_loss

    data = write_image_folder(tmp_path / "data", count=12)
    config = load_config(
        Config,
        None,
        tiny_overrides(tmp_path / "run", data, vae_dir, str(clip_dir), "text_encoder") + ["data.validation_split=4"],
    )
    c = load_components(config)
    diffusion = objective.make("ddpm", config.train.objective)
    held = build_validation_set(config.data, diffusion, FAMILY.encoders(c), 0)
    assert len(held) == 4 * 4  # 4 images x 4 timesteps
    assert held.timesteps.min() < 250 and held.timesteps.max() > 750  # spread over the whole range
    import contextlib

    a = validation_loss(c.unet, FAMILY.predict, diffusion, held, 3, contextlib.nullcontext)
    b = validation_loss(c.unet, FAMILY.predict, diffusion, held, 16, contextlib.nullcontext)
    assert a == pytest.approx(b, rel=1e-5)  # does not depend on the batch size or on when it runs
    # the held-out images are not trained on
    from sdtrain.data.folder import training_records, validation_records

    names = lambda records: {r["image"].name for r in records}  # noqa: E731
    train_names, val_names = names(training_records(config.data, 0)), names(validation_records(config.data, 0))
    assert len(train_names) == 8 and len(val_names) == 4 and not train_names & val_names


WIDE = "[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,time_emb_proj,conv1,conv2]"


@pytest.mark.parametrize(
    "alpha, variant, targets",
    [("null", "lora", None), ("1", "lora", None), ("1", "dora", None), pytest.param("null", "lora", WIDE, id="wide")],
)  # alpha = rank, and a scale of 1 / 4 folded into the export; adapters beyond attention (feed-forwards, resnets)
def test_lora_export_loads_with_plain_diffusers_and_changes_the_output(
    tmp_path, clip_dir, vae_dir, image_folder, alpha, variant, targets, lora_base
):
    base = lora_base
    extra = [f"model.pretrained={base}", "train.lora.rank=4", f"train.lora.alpha={alpha}", "train.optim.lr=1e-2"]
    extra += [f"train.lora.variant={variant}"]
    extra += ["train.ema_decay=null"] + ([f"train.lora.target_modules={targets}"] if targets else [])
    final = _run(tmp_path, clip_dir, vae_dir, image_folder, extra, "lora")
    lora = final / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file

    keys = list(load_file(lora))
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    # the base UNet's weights are untouched by LoRA training: only the adapters trained
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, output_type="np")
    before = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipe.load_lora_weights(final / "lora")
    after = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(after - before).mean() > 1e-3
    # the export's own UNet is base + adapters merged: it samples what base + load_lora_weights samples
    merged = StableDiffusionPipeline.from_pretrained(final)
    merged.set_progress_bar_config(disable=True)
    again = merged("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(again - after).max() < 1e-4
    if variant == "dora":  # the magnitudes are in the file, and the kohya layout is not written for them
        assert any("lora_magnitude_vector" in k for k in keys)
        assert not (final / "lora" / "lora_kohya.safetensors").exists()
        return
    # the kohya-layout file (for A1111 / ComfyUI), read by diffusers' kohya importer, applies the same update
    kohya = StableDiffusionPipeline.from_pretrained(base)
    kohya.set_progress_bar_config(disable=True)
    kohya.load_lora_weights(final / "lora", weight_name="lora_kohya.safetensors")
    third = kohya("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert np.abs(third - after).max() < 1e-4


def _lycoris_update(params: dict, shape) -> torch.Tensor:
    """The weight update of one layer's LyCORIS keys as ComfyUI's LoHa / LoKr adapters compute it (alpha over the
    rank of a low-rank factor, 1 without one), written from their loaders' formulas."""
    if "hada_w1_a" in params:
        update = (params["hada_w1_a"] @ params["hada_w1_b"]) * (params["hada_w2_a"] @ params["hada_w2_b"])
        rank = params["hada_w1_b"].shape[0]
    else:
        w1 = params.get("lokr_w1")
        w1 = w1 if w1 is not None else params["lokr_w1_a"] @ params["lokr_w1_b"]
        w2 = params.get("lokr_w2")
        w2 = w2 if w2 is not None else params["lokr_w2_a"] @ params["lokr_w2_b"]
        low = params.get("lokr_w2_b", params.get("lokr_w1_b"))
        rank = low.shape[0] if low is not None else None
        update = torch.kron(w1, w2)
    alpha = params["alpha"].item() / rank if "alpha" in params and rank else 1.0
    return (alpha * update).reshape(shape)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_loha_and_lokr_export_for_peft_and_lycoris_loaders(
    tmp_path, clip_dir, vae_dir, image_folder, variant, lora_base
):
    base = lora_base
    """A LoHa / LoKr run: the merged export equals the base with the adapters loaded by peft from the files in peft's
    layout, and the LyCORIS-named file (ComfyUI's, A1111's), applied with its loaders' formula, gives the merged
    export's weights."""
    import peft
    from safetensors.torch import load_file

    extra = [f"model.pretrained={base}", "train.lora.rank=4", "train.lora.alpha=2", "train.optim.lr=1e-2",
             f"train.lora.variant={variant}", "train.ema_decay=null"]  # fmt: skip
    final = _run(tmp_path, clip_dir, vae_dir, image_folder, extra, variant)
    merged = StableDiffusionPipeline.from_pretrained(final).unet
    # peft's layout: the adapters injected into the base and loaded give the merged UNet's output
    unet = StableDiffusionPipeline.from_pretrained(base).unet
    config = peft.PeftConfig.from_pretrained(final / "lora")
    assert type(config).__name__ == {"loha": "LoHaConfig", "lokr": "LoKrConfig"}[variant]
    peft.inject_adapter_in_model(config, unet, adapter_name="default")
    result = peft.set_peft_model_state_dict(unet, load_file(final / "lora" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = torch.randn(1, 8, merged.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = merged(x, t, cond).sample
        assert (expected - StableDiffusionPipeline.from_pretrained(base).unet(x, t, cond).sample).abs().max() > 1e-4
        assert (unet(x, t, cond).sample - expected).abs().max() < 1e-4
    # the LyCORIS file: every adapted layer's base weight plus ComfyUI's update is the merged weight
    plain = dict(StableDiffusionPipeline.from_pretrained(base).unet.named_parameters())
    merged_weights = dict(merged.named_parameters())
    layers: dict[str, dict] = {}
    for key, value in load_file(final / "lora" / "lora_kohya.safetensors").items():
        prefix, _, param = key.partition(".")
        layers.setdefault(prefix, {})[param] = value
    names = {"lora_unet_" + n[: -len(".weight")].replace(".", "_"): n for n in plain if n.endswith(".weight")}
    assert layers and set(layers) <= set(names)
    for prefix, params in layers.items():
        name = names[prefix]
        rebuilt = plain[name].detach() + _lycoris_update(params, plain[name].shape)
        assert torch.allclose(rebuilt, merged_weights[name].detach(), atol=1e-6), prefix


@pytest.mark.parametrize("name", ["adamw", "adafactor", "muon"])
def test_optimizers_train(tmp_path, clip_dir, vae_dir, image_folder, name):
    final = _run(tmp_path, clip_dir, vae_dir, image_folder, [f"train.optim.name={name}", "train.num_steps=3"])
    assert (final / "unet").is_dir()
    losses = [r["loss"] for r in _log(tmp_path / "run")]
    assert all(np.isfinite(losses))


def test_muon_skip_leaves_the_named_modules_to_adamw_and_refuses_names_it_cannot_find():
    unet = _tiny_unet()
    named = {id(p): n for n, p in unet.named_parameters()}

    def hidden(optimizer):
        return {named[id(p)] for g in optimizer.param_groups if g.get("muon") for p in g["params"]}

    every = hidden(make_optimizer(unet, OptimConfig(name="muon")))
    fewer = hidden(make_optimizer(unet, OptimConfig(name="muon", muon_skip=["attn2"])))
    assert {n for n in every if ".attn2." in n} == every - fewer and every - fewer  # its 16 projections
    assert any(".attn1." in n for n in fewer)
    with pytest.raises(ConfigError, match=r"module named \['attn3'\]"):
        make_optimizer(unet, OptimConfig(name="muon", muon_skip=["attn2", "attn3"]))
    with pytest.raises(ConfigError, match="conv_in"):  # a matrix AdamW steps anyway
        make_optimizer(unet, OptimConfig(name="muon", muon_skip=["conv_in"]))
    with pytest.raises(ConfigError, match="set train.optim.name=muon"):
        OptimConfig(name="adamw", muon_skip=["attn2"])


def test_muon_lr_sets_the_rate_of_muons_matrices_and_leaves_adamws_at_lr():
    unet = _tiny_unet()
    optimizer = make_optimizer(unet, OptimConfig(name="muon", lr=1e-3, muon_lr=3e-3, muon_skip=["attn2"]))
    set_lr(optimizer, 5e-4)  # the schedule's value of lr at some step: Muon's matrices follow it at 3 times
    rates = sorted((bool(g.get("muon")), g["lr"]) for g in optimizer.param_groups)
    assert rates == [(False, 5e-4), (False, 5e-4), (True, pytest.approx(1.5e-3))]
    plain = make_optimizer(unet, OptimConfig(name="muon", lr=1e-3, muon_skip=["attn2"]))
    assert [len(g["params"]) for g in plain.param_groups] == [len(g["params"]) for g in optimizer.param_groups]
    for bad in ({"name": "adamw", "muon_lr": 1e-3}, {"name": "muon", "muon_lr": 0.0}):
        with pytest.raises(ConfigError, match="train.optim.muon_lr"):
            OptimConfig(**bad)


def test_muon_orthogonalises_hidden_matrices_and_steps_the_rest_as_adamw():
    """Muon's groups: the matrices and kernels of the UNet's blocks (not conv_in / conv_out, the timestep embedding,
    norms, biases); their
    update is the momentum made semi-orthogonal, at AdamW's RMS; every other parameter steps exactly as torch's
    AdamW; the state round-trips through state_dict to the same next step."""
    from sdtrain.train.optim import Muon, orthogonalise

    torch.manual_seed(0)
    kernel = torch.randn(32, 16, 3, 3)
    singular = torch.linalg.svdvals(orthogonalise(kernel.reshape(32, -1)))
    assert 0.6 < singular.min() and singular.max() < 1.25  # Newton-Schulz's band around 1, not the raw spread
    assert torch.linalg.svdvals(kernel.reshape(32, -1)).max() > 10
    x = kernel.reshape(32, -1) / kernel.norm()  # the iteration as Muon's authors write it, on the wide matrix
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    torch.testing.assert_close(orthogonalise(kernel.reshape(32, -1)), x, rtol=0, atol=2e-6)
    left, right = torch.linalg.qr(torch.randn(24, 24))[0], torch.linalg.qr(torch.randn(24, 24))[0]
    square = left @ torch.diag(torch.linspace(0.1, 3.0, 24)) @ right  # iterated on itself, not on its Gram matrix
    singular = torch.linalg.svdvals(orthogonalise(square))
    assert 0.6 < singular.min() and singular.max() < 1.25

    unet = _tiny_unet()
    optimizer = make_optimizer(unet, OptimConfig(name="muon", lr=1e-3, weight_decay=0.1))
    named = {id(p): n for n, p in unet.named_parameters()}
    hidden = {named[id(p)] for g in optimizer.param_groups if g.get("muon") for p in g["params"]}
    matrices = {n for n, p in unet.named_parameters() if p.ndim >= 2}
    assert matrices - hidden == {
        "conv_in.weight",
        "conv_out.weight",
        *(f"time_embedding.linear_{i}.weight" for i in (1, 2)),
    }
    assert all(name.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for name in hidden)
    assert all(p.ndim >= 2 for g in optimizer.param_groups for p in g["params"] if g.get("muon"))

    # the last layer has no gradient on odd steps: it keeps its own step count, as in torch's AdamW
    small = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(small)
    mine = Muon([{"params": list(small.parameters()), "weight_decay": 0.01}], lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                momentum=0.95)  # fmt: skip
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    for i in range(5):
        x = torch.randn(4, 8)
        for model, opt in ((small, mine), (reference, theirs)):
            opt.zero_grad()
            (model if i % 2 == 0 else model[:2])(x).pow(2).mean().backward()
            opt.step()
    assert mine.state[small[2].weight]["step"] == 3 and mine.state[small[0].weight]["step"] == 5
    for a, b in zip(small.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    def step(model, opt, seed):
        torch.manual_seed(seed)
        opt.zero_grad()
        out = model(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 8, 32)).sample
        out.pow(2).mean().backward()
        opt.step()

    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    for seed in range(3):
        step(unet, optimizer, seed)
    weight = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    moved = (dict(unet.named_parameters())[weight] - before[weight]).pow(2).mean().sqrt()
    assert 2e-4 < moved < 6e-4  # AdamW's RMS per step, lr x 0.2, over three steps (1.7 to 3 steps' worth)
    twin = copy.deepcopy(unet)
    restored = make_optimizer(twin, OptimConfig(name="muon", lr=1e-3, weight_decay=0.1))
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    step(unet, optimizer, 9)
    step(twin, restored, 9)
    for a, b in zip(unet.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        make_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="adamw8bit"))


def _tiny_unet(attention=(False, True)):
    torch.manual_seed(0)
    config = UNetConfig(
        block_out_channels=[16, 32], attention=list(attention), norm_num_groups=8, attention_head_dim=8
    )
    return build_unet(config, 4, 16, 32)


def test_gradient_checkpointing_and_channels_last_give_the_same_gradients():
    x, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 32)
    t = torch.tensor([10, 900])

    def grads(unet):
        unet.train()
        unet(x, t, cond).sample.square().mean().backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters()])

    plain = grads(_tiny_unet())
    checkpointed = _tiny_unet()
    checkpointed.enable_gradient_checkpointing()
    assert torch.allclose(grads(checkpointed), plain, atol=1e-6)
    channels_last = _tiny_unet().to(memory_format=torch.channels_last)
    assert torch.allclose(grads(channels_last), plain, atol=1e-5)


def test_ema_follows_diffusers_warmup_formula_and_diffusers_ema():
    """decay_k = min(ema_decay, 1 - (1 + k) ** (-2/3)), as the training loop configures its EMA; our one-pass update
    gives what diffusers' EMAModel gives."""
    from diffusers.training_utils import EMAModel

    from sdtrain.train.ema import EMA

    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], 0.99)
    shadow = 0.0
    for k in range(1, 6):
        p.data.fill_(float(k))
        ema.step([p])
        decay = min(0.99, 1 - (1 + k - 1) ** (-2 / 3)) if k > 1 else 0.0
        shadow = decay * shadow + (1 - decay) * k
        assert ema.shadow_params[0].item() == pytest.approx(shadow, rel=1e-5)
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    ours = EMA(weights, 0.9)
    theirs = EMAModel(weights, decay=0.9, use_ema_warmup=True, power=2 / 3, foreach=True)
    for _ in range(6):
        for w in weights:
            w.data.add_(torch.randn_like(w))
        ours.step(weights)
        theirs.step(weights)
    for a, b, w in zip(ours.shadow_params, theirs.shadow_params, weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not torch.equal(a, w)


def _bench_script(name: str):
    """A script of bench/ (not a package) imported as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("power", [2 / 3, 0.75])
def test_posthoc_ema_shares_rebuild_the_training_ema(power):
    """bench/posthoc_ema.py's shares of each step's weights, with a snapshot at every step, give the EMA the training
    loop keeps (the same warm-up power and cap); snapshots every 10 steps give it where the weights move linearly."""
    from sdtrain.train.ema import EMA

    bench = _bench_script("posthoc_ema")
    torch.manual_seed(0)
    weights = torch.randn(201, dtype=torch.float64).cumsum(0)  # after step k (0: the initial weights)
    p = torch.nn.Parameter(weights[:1].clone())
    ema = EMA([p], 0.98)
    ema.power = power
    for k in range(1, 201):
        p.data.copy_(weights[k : k + 1])
        ema.step([p])
    share = bench.shares(list(range(201)), power, 0.98)
    rebuilt = sum(share[k] * weights[k] for k in range(201))
    assert rebuilt.item() == pytest.approx(ema.shadow_params[0].item(), rel=1e-9, abs=1e-9)
    # snapshots every 10 steps: exact where the weights move linearly between them, which the interpolation assumes
    coarse = bench.shares(list(range(0, 201, 10)), power, 0.98)
    assert sum(coarse.values()) == pytest.approx(1.0) and min(coarse.values()) >= 0
    line = 0.5 + 0.01 * torch.arange(201, dtype=torch.float64)
    exact = sum(share[k] * line[k] for k in range(201))
    assert sum(coarse[s] * line[s] for s in coarse).item() == pytest.approx(exact.item(), rel=1e-9)


def test_demo_recipe_train_seeds_run_each_seed_in_its_folder_and_average(monkeypatch, capsys):
    """bench/demo_recipe.py --train-seeds: one run per training seed, in NAME-seedN with train.seed=N after the
    recipe's overrides, and the seeds' scores with their mean on the last line."""
    import json
    import sys

    bench = _bench_script("demo_recipe")
    runs = []

    def run(args, name, recipe):
        runs.append((name, recipe))
        seed = int(recipe[-1].removeprefix("train.seed="))
        return {"name": name, "seen": {"all": 0.8 + 0.05 * seed}, "held_out": {"all": 1.0 - 0.1 * seed}}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(sys, "argv", ["demo_recipe.py", "--name", "r", "--train-seeds", "0,2", "train.optim.lr=1e-3"])
    bench.main()
    assert runs == [
        ("r-seed0", ["train.optim.lr=1e-3", "train.seed=0"]),
        ("r-seed2", ["train.optim.lr=1e-3", "train.seed=2"]),
    ]
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["seen"] == [0.8, 0.9] and last["seen_mean"] == pytest.approx(0.85)
    assert (last["held_out_min"], last["held_out_max"], last["train_seeds"]) == (0.8, 1.0, [0, 2])


class _Weights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def test_ema_every_n_steps_multiplies_the_decays_and_its_pending_steps_survive_a_checkpoint():
    """Averaged every 3 steps, the EMA equals the per-step one when the weights change only every 3 steps; its steps
    not averaged yet are saved and loaded with its state; with every > the steps taken, catching up copies the
    weights (the first step's decay is 0)."""
    from sdtrain.train.ema import EMA

    model, reference = _Weights(), _Weights()
    every3, every1 = EMA([model.w], 0.95, every=3), EMA([reference.w], 0.95)
    for k in range(1, 10):
        for m in (model, reference):
            m.w.data.fill_(float((k - 1) // 3 * 3 + 3))  # 3, 3, 3, 6, 6, 6, 9, 9, 9
        every3.tick(model)
        every1.tick(reference)
        if k % 3 == 0:
            torch.testing.assert_close(every3.shadow_params[0], every1.shadow_params[0], rtol=1e-6, atol=0)
            assert every3.optimization_step == every1.optimization_step == k and every3.pending == 0
        else:
            assert every3.pending == k % 3
    # a checkpoint taken with steps pending: the resumed EMA averages as the uninterrupted one does
    model.w.data.fill_(10.0)
    every3.tick(model)
    state = {k: v for k, v in every3.state_dict().items() if k != "shadow_params"}
    assert state["pending"] == 1
    resumed = EMA([torch.zeros(3)], 0.95, every=3)
    resumed.load_state_dict({**state, "shadow_params": [every3.shadow_params[0].clone()]})
    for ema in (every3, resumed):
        ema.tick(model)
        ema.catch_up(model)  # what samples, validation and export do before reading it
    assert torch.equal(every3.shadow_params[0], resumed.shadow_params[0]) and every3.optimization_step == 11
    assert every3.shadow_params[0][0].item() != 10.0  # it moved towards the weights, not onto them
    fresh = EMA([torch.full((3,), -1.0)], 0.95, every=100)
    for _ in range(4):
        fresh.tick(model)
    assert fresh.pending == 4 and fresh.shadow_params[0][0].item() == -1.0
    fresh.catch_up(model)
    assert torch.equal(fresh.shadow_params[0], model.w.data)


def test_ema_every_resumes_exactly_and_a_checkpoints_export_catches_up(tmp_path, clip_dir, vae_dir, image_folder):
    """train.ema_every=3 with checkpoints at steps 2 and 4 (2 and 1 steps pending): stopped at 2 and resumed, the run
    exports the uninterrupted run's weights; ``sdtrain export`` of the step-2 checkpoint gives what the run exported
    when it ended at step 2."""
    from safetensors.torch import load_file

    from sdtrain.train.export import export_checkpoint

    unet = lambda run: load_file(run / "unet" / "diffusion_pytorch_model.safetensors")  # noqa: E731
    extra = ["train.ema_every=3", "train.num_steps=5", "train.ema_decay=0.9", "train.keep_checkpoints=3"]
    straight = unet(_run(tmp_path, clip_dir, vae_dir, image_folder, extra, "a"))
    ended_at_2 = unet(_run(tmp_path, clip_dir, vae_dir, image_folder, extra + ["train.num_steps=2"], "b"))
    resumed = unet(_run(tmp_path, clip_dir, vae_dir, image_folder, extra, "b"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    step_2 = tmp_path / "b" / "checkpoints" / "step-00000002"
    assert json.loads((step_2 / "state.json").read_text())["ema"]["pending"] == 2
    exported = unet(export_checkpoint(tmp_path / "b", 2, tmp_path / "e"))
    raw = load_file(step_2 / "ema.safetensors")
    assert all(torch.equal(exported[k], ended_at_2[k]) for k in exported)
    assert not torch.equal(exported["conv_in.weight"], raw["conv_in.weight"])  # the pending steps were averaged in


def test_ema_offload_keeps_the_same_result(tmp_path, clip_dir, vae_dir, image_folder):
    from safetensors.torch import load_file

    a = _run(tmp_path, clip_dir, vae_dir, image_folder, [], "a")
    b = _run(tmp_path, clip_dir, vae_dir, image_folder, ["train.ema_offload=true"], "b")
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compiled_run_writes_the_plain_unets_checkpoints_and_export(tmp_path, clip_dir, vae_dir, image_folder):
    """torch.compile wraps the UNet in a module whose state-dict keys carry an ``_orig_mod.`` prefix: checkpoints and
    the export must hold the UNet's own keys, so that an uncompiled run resumes them and diffusers loads the export."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from sdtrain.train.export import export_checkpoint

    extra = ["train.compile=true", "train.num_steps=2", "train.save_every=2", "train.sample_prompts=[a red circle]"]
    final = _run(tmp_path, clip_dir, vae_dir, image_folder, extra)
    for name in ("unet", "ema"):
        keys = load_file(tmp_path / "run" / "checkpoints" / "step-00000002" / f"{name}.safetensors").keys()
        assert not [k for k in keys if "_orig_mod" in k] and "conv_in.weight" in keys
    UNet2DConditionModel.from_pretrained(final / "unet")  # strict: every key the UNet's own
    export_checkpoint(tmp_path / "run")  # a plain UNet loads the checkpoint
    assert (tmp_path / "run" / "samples" / "step-000002.png").exists()


def test_flop_count_scales_with_resolution_and_memory_estimate_reacts_to_settings():
    unet = _tiny_unet(attention=(False, False))  # no attention: FLOPs exactly proportional to the pixel count
    cond = {"encoder_hidden_states": torch.randn(1, 8, 32)}
    small = profile_denoiser(unet, FAMILY.predict, (4, 16, 16), cond, torch.device("cpu"))
    large = profile_denoiser(unet, FAMILY.predict, (4, 32, 32), cond, torch.device("cpu"))
    assert small.forward_flops > 0 and large.forward_flops == pytest.approx(4 * small.forward_flops, rel=0.02)
    assert small.train_flops == 3 * small.forward_flops
    assert 0 < small.checkpointed_bytes < small.activation_bytes

    params = sum(p.numel() for p in unet.parameters())
    base = estimate_memory(unet, [], large, 8, TrainConfig())
    assert base.weights == base.gradients == 4 * params and base.optimizer == 8 * params and base.ema == 4 * params
    lean = TrainConfig(gradient_checkpointing=True, mixed_precision="bf16", ema_offload=True)
    lean.optim.name = "adamw8bit"
    small_est = estimate_memory(unet, [], large, 8, lean)
    assert small_est.optimizer == base.optimizer / 4 and small_est.ema == 0
    assert small_est.activations < base.activations / 2
    tips = advice(base, base.total / 2, TrainConfig(), 8)
    assert any("gradient_checkpointing" in t for t in tips) and any("adamw8bit" in t for t in tips)
    assert any("gradient_accumulation=2" in t for t in tips)
    lora = TrainConfig(lora=LoRAConfig(rank=4))
    assert not any("lora" in t for t in advice(base, base.total / 2, lora, 8))
    # FSDP2 over 4 processes: each holds a quarter of the weights, gradients, optimizer and EMA; DDP over 4 is told so
    sharded = estimate_memory(unet, [], large, 8, TrainConfig(), shards=4)
    assert (sharded.weights, sharded.optimizer, sharded.ema) == (base.weights / 4, base.optimizer / 4, base.ema / 4)
    assert sharded.activations == base.activations
    assert "--use_fsdp" in advice(base, base.total / 2, TrainConfig(), 8, processes=4)[0]
    assert not any("fsdp" in t for t in advice(sharded, sharded.total / 2, TrainConfig(), 8, processes=4, shards=4))
    assert not any("fsdp" in t for t in tips)  # one process: nothing to shard over


def test_preflight_is_logged(tmp_path, clip_dir, vae_dir, image_folder, caplog):
    import logging

    caplog.set_level(logging.INFO)
    _run(tmp_path, clip_dir, vae_dir, image_folder, ["train.num_steps=1"])
    assert "GFLOPs per image per training step" in caplog.text
    assert "memory estimate per device (GiB): weights" in caplog.text

"""Memory (issue 27): the frozen parts of a LoRA run held in the compute dtype or quantised (fp8, int8 through
torchao; nf4 through bitsandbytes), each mode on the CPU: the adapters train on it, checkpoints hold the adapters
alone, the export merges them into the folder's full-precision base (never a dequantised copy) and the LoRA file in
the plain full-precision pipeline draws what the export draws; what cannot run is refused before any work."""

from __future__ import annotations

import gc
import json
import weakref
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from sdtrain.config import Config, ConfigError, load_config
from sdtrain.models.lora import add_lora
from sdtrain.models.quantize import hold_in, quantize, stored_bytes
from sdtrain.train import checkpoint
from sdtrain.train.export import export_checkpoint
from sdtrain.train.loop import train
from sdtrain.train.preflight import check_run
from tests.conftest import pipeline_overrides, save_pipeline, write_image_folder

LORA = ["train.lora.rank=4", "train.optim.lr=1e-2", "train.ema_decay=null"]


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir, vae_dir):
    """A tiny Stable Diffusion folder whose UNet has linear layers of 64 and more features (blocks of 64 for nf4)."""
    return save_pipeline(tmp_path_factory.mktemp("sd-base"), _unet(), clip_dir, vae_dir)


def _plain(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe) -> np.ndarray:
    out = pipe(["a red square", "a blue circle"], num_inference_steps=3, height=32, width=32, output_type="np",
               generator=[torch.Generator().manual_seed(i) for i in range(2)])  # fmt: skip
    return out.images


def _values(tensor: torch.Tensor) -> torch.Tensor:
    """What a weight computes with: a torchao tensor dequantised (bitsandbytes' packed bytes are plain tensors)."""
    return tensor.detach().dequantize() if hasattr(tensor, "qdata") else tensor.detach()


@pytest.mark.parametrize("mode", ["fp8", "int8", "nf4"])
def test_adapters_train_on_a_quantised_base(mode):
    """Twenty Adam steps on one batch (fixed noise and timesteps) lower the loss of fp32 adapters on a base whose
    linear layers are held quantised; the base does not move and takes a quarter or less of its fp32 bytes in its
    linear layers."""
    from sdtrain.config import LoRAConfig

    model, full = _unet(), _unet()
    before = stored_bytes(model)
    linear = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    layers = quantize(model, mode, torch.float32, "cpu")
    saved = {"fp8": 0.7, "int8": 0.7, "nf4": 0.8}[mode]  # of the linear weights' bytes (beside their scales)
    assert layers > 0 and before - stored_bytes(model) > saved * linear
    add_lora(model, LoRAConfig(rank=4), ("to_q", "to_k", "to_v", "to_out.0"))
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen = {n: _values(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    cond, t = torch.randn(4, 6, 32, generator=generator), torch.tensor([100, 300, 600, 900])
    with torch.no_grad():
        reference = full(x, t, cond).sample
        quantised = model(x, t, cond).sample
    assert (quantised - reference).abs().mean() < 0.1 * reference.abs().mean()  # the same model, coarser
    optimizer = torch.optim.Adam(trained, lr=3e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x, t, cond).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(_values(p), frozen[n]), n


@pytest.mark.parametrize("mode", ["none", "fp8", "int8", "nf4"])
def test_a_quantised_lora_exports_into_the_full_precision_base(tmp_path, sd_dir, mode):
    """A bf16 LoRA run on the folder's base held in ``mode``: its checkpoints hold the adapters alone, its export's
    UNet is the folder's fp32 UNet with the LoRA file fused in by plain diffusers (bit for bit: never a dequantised
    copy), and that LoRA file in the plain fp32 pipeline draws the export's pixels."""
    data = write_image_folder(tmp_path / "data", count=4, size=32)
    overrides = pipeline_overrides(tmp_path / "run", data, sd_dir) + LORA
    overrides += ["train.mixed_precision=bf16", f"model.quantize={mode}", "train.num_steps=3", "train.save_every=3",
                  "train.sample_prompts=['a red square']", "train.sample_every=2"]  # fmt: skip
    final = train(load_config(Config, None, overrides))
    tensors, _, _ = checkpoint.load_checkpoint(checkpoint.find_latest(tmp_path / "run" / "checkpoints"))
    assert tensors["unet"] and all(".lora_" in k for k in tensors["unet"])  # the adapters alone
    plain = _plain(sd_dir)
    plain.scheduler = EulerDiscreteScheduler.from_pretrained(final / "scheduler")  # the export's sampler
    plain.load_lora_weights(final / "lora")
    drawn_with_lora = _draw(plain)
    plain.fuse_lora()
    plain.unload_lora_weights()
    exported = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    fused = plain.unet.state_dict()
    assert exported.keys() == fused.keys() and all(exported[k].dtype == torch.float32 for k in exported)
    assert all(torch.equal(exported[k], fused[k]) for k in exported)
    base = load_file(sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], exported[k]) for k in base)  # the adapters trained
    assert np.abs(_draw(_plain(final)) - drawn_with_lora).max() < 1e-4
    again = export_checkpoint(tmp_path / "run", out_dir=tmp_path / "again")  # `sdtrain export` of the checkpoint
    assert all(
        torch.equal(v, exported[k])
        for k, v in load_file(again / "unet" / "diffusion_pytorch_model.safetensors").items()
    )
    te_files = [load_file(f / "text_encoder" / "model.safetensors") for f in (sd_dir, final)]
    assert all(torch.equal(te_files[0][k], te_files[1][k]) for k in te_files[0])  # fp32, not the bf16 copy


def test_frozen_parts_are_held_in_the_compute_dtype(tmp_path, sd_dir):
    """Under bf16 the text encoder, the autoencoder and the LoRA base are held in bf16 (norms in fp32); the adapters
    fp32; a dtype set in the config is kept."""
    from sdtrain.models.families import for_config
    from sdtrain.train import placement

    config = load_config(Config, None, pipeline_overrides(tmp_path, tmp_path, sd_dir) + LORA +
                         ["train.mixed_precision=bf16"])  # fmt: skip
    family = for_config(config.model)
    components = family.load(config)
    placed = placement.prepare(family, components, config, torch.device("cpu"), sharded=False)
    assert placed.base_reloads and set(placed.altered) == {"vae", "text_encoder"}
    add_lora(components.unet, config.train.lora, family.lora_targets)
    frozen = [(n, p) for n, p in components.unet.named_parameters() if not p.requires_grad]
    assert {p.dtype for n, p in frozen if "norm" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in frozen if "norm" in n} == {torch.float32}  # a few numbers each
    assert {p.dtype for p in components.unet.parameters() if p.requires_grad} == {torch.float32}
    assert components.vae.dtype == components.text_encoder.dtype == torch.bfloat16
    config.model.vae.dtype = "float32"  # an explicit dtype is kept
    components = family.load(config)
    placed = placement.prepare(family, components, config, torch.device("cpu"), sharded=False)
    assert components.vae.dtype == torch.float32 and placed.altered == ("text_encoder",)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.quantize=int8"], "a quantised model does not train: set train.lora.rank"),
        (["model.quantize=nf4", "train.lora.rank=4", "model.unet.from_scratch=true"], "needs the base loaded"),
        (["model.text_encoder.quantize=int8", "train.text_encoder.mode=lora", "train.text_encoder.rank=4"],
         "a trained text encoder is not quantised"),
        (["model.quantize=int4"], "model.quantize"),
        (["model.quantize=nf4", "train.lora.rank=4", "train.lora.variant=loha"], "use model.quantize=int8"),
        (["train.lora.rank=4", "train.lora.variant=lokr", "train.text_encoder.mode=lora", "train.text_encoder.rank=4"],
         "the text encoders' adapters are LoRA"),
        (["train.lora.rank=4", "train.lora.variant=loha", "train.lora.dropout=0.1"], "LoRA's input dropout"),
        (["train.lora.rank=4", "train.lora.variant=lycoris"], "expected one of 'lora', 'dora', 'loha', 'lokr'"),
    ],
)  # fmt: skip
def test_what_cannot_run_is_refused_before_any_work(tmp_path, sd_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config = load_config(Config, None, pipeline_overrides(tmp_path / "run", tmp_path, sd_dir) + overrides)
        check_run(config, data=False)
    assert not (tmp_path / "run").exists()


def test_a_missing_library_names_the_package(tmp_path, sd_dir, monkeypatch):
    import builtins

    from sdtrain.errors import MissingPackage

    real = builtins.__import__

    def without_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_bitsandbytes)
    config = load_config(Config, None, pipeline_overrides(tmp_path, tmp_path, sd_dir) + LORA + ["model.quantize=nf4"])
    with pytest.raises(
        MissingPackage, match=r"model.quantize=nf4 needs bitsandbytes: pip install 'sdtrain\[quantize\]'"
    ):
        check_run(config, data=False)


@pytest.mark.slow
def test_a_quantised_run_resumes_bit_exact_after_sigkill(tmp_path, sd_dir, mode="nf4"):
    """SIGKILL at a micro-batch and inside a checkpoint save, then the same command: the losses and the LoRA file
    equal an uninterrupted run's bit for bit (the base is quantised again, identically, from the folder)."""
    from tests.test_faults import KILLED, _losses, _train

    data = write_image_folder(tmp_path / "data", count=5, size=32)
    extra = LORA + ["train.mixed_precision=bf16", f"model.quantize={mode}", "train.gradient_accumulation=2",
                    "train.num_steps=6", "train.save_every=3"]  # fmt: skip
    assert _train(pipeline_overrides(tmp_path / "a", data, sd_dir) + extra).returncode == 0
    overrides = pipeline_overrides(tmp_path / "b", data, sd_dir) + extra
    for fault in ("kill_micro=3", "kill_save=1:manifest", "kill_micro=5"):
        assert _train(overrides, fault).returncode == KILLED, fault
    done = _train(overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    a, b = (load_file(tmp_path / r / "final" / "lora" / "pytorch_lora_weights.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flux_lora_with_quantised_t5_and_cached_prompts(tmp_path, flux_dir):
    """Flux with the base in int8, T5 in nf4 and the latents cached (the encoders parked after encoding): the
    adapters train, the export writes the folder's own full-precision T5 and transformer + adapters, and the LoRA
    file in plain FluxPipeline draws the export's pixels."""
    from diffusers import FluxPipeline

    from sdtrain.models.families import for_config
    from sdtrain.train import placement

    data = write_image_folder(tmp_path / "data", count=4, size=32)
    overrides = pipeline_overrides(tmp_path / "run", data, flux_dir) + LORA + [
        "model.text_encoder_2.max_length=32", "model.quantize=int8", "model.text_encoder_2.quantize=nf4",
        "data.cache_latents=true", "train.mixed_precision=bf16", "train.num_steps=3",
    ]  # fmt: skip
    config = load_config(Config, None, overrides)
    family = for_config(config.model)
    assert placement.to_park(family, family.load(config), config) == ("text_encoder", "text_encoder_2", "vae.encoder")
    final = train(config)
    t5 = [load_file(f / "text_encoder_2" / "model.safetensors") for f in (flux_dir, final)]
    assert t5[0].keys() == t5[1].keys() and all(torch.equal(t5[0][k], t5[1][k]) for k in t5[0])
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=32)
    plain = FluxPipeline.from_pretrained(flux_dir)
    plain.scheduler = type(plain.scheduler).from_pretrained(final / "scheduler")
    plain.load_lora_weights(final / "lora")
    with_lora = plain("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    exported = FluxPipeline.from_pretrained(final)
    again = exported("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(with_lora - again).max() < 1e-4


def test_a_preset_refuses_a_card_too_small_before_loading_anything(tmp_path, monkeypatch):
    """flux-lora-24gb on a 16 GiB card is refused by the pre-flight check, naming the card and the ways out; on a
    24 GiB card it passes that check (the model source is checked next)."""
    from types import SimpleNamespace

    from sdtrain.train.preflight import check_device_memory

    card = SimpleNamespace(name="NVIDIA RTX A4000", total_memory=16 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: card)
    config = load_config(Config, "flux-lora-24gb", [f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"needs about 16.3 GiB .* NVIDIA RTX A4000 has 16.0 GiB.*-12gb"):
        check_run(config, data=False)
    assert not (tmp_path / "run").exists()
    card.total_memory = 24 * 2**30
    check_device_memory(config.train.needs_gib)


def _where(tensor: torch.Tensor) -> int:
    """The address of a tensor's values (a torchao tensor's: its quantised data's)."""
    return tensor.qdata.data_ptr() if hasattr(tensor, "qdata") else tensor.data_ptr()


def _mmdit():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=8,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["fp8", "int8", "nf4"])
def test_a_quantised_layer_computes_in_the_compute_dtype(mode):
    """Under bf16 autocast a quantised layer given an fp32 input (a norm's output) returns bf16, as a plain linear
    layer does: autocast does not reach torchao's or bitsandbytes' layers, and an fp32 output made an fp32 residual
    stream (on an H200, 2 GiB more for FLUX.1)."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 64))
    quantize(layers, mode, torch.bfloat16, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers(torch.randn(2, 64))
    assert out.dtype == torch.bfloat16


def test_nf4_layers_run_alike_in_sampling_and_training():
    """An nf4 layer gives the same output in eval mode without gradients (sampling) as in training, before and after,
    and passes gradients to its input after it: on CPUs with AVX512-BF16 bitsandbytes repacked its weight in place
    for another kernel the first time it sampled: it failed on a layer narrower than its 64-wide block, gave other
    values, and training after it failed (CI on an AMX Xeon)."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    quantize(layers, "nf4", torch.float32, "cpu")
    x = torch.randn(3, 32)
    trained = layers(x.clone().requires_grad_())
    with torch.no_grad():
        sampled = layers.eval()(x)
    layers.train()
    again = layers(x.clone().requires_grad_())
    again.sum().backward()
    assert torch.equal(sampled, trained.detach()) and torch.equal(again, trained)
    states = [m.weight.quant_state for m in layers if hasattr(m, "weight")]
    assert states and not any(getattr(state, "packing_format_for_cpu", False) for state in states)


@pytest.mark.parametrize("mode", ["none", "int8", "nf4"])
def test_block_swap_is_exact_and_keeps_blocks_off_the_device(mode):
    """Three LoRA steps of a checkpointed MMDiT whose last 3 of 4 blocks are swapped equal, bit for bit, the same
    steps without swapping (losses and adapters), over a bf16 or quantised base; a swapped block's modules hold
    device copies while it runs (forward, and its recomputation in the backward pass) and their CPU copies otherwise,
    and at most two swapped blocks visit at once."""
    from sdtrain.config import LoRAConfig
    from sdtrain.models.families.sd3 import predict
    from sdtrain.train.block_swap import swap_blocks

    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def model():
        m = _mmdit()
        if mode == "none":
            hold_in(m.requires_grad_(False), torch.bfloat16)
        else:
            quantize(m, mode, torch.bfloat16, "cpu")
        add_lora(m, LoRAConfig(rank=4, target_modules=list(targets)))
        m.enable_gradient_checkpointing()
        return m.train()

    def train_steps(m):
        generator, losses = torch.Generator().manual_seed(1), []
        optimizer = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
                "pooled_projections": torch.randn(2, 16, generator=generator)}  # fmt: skip
        for _ in range(3):
            x, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(predict(m, x, torch.tensor([200.0, 800.0]), cond).float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    plain, swapped = model(), model()
    swap = swap_blocks(swapped, 3, torch.device("cpu"), checkpointing=True)
    seen = {"home": 0, "runs": 0, "at_most": 0}

    def running(index, module, args):  # registered after the swapper's pre-hook: what the block runs with
        seen["home"] += sum(slots[name] is home for slots, name, home in swap.homes[index])
        seen["runs"] += 1
        seen["at_most"] = max(seen["at_most"], len(swap.resident))

    for index, block in enumerate(swap.blocks):
        block.register_forward_pre_hook(partial(running, index))
    (losses_a, adapters_a), (losses_b, adapters_b) = train_steps(plain), train_steps(swapped)
    assert losses_a == losses_b
    assert adapters_a.keys() == adapters_b.keys() and all(
        torch.equal(adapters_a[k], adapters_b[k]) for k in adapters_a
    )
    assert seen["runs"] == 3 * 3 * 2 and seen["home"] == 0  # forward and recomputation, on device copies
    assert seen["at_most"] == 2
    # a block that ran forward and was dropped leaves nothing behind for the backward pass (its copies are freed:
    # bitsandbytes keeps its weight on the autograd context, out of reach of non-reentrant checkpointing)
    copies: dict[int, list] = {}

    def forward_copies(index, module, args):
        if torch._C._current_graph_task_id() == -1:
            copies[index] = [weakref.ref(slots[name]) for slots, name, _ in swap.homes[index]]

    hooks = [block.register_forward_pre_hook(partial(forward_copies, i)) for i, block in enumerate(swap.blocks)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "pooled_projections": torch.randn(2, 16)}
        loss = predict(swapped, torch.randn(2, 4, 8, 8), torch.tensor([200.0, 800.0]), cond).float().square().mean()
    gc.collect()
    alive = [index for index, refs in copies.items() if any(ref() is not None for ref in refs)]
    assert alive == [2]  # the last block, still resident; the two before it freed
    loss.backward()
    for hook in hooks:
        hook.remove()
    swap.settle()
    assert all(slots[name] is home for homes in swap.homes for slots, name, home in homes)
    assert all(p.device.type == "cpu" for p in swapped.parameters())  # (on a CPU, both copies are)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.offload.blocks=1"], "set train.lora.rank"),
        (["train.offload.blocks=1", "train.lora.rank=4", "train.ema_decay=0.99"], "set train.ema_decay=null"),
    ],
)
def test_block_swap_is_refused_where_it_cannot_run(tmp_path, sd_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Config, None, pipeline_overrides(tmp_path, tmp_path, sd_dir) + overrides)


def test_block_swap_refuses_a_unet_too_many_blocks_and_no_checkpointing():
    from sdtrain.train.block_swap import swap_blocks

    with pytest.raises(ConfigError, match="block swap is for transformer families"):
        swap_blocks(_unet(), 1, "cpu", checkpointing=True)
    with pytest.raises(ConfigError, match="has 4 blocks; swap at most 3"):
        swap_blocks(_mmdit(), 4, "cpu", checkpointing=True)
    with pytest.raises(ConfigError, match="needs train.gradient_checkpointing=true"):
        swap_blocks(_mmdit(), 2, "cpu", checkpointing=False)


def test_a_flux_run_with_block_swap_equals_the_run_without(tmp_path, flux_dir):
    """`train.offload.blocks=1` on a Flux folder (nf4 base, checkpointing, samples drawn mid-run): the losses and the
    LoRA file equal the run without block swap bit for bit; the samples are the same pixels."""
    from PIL import Image

    data = write_image_folder(tmp_path / "data", count=4, size=32)
    extra = LORA + ["model.text_encoder_2.max_length=32", "model.quantize=nf4", "train.mixed_precision=bf16",
                    "train.gradient_checkpointing=true", "train.num_steps=3", "train.sample_every=2",
                    "train.sample_prompts=['a red square']", "sample.num_inference_steps=2"]  # fmt: skip
    runs = {}
    for name, swap in (("plain", []), ("swap", ["train.offload.blocks=1"])):
        train(load_config(Config, None, pipeline_overrides(tmp_path / name, data, flux_dir) + extra + swap))
        runs[name] = tmp_path / name
    logs = [(runs[n] / "log.jsonl").read_text() for n in runs]
    losses = [[json.loads(line)["loss"] for line in log.splitlines() if '"loss"' in line] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    a, b = (load_file(runs[n] / "final" / "lora" / "pytorch_lora_weights.safetensors") for n in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    samples = [np.asarray(Image.open(runs[n] / "samples" / "step-000002.png")) for n in runs]
    assert np.array_equal(*samples)

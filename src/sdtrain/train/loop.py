"""The UNet training loop: one linear function, top to bottom.

``train(config)`` is what ``sdtrain train`` runs; ``StableDiffusion.fit`` calls the same function with components and
batches it already has. Helpers are small functions of their own (components in ``sdtrain.models``, the math in
``sdtrain.train.objective``, batches in ``sdtrain.data.cache``, checkpoints in ``sdtrain.train.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import TorchDynamoPlugin, broadcast_object_list
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sdtrain.config import Config, SampleConfig, TrainConfig, save_config
from sdtrain.data.cache import (
    CachedStream,
    IterableStream,
    MixedStream,
    OnlineStream,
    ShardStream,
    build_memory_cache,
)
from sdtrain.data.disk_cache import DiskCache, DiskCacheStream, write_cache
from sdtrain.data.sources import is_shards
from sdtrain.models.lora import LORA_FOLDER, add_lora, has_lora, merged_copy, save_lora
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.unet import build_unet, load_unet
from sdtrain.models.vae import downsample_factor, load_vae
from sdtrain.sample.pipeline import sampling_scheduler, save_images, txt2img, write_sampling_defaults
from sdtrain.train import checkpoint, objective, sharding, zero
from sdtrain.train.ema import EMA, caught_up, ema_parameters
from sdtrain.train.optim import lr_factor, make_optimizer, set_lr
from sdtrain.train.perf import GiB, StepProfile, advice, estimate_memory, peak_tflops, profile_unet
from sdtrain.train.preemption import Preempted, StopSignal
from sdtrain.train.progress import Progress
from sdtrain.train.randomness import SharedDraws
from sdtrain.train.sharding import check_strategy, is_sharded
from sdtrain.train.state import (
    Counters,
    check_disk,
    check_frozen,
    describe_frozen,
    load_training_state,
    save_training_state,
    trainable,
    truncate_log,
    unwrap,
    whole_ema,
)
from sdtrain.train.tracking import check_trackers, log_images, plot_losses, read_log
from sdtrain.train.validation import ValidationSet, build_validation_set, validation_loss

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The three models and the tokenizer; only ``unet`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: UNet2DConditionModel


def _processes_on_cpu() -> bool:
    """Several processes on a machine without CUDA (`accelerate launch --multi_gpu` on CPUs): accelerate needs
    ``cpu=True`` to run them as DDP over gloo, else each process would train alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def load_encoders(config: Config) -> tuple[Any, Any, Any]:
    """The frozen ``(vae, text_encoder, tokenizer)`` the config names."""
    m = config.model
    te_path, te_sub = m.text_encoder.path, m.text_encoder.subfolder
    if m.pretrained and m.text_encoder.path == "minilm" and m.text_encoder.subfolder is None:
        te_path, te_sub = m.pretrained, "text_encoder"  # a pipeline's own encoder wins over the default
    text_encoder, tokenizer = load_text_encoder(
        te_path, te_sub, m.text_encoder.max_length, m.text_encoder.dtype, m.text_encoder.trust_remote_code
    )
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    return load_vae(vae_path, vae_sub, m.vae.dtype), text_encoder, tokenizer


def cache_dataset(config: Config) -> Path:
    """``sdtrain cache``: encode ``config.data`` into ``data.cache_dir`` (each process of an ``accelerate launch``
    its own share, no collective waits)."""
    from accelerate import PartialState

    if not config.data.cache_dir:
        raise ValueError("set data.cache_dir: where the cache is written")
    state = PartialState(cpu=_processes_on_cpu())
    vae, text_encoder, tokenizer = load_encoders(config)
    vae.to(state.device)
    text_encoder.to(state.device)
    return write_cache(
        config.data, vae, text_encoder, tokenizer, config.train.seed, state.process_index, state.num_processes
    )


def load_components(config: Config) -> Components:
    """Load the frozen text encoder and autoencoder, and build or load the UNet, as the config says."""
    m = config.model
    vae, text_encoder, tokenizer = load_encoders(config)
    if not m.unet.from_scratch and (m.unet.pretrained or m.pretrained):
        unet = load_unet(m.unet.pretrained or m.pretrained, m.unet.subfolder if m.unet.pretrained else "unet")
    else:
        sample_size = config.data.resolution // downsample_factor(vae)
        unet = build_unet(m.unet, vae.config.latent_channels, sample_size, hidden_size(text_encoder))
    if unet.config.cross_attention_dim != hidden_size(text_encoder):
        raise ValueError(
            f"the UNet's cross_attention_dim ({unet.config.cross_attention_dim}) differs from the text encoder's "
            f"hidden size ({hidden_size(text_encoder)})"
        )
    return Components(vae, text_encoder, tokenizer, unet)


def export_pipeline(
    components: Components, objective_config, out_dir: str | Path, sample: SampleConfig | None = None
) -> Path:
    """Save a plain diffusers StableDiffusionPipeline folder (no safety checker) with ``sample``'s sampler as its
    scheduler and its step count and guidance in ``sampling.json`` (generate's defaults for the model).

    A UNet with LoRA adapters is saved twice: merged into the pipeline's UNet (a standalone model), and as the
    adapters alone in ``out_dir/lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights`` on the base model.
    """
    if has_lora(components.unet):
        save_lora(components.unet, Path(out_dir) / LORA_FOLDER)
        components = dataclasses.replace(components, unet=merged_copy(components.unet))
    sample = sample or SampleConfig()
    pipe = assemble_pipeline(components, objective_config, sample.scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_sampling_defaults(out_dir, sample.num_inference_steps, sample.guidance_scale)
    return Path(out_dir)


def export_checkpoint(run_dir: str | Path, step: int | None = None, out_dir: str | Path | None = None) -> Path:
    """Export a training checkpoint of a run (EMA weights if it has them) as a diffusers pipeline folder.

    Args:
        run_dir: the run's ``output_dir`` (its ``config.yaml`` says how to build the components).
        step: which checkpoint; None: the newest valid one.
        out_dir: where to write; default ``run_dir/export/step-XXXXXXXX``.
    """
    from sdtrain.config import load_config

    run_dir = Path(run_dir)
    config = load_config(Config, run_dir / "config.yaml")
    root = run_dir / "checkpoints"
    path = checkpoint.step_dir(root, step) if step is not None else checkpoint.find_latest(root)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {root}")
    tensors, _, state = checkpoint.load_checkpoint(path)
    config.model.unet.from_scratch = True  # the weights come from the checkpoint, not from a pretrained UNet
    components = load_components(config)
    check_frozen(state.get("frozen"), describe_frozen(components.vae, components.text_encoder), path)
    if config.train.lora.rank:
        add_lora(components.unet, config.train.lora)
    weights = dict(tensors["unet"])
    if "ema" in tensors:
        weights.update(caught_up(tensors["ema"], tensors["unet"], state["ema"]))  # train.ema_every's pending steps
    components.unet.load_state_dict(weights)
    out = out_dir or run_dir / "export" / path.name
    return export_pipeline(components, config.train.objective, out, config.sample)


def assemble_pipeline(components: Components, objective_config, scheduler: str = "euler") -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=sampling_scheduler(objective_config, scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _make_accelerator(tc: TrainConfig) -> Accelerator:
    """accelerate's Accelerator as launched (one process, DDP, FSDP2 or DeepSpeed), the strategies sdtrain cannot run
    refused, and the GPU's math settings (TF32, cuDNN autotuning)."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", tc.mixed_precision) != tc.mixed_precision:
        AcceleratorState._reset_state()  # a second run in this process (the Python API) with another precision
    check_trackers(tc.trackers)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation,
        cpu=_processes_on_cpu(),
        log_with=tc.trackers or None,
        project_dir=Path(tc.output_dir),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if tc.compile else None,
    )
    check_strategy(accelerator)  # FSDP1 refused; FSDP2 shards (sdtrain.train.sharding)
    if tc.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("train.mixed_precision=fp16 on a CPU: accelerate autocasts to fp16 on accelerators only, so "
                       "this run trains in fp32 (bf16 autocast runs on CPUs)")  # fmt: skip
    zero.check(accelerator, tc)  # DeepSpeed ZeRO partitions the optimizer, and at stage 3 the UNet (train.zero)
    zero.load_whole(accelerator)  # not partitioned by ZeRO-3's zero3_init as transformers loads them
    if torch.cuda.is_available():
        if tc.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = tc.cudnn_benchmark
    return accelerator


def _prepare_unet(unet: UNet2DConditionModel, tc: TrainConfig, accelerator: Accelerator) -> None:
    """LoRA adapters (the base weights freeze), gradient checkpointing, the memory format; on the device, in training
    mode."""
    if tc.lora.rank:
        add_lora(unet, tc.lora)
    unet.to(accelerator.device).train()
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if tc.channels_last and (is_sharded(accelerator) or zero.is_zero(accelerator)):
        logger.warning("train.channels_last is ignored under FSDP2 and DeepSpeed (they flatten or shard contiguous "
                       "parameters only)")  # fmt: skip
    elif tc.channels_last:
        unet.to(memory_format=torch.channels_last)


def _micro_batch(tc: TrainConfig, accelerator: Accelerator) -> int:
    """Each process's micro-batch: ``train.batch_size`` is the global batch of every step, whatever the launch."""
    world, accumulation = accelerator.num_processes, tc.gradient_accumulation
    micro_batch, parts = divmod(tc.batch_size, accumulation * world)
    if micro_batch < 1 or parts:
        raise ValueError(
            f"train.batch_size={tc.batch_size} is not a multiple of gradient_accumulation x processes "
            f"({accumulation} x {world}): it is the global batch every step trains on"
        )
    if accelerator.is_main_process:
        kind = accelerator.distributed_type.value
        kind += f" ZeRO-{zero.stage(accelerator)}" if zero.is_zero(accelerator) else ""
        logger.info(
            "world size %d (%s on %s): global batch %d = micro-batch %d x accumulation %d x processes %d",
            *(world, kind, accelerator.device, tc.batch_size, micro_batch, accumulation, world),
        )
    return micro_batch


def _agree(accelerator: Accelerator, loss, grad_norm, stopping: bool, seconds: float) -> tuple[bool, bool, float]:
    """One all-reduce (max) of the step's flags: ``(non-finite loss or gradient on any rank, a stop signal on any
    rank, the largest elapsed time)``, the same on every rank."""
    device = accelerator.device
    finite = torch.isfinite(loss) & torch.isfinite(torch.as_tensor(grad_norm, device=device))
    flags = torch.tensor([0.0, float(stopping), seconds], device=device, dtype=torch.float64)
    flags[0] = (~finite).double()
    flags = accelerator.reduce(flags, reduction="max")
    return bool(flags[0]), bool(flags[1]), float(flags[2])


def train(config: Config, components: Components | None = None, batches: Iterable | None = None) -> Path:
    """Train the UNet and export ``output_dir/final`` as a diffusers pipeline folder.

    Resumes from the newest valid checkpoint in ``output_dir/checkpoints`` if there is one.

    Args:
        config: the resolved config (written to ``output_dir/config.yaml``).
        components: already-loaded models (the Python API); None loads them from ``config.model``.
        batches: any iterable of batches (the Python API); None reads ``config.data``.

    Returns:
        The export folder.
    """
    tc = config.train
    # 1. Accelerator (DDP, FSDP2 or DeepSpeed, as launched), run directory, seeds
    accelerator = _make_accelerator(tc)
    out = Path(tc.output_dir)
    ckpt_root = out / "checkpoints"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    rank, world = accelerator.process_index, accelerator.num_processes
    random.seed(tc.seed + rank)  # global RNGs (UNet dropout) differ per rank
    np.random.seed(tc.seed + rank)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank, before DDP even broadcasts them
    device = accelerator.device
    # noise, timesteps, posterior samples, caption dropout: drawn for the global micro-batch on every rank, so a run
    # does not depend on the number of processes (sdtrain.train.randomness)
    generator = torch.Generator(device).manual_seed(tc.seed)

    # 2. Components: frozen encoders on the device, the UNet in fp32 master weights
    components = components or load_components(config)
    vae, text_encoder, unet = components.vae, components.text_encoder, components.unet
    frozen = describe_frozen(vae, text_encoder)  # checkpoints record them; resume and export check them
    if accelerator.is_main_process:
        check_disk(out, unet, tc.ema_decay is not None)
    vae.to(device).requires_grad_(False).eval()
    text_encoder.to(device).requires_grad_(False).eval()
    _prepare_unet(unet, tc, accelerator)  # LoRA adapters, gradient checkpointing, memory format, on the device

    # 3. Data: a resumable stream of micro-batches, each process its own share
    micro_batch = _micro_batch(tc, accelerator)
    draws = SharedDraws(generator, rank, world, micro_batch)
    profile = _preflight(accelerator, components, config, micro_batch)
    stream = _make_stream(config, components, batches, micro_batch, device, rank, world)
    validation = None
    if batches is None and accelerator.is_main_process:
        validation = build_validation_set(config.data, tc.objective, vae, text_encoder, components.tokenizer, tc.seed)
    has_validation = broadcast_object_list([validation is not None])[0]  # every rank gathers weights for it (FSDP)
    scorer = _fidelity_scorer(config, device) if tc.fidelity.every and batches is None else None  # every process

    # 4. Objective, optimizer, EMA of the trainable weights (on the CPU with ema_offload)
    noise_scheduler = objective.make_noise_scheduler(tc.objective)
    optimizer = make_optimizer(unet, tc.optim)
    zero.configure(accelerator, tc, micro_batch)  # DeepSpeed: sdtrain's batch, accumulation, clipping, precision
    unet, optimizer, template = sharding.prepare(accelerator, unet, optimizer)  # DDP, FSDP2 or DeepSpeed's engine
    autocast = zero.autocast(accelerator, tc.mixed_precision)  # accelerator.autocast, torch's under DeepSpeed
    ema = None
    if tc.ema_decay is not None:  # of this process's parts of the weights under FSDP2 and ZeRO-3
        ema = EMA(ema_parameters(unwrap(accelerator, unet)), tc.ema_decay, tc.ema_every, tc.ema_offload)
    eval_unet = _EvalUNet(accelerator, unet, ema, template)  # what samples, validates and exports

    # 5. Resume from the newest valid checkpoint
    counters = Counters()
    latest = checkpoint.find_latest(ckpt_root)
    if latest is not None:
        counters = load_training_state(latest, accelerator, unet, optimizer, ema, stream, generator, frozen)
        logger.info("resumed from %s at step %d", latest, counters.step)
    if ema is not None:
        ema.place(device)
    ckpt_args = (accelerator, ckpt_root, tc.keep_checkpoints, unet, optimizer, ema, stream, generator)
    ckpt_args += (counters, frozen)

    # 6. The loop
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        truncate_log(log_path, counters.step)  # steps logged after the checkpoint are trained (and logged) again
        accelerator.init_trackers("tracking", config=_flat_config(config))
    peak = peak_tflops(device, tc.mixed_precision)
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    bar = Progress("train", tc.num_steps, budget, counters.step, disable=not accelerator.is_main_process)
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    consecutive_skips, stop, saved_at = 0, False, counters.step  # the decisions every rank takes alike
    started = time.perf_counter() - counters.train_seconds
    # the SIGTERM / SIGUSR1 handlers are the caller's again when the loop ends, raises or is preempted
    with StopSignal() as stop_signal:
        o = tc.objective
        while counters.step < tc.num_steps and (budget is None or counters.train_seconds < budget):
            progress = max(counters.step / tc.num_steps, counters.train_seconds / budget if budget else 0.0)
            set_lr(optimizer, tc.optim.lr * lr_factor(counters.step, progress, tc.optim))
            step_loss, nonfinite = torch.zeros((), device=device), False
            for _ in range(tc.gradient_accumulation):
                # 6a. a micro-batch: latents sampled from the posterior, text embeddings with caption dropout
                latents, cond = stream.next(draws)
                # 6b. noise it at random timesteps
                noise = objective.sample_noise(tuple(latents.shape), o.noise_offset, draws).to(latents)
                t = objective.sample_timesteps(latents.shape[0], o, draws)
                noisy = noise_scheduler.add_noise(latents, objective.perturb(noise, o.input_perturbation, draws), t)
                target = objective.target(noise_scheduler, latents, noise, t)
                weights = objective.loss_weights(noise_scheduler, t, o.snr_gamma)
                # 6c. predict and backpropagate (accelerate skips the all-reduce until the last micro-batch)
                with accelerator.accumulate(unet):
                    with autocast():
                        loss, _ = objective.diffusion_loss(unet(noisy, t, cond).sample, target, weights)
                    accelerator.backward(loss)
                    step_loss += loss.detach() / tc.gradient_accumulation
                    if accelerator.sync_gradients:
                        max_norm = tc.clip_norm if tc.clip_norm is not None else float("inf")
                        # (DeepSpeed clips and steps inside backward, skipping a step whose gradient norm is not
                        # finite: the norm it reports is the one it clipped)
                        grad_norm = sharding.local(accelerator.clip_grad_norm_(unet.parameters(), max_norm))
                        grad_norm = 0.0 if grad_norm is None else grad_norm  # DeepSpeed with compute_grad_norm off
                        # 6d. every rank agrees on: a non-finite loss or gradient on any rank, a stop signal received
                        # by any rank, and the elapsed time (so a time budget ends the run on the same step everywhere)
                        stopping = stop_signal.received is not None
                        nonfinite, stop, counters.train_seconds = _agree(
                            accelerator, step_loss, grad_norm, stopping, time.perf_counter() - started
                        )
                        if not nonfinite or accelerator.scaler is not None:
                            # (fp16: the loss scaler skips a non-finite step itself, and must see it to lower its scale)
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            # 6e. EMA, counters, logs; a skipped step leaves weights and EMA unchanged
            if nonfinite:
                counters.skipped_steps += 1
                consecutive_skips += 1
                scale = f" (fp16 loss scale now {accelerator.scaler.get_scale():g})" if accelerator.scaler else ""
                logger.warning("non-finite loss or gradient at step %d: step skipped%s", counters.step, scale)
                if consecutive_skips >= tc.max_consecutive_skips:
                    raise RuntimeError(
                        f"{consecutive_skips} consecutive steps had a non-finite loss or gradient (last: step "
                        f"{counters.step}); the newest checkpoint in {ckpt_root} holds finite weights. Lower the "
                        "learning rate, or use bf16 instead of fp16."
                    )
            else:
                consecutive_skips = 0
                if ema is not None:
                    ema.tick(unwrap(accelerator, unet))  # averages every train.ema_every steps
            counters.step += 1
            counters.samples_seen += tc.batch_size
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.update(counters.step, counters.train_seconds)
            if counters.step % tc.log_every == 0 or counters.step == tc.num_steps:
                mean_loss = accelerator.reduce(window_loss / window_steps, reduction="mean").item()  # over ranks
                images_per_s = window_steps * tc.batch_size / (time.perf_counter() - window_start)
                record = {
                    "step": counters.step,
                    "loss": mean_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": images_per_s,
                    "skipped_steps": counters.skipped_steps,
                    "skipped_samples": dict(stream.skipped),  # bad inputs by reason (corrupt, empty caption, ...)
                }
                if device.type == "cuda" and profile is not None:
                    record["tflops"] = images_per_s * profile.train_flops / 1e12  # all processes together
                    if peak:
                        record["mfu"] = record["tflops"] / (peak * world)
                if has_validation and tc.validation_every and counters.step % tc.validation_every == 0:
                    val_loss = _validation(eval_unet, validation, noise_scheduler, tc, micro_batch, autocast)
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                if accelerator.is_main_process:
                    _report(accelerator, bar, counters, record, log_path)
                window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
            # 6f. checkpoints and validation samples
            if counters.step % tc.save_every == 0:
                save_training_state(*ckpt_args)
                saved_at = counters.step
            if tc.sample_every and counters.step % tc.sample_every == 0 and tc.sample_prompts:
                _sample(components, eval_unet.copy(), accelerator, config, counters.step)
                unet.train()
            if scorer is not None and counters.step % tc.fidelity.every == 0:
                scored = eval_unet.copy(everywhere=True)
                _fidelity(scorer, components, scored, accelerator, config, counters.step, log_path)
                unet.train()
            # 6g. preemption: all ranks saw the flag in 6d, so they checkpoint together and stop
            if stop:
                bar.close()
                if saved_at != counters.step:
                    save_training_state(*ckpt_args)
                accelerator.wait_for_everyone()
                raise Preempted(f"stopped by signal at step {counters.step}; checkpoint written to {ckpt_root}")
    bar.close()

    # 7. Final checkpoint, fidelity, validation loss, export with EMA weights (+ LoRA weights), samples, loss.png
    if saved_at != counters.step and tc.final_checkpoint:
        save_training_state(*ckpt_args)
    accelerator.wait_for_everyone()
    if scorer is not None and counters.step % tc.fidelity.every:  # unless the last step was scored
        _fidelity(scorer, components, eval_unet.copy(everywhere=True), accelerator, config, counters.step, log_path)
    final = out / "final"
    exported = eval_unet.copy()  # the EMA weights, unsharded, on the main process (None on the others)
    if accelerator.is_main_process:
        if validation is not None:
            val_loss = validation_loss(
                exported, noise_scheduler, validation, tc.objective.snr_gamma, micro_batch, autocast
            )
            accelerator.log({"val_loss": val_loss}, step=counters.step)
            _append_to_log(log_path, counters.step, {"val_loss": val_loss})
        if tc.export:
            export_pipeline(dataclasses.replace(components, unet=exported), tc.objective, final, config.sample)
        if tc.sample_prompts:
            _sample(components, exported, accelerator, config, counters.step)
        plot_losses(log_path, out / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _make_stream(config: Config, components: Components, batches, micro_batch: int, device, rank: int, world: int):
    """The resumable micro-batch stream of this process: ``batches`` given to ``fit``, the disk cache, the in-memory
    latent cache, or images decoded and encoded every step (folders / manifests / datasets, shards, a mix)."""
    data, seed, tokenizer = config.data, config.train.seed, components.tokenizer
    vae, text_encoder = components.vae, components.text_encoder
    if batches is not None:
        return IterableStream(batches, vae, text_encoder, tokenizer, data.caption_dropout, device, rank, world)
    if data.cache_dir:
        disk = DiskCache(data, vae, text_encoder, tokenizer)
        return DiskCacheStream(disk, vae, micro_batch, data.caption_dropout, device, seed, rank, world)
    if data.cache_latents:
        cache = build_memory_cache(data, vae, text_encoder, tokenizer, seed=seed)
        if cache.skipped:
            logger.warning("skipped while caching: %s", cache.skipped.summary())
        return CachedStream(cache, vae, micro_batch, data.caption_dropout, device, seed, rank, world)
    sources = [data] + [
        dataclasses.replace(data, path=m.path, image_column=m.image_column, caption_column=m.caption_column, mix=[])
        for m in data.mix
    ]
    streams = [
        (ShardStream if is_shards(d.path) else OnlineStream)(
            d, vae, text_encoder, tokenizer, micro_batch, device, seed, rank, world
        )
        for d in sources
    ]
    weights = [data.weight] + [m.weight for m in data.mix]
    return streams[0] if len(streams) == 1 else MixedStream(streams, weights, seed)


def _preflight(accelerator, components: Components, config: Config, micro_batch: int) -> StepProfile | None:
    """Print parameters, FLOPs and the memory estimate (main process); warn with advice when it will not fit."""
    if not accelerator.is_main_process:
        return None
    tc, unet = config.train, components.unet
    vae_factor = downsample_factor(components.vae)
    size = config.data.resolution // vae_factor
    latent_shape = (unet.config.in_channels, size, size)
    text_shape = (components.tokenizer.model_max_length, unet.config.cross_attention_dim)
    profile = profile_unet(unet, latent_shape, text_shape, accelerator.device)
    processes, stage = accelerator.num_processes, zero.stage(accelerator)
    shards = processes if is_sharded(accelerator) else 1
    frozen = [components.vae, components.text_encoder]
    estimate = estimate_memory(unet, frozen, profile, micro_batch, tc, shards, stage, processes)
    params = sum(p.numel() for p in unet.parameters())
    logger.info(
        "UNet %.1fM parameters (%.1fM trainable), %.2f GFLOPs per image per training step at %d px",
        params / 1e6,
        sum(p.numel() for _, p in trainable(unet)) / 1e6,
        profile.train_flops / 1e9,
        config.data.resolution,
    )
    logger.info("memory estimate per device (GiB): %s", estimate.table())
    if accelerator.device.type == "cuda":
        available = torch.cuda.get_device_properties(accelerator.device).total_memory
        if estimate.total > 0.9 * available:
            tips = "\n  ".join(advice(estimate, available, tc, micro_batch, processes, shards, stage))
            logger.warning(
                "the estimate (%.1f GiB) exceeds 90 %% of %s's %.1f GiB; to fit:\n  %s",
                estimate.total / GiB,
                torch.cuda.get_device_name(accelerator.device),
                available / GiB,
                tips,
            )
    return profile


@dataclass
class _EvalUNet:
    """The UNet as sampling, validation and export see it: the EMA weights (the training ones without EMA), in an
    ordinary, unsharded module."""

    accelerator: Accelerator
    unet: Any  # as prepared: DDP-wrapped, or sharded by FSDP2
    ema: EMA | None
    template: torch.nn.Module | None  # FSDP2: the UNet's structure on the meta device

    def copy(self, everywhere: bool = False) -> UNet2DConditionModel | None:
        """A UNet holding the EMA weights (the training UNet is left untouched), on the main process or on
        ``everywhere``; None on the other processes. Without EMA and sharding, the training UNet itself.

        Collective under FSDP2: every process calls it, the weights are gathered whole from the shards.
        """
        accelerator, ema = self.accelerator, self.ema
        keep = everywhere or accelerator.is_main_process
        model = unwrap(accelerator, self.unet)
        if ema is not None:
            ema.catch_up(model)  # every process: the steps not averaged yet (train.ema_every)
        if self.template is None:  # DDP or one process: every process holds the whole model
            if not keep:
                return None
            if ema is None:
                return model
            copy = deepcopy(model)
            ema.copy_to([p for _, p in trainable(copy)])
            return copy.eval()
        whole = sharding.gather_model(model, keep)
        ema_weights = whole_ema(ema, model, keep) if ema is not None else None
        if not keep:
            return None
        return sharding.unsharded_copy(self.template, whole | (ema_weights or {}), accelerator.device).eval()


def _validation(
    eval_unet: _EvalUNet, validation: ValidationSet | None, scheduler, tc, batch_size: int, autocast
) -> float | None:
    """Validation loss with the EMA weights (the ones exported) on the main process (None on the others): swapped into
    the training UNet and back out, or under FSDP2 in an unsharded copy (collective)."""
    accelerator, ema = eval_unet.accelerator, eval_unet.ema
    if ema is not None:
        ema.catch_up(unwrap(accelerator, eval_unet.unet))  # every process: the steps not averaged yet
    if eval_unet.template is not None:
        copy = eval_unet.copy()
        if copy is None:
            return None
        return validation_loss(copy, scheduler, validation, tc.objective.snr_gamma, batch_size, autocast)
    if not accelerator.is_main_process:
        return None
    model = unwrap(accelerator, eval_unet.unet)
    parameters = [p for _, p in trainable(model)]
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    try:
        return validation_loss(model, scheduler, validation, tc.objective.snr_gamma, batch_size, autocast)
    finally:
        if ema is not None:
            ema.restore(parameters)


def _report(accelerator, bar: Progress, counters: Counters, record: dict, log_path: Path) -> None:
    postfix = {"loss": f"{record['loss']:.4f}", "img_s": f"{record['images_per_s']:.0f}"}
    if "val_loss" in record:
        postfix["val"] = f"{record['val_loss']:.4f}"
    bar.update(counters.step, counters.train_seconds, **postfix)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    accelerator.log(scalars, step=record["step"])


def _append_to_log(log_path: Path, step: int, values: dict[str, float]) -> None:
    """Put ``values`` (a validation loss, fidelity scores) on the log record of ``step`` if it is the last one, else
    on a record of their own."""
    records = read_log(log_path)
    if records and records[-1]["step"] == step:
        records[-1].update(values)
    else:
        records.append({"step": step, **values})
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _fidelity_scorer(config: Config, device: torch.device):
    """The FID / KID / CLIP scorer with its reference set read, before the first step (a missing weight file or an
    empty reference set stops the run now, not hours in); parked on the CPU between evaluations. Every process
    builds one and scores its share of the reference images."""
    from sdtrain.data.folder import validation_records
    from sdtrain.evaluate.fidelity import FidelityScorer

    fc, data = config.train.fidelity, config.data
    scorer = FidelityScorer(fc.metrics, fc.inception, fc.clip_model, device)
    reference = fc.data or validation_records(data, config.train.seed)
    columns = (data.image_column, data.caption_column)
    scorer.set_reference(reference, fc.num_images, data.resolution, config.train.seed, fc.batch_size, *columns)
    if scorer.rank == 0:
        logger.info(
            "fidelity: %d reference pairs (skipped: %s)", len(scorer.reference.captions), scorer.reference.skipped
        )
    return scorer.to("cpu")


def _fidelity(scorer, components, unet, accelerator, config: Config, step: int, log_path: Path) -> None:
    """FID / KID / CLIP score of the EMA weights sampled with the ``sample`` settings: ``fidelity/step-XXXXXX/``, the
    log record of the step and the trackers. Every process draws its share of the images."""
    from sdtrain.api import StableDiffusion

    sample = config.sample
    sampling = {"num_inference_steps": sample.num_inference_steps, "guidance_scale": sample.guidance_scale}
    pipe = StableDiffusion(
        components.vae,
        components.text_encoder,
        components.tokenizer,
        unet,
        scheduler=sample.scheduler,
        device=accelerator.device,
        objective=config.train.objective,
        sampling=sampling,
    )
    out_dir = Path(config.train.output_dir) / "fidelity" / f"step-{step:06d}"
    scorer.to(accelerator.device)
    try:
        result = scorer.score(pipe, out_dir, seed=config.train.seed, batch_size=config.train.fidelity.batch_size)
    finally:
        scorer.to("cpu")
    values = {k: result[k] for k in ("fid", "kid_mean", "clip_score") if k in result}
    if accelerator.is_main_process:
        logger.info("fidelity at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        _append_to_log(log_path, step, values)
        accelerator.log(values, step=step)


def _flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """The config as flat dotted scalars (trackers record hyperparameters that way)."""
    if dataclasses.is_dataclass(value):
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            flat.update(_flat_config(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name))
        return flat
    if value is None:
        return {}
    return {prefix: value if isinstance(value, (int, float, str, bool)) else str(value)}


def _sample(components, unet, accelerator, config: Config, step: int) -> Path | None:
    """Validation prompts with fixed seeds drawn by ``unet`` (the EMA weights, from ``_EvalUNet.copy``) on the main
    process: ``samples/step-XXXXXX.png`` and the trackers."""
    if unet is None:  # not the main process
        return None
    out_dir = Path(config.train.output_dir) / "samples" / f"step-{step:06d}"
    pipe = assemble_pipeline(
        dataclasses.replace(components, unet=unet), config.train.objective, config.sample.scheduler
    )
    result = txt2img(
        pipe,
        config.train.sample_prompts,
        num_inference_steps=config.sample.num_inference_steps,
        guidance_scale=config.sample.guidance_scale,
        seed=config.train.seed,
    )
    grid = save_images(result.images, out_dir)
    grid.replace(out_dir.with_suffix(".png"))
    log_images(accelerator, result.images, step)
    return out_dir.with_suffix(".png")

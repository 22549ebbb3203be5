"""The denoiser's training loop: one linear function, top to bottom.

``train(config)`` is what ``sdtrain train`` runs; ``StableDiffusion.fit`` calls the same function with components and
batches it already has. The loop never asks which model family it trains: the family (:mod:`sdtrain.models.families`)
loads the components, encodes prompts and calls the denoiser; the math is :mod:`sdtrain.objective`, batches come
from :mod:`sdtrain.data.streams` and the latent caches, checkpoints from :mod:`sdtrain.train.state`, the run's
scaffolding from :mod:`sdtrain.train.run`, and inference artifacts from :mod:`sdtrain.train.export`.
"""

from __future__ import annotations

import functools
import logging
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
from accelerate.utils import broadcast_object_list

from sdtrain import objective
from sdtrain.config import Config, ConfigError, TrainConfig, data_sources, save_config
from sdtrain.data.captions import in_prompts
from sdtrain.data.disk_cache import DiskCache, DiskCacheStream
from sdtrain.data.memory_cache import MemoryCacheStream, build_memory_cache
from sdtrain.data.sources import is_shards
from sdtrain.data.streams import (
    IterableStream,
    MixedStream,
    OnlineStream,
    ShardStream,
    Stream,
    WeightedStream,
    encode_conditions,
    encode_prompts,
    size_condition,
    source_weights,
)
from sdtrain.errors import StorageError
from sdtrain.models.families import Encoders, Family, for_config
from sdtrain.models.lora import adapters_off, add_lora
from sdtrain.models.vae import downsample_factor, latent_channels
from sdtrain.sample.pipeline import Pipeline, sample_images, save_images
from sdtrain.train import block_swap, checkpoint, placement, prior, sharding, text_encoders, zero
from sdtrain.train.ema import EMA, ema_parameters
from sdtrain.train.export import export_pipeline
from sdtrain.train.optim import check_muon_skip, lr_factor, make_optimizer, set_lr
from sdtrain.train.perf import (
    GiB,
    MemoryEstimate,
    StepProfile,
    advice,
    estimate_memory,
    peak_tflops,
    profile_denoiser,
)
from sdtrain.train.preemption import Preempted, StopSignal, StopWhileSettingUp
from sdtrain.train.preflight import check_objective, check_run
from sdtrain.train.progress import Progress
from sdtrain.train.randomness import SharedDraws
from sdtrain.train.run import (
    agree,
    append_to_log,
    count_skip,
    flat_config,
    make_accelerator,
    micro_batch_size,
    report,
    run_lock,
)
from sdtrain.train.sharding import is_sharded
from sdtrain.train.state import (
    Counters,
    check_disk,
    describe_frozen,
    load_training_state,
    save_training_state,
    trainable,
    truncate_log,
    unwrap,
    whole_ema,
)
from sdtrain.train.tracking import log_images, plot_losses
from sdtrain.train.validation import ValidationSet, build_validation_set, validation_loss

logger = logging.getLogger(__name__)


def _prepare_denoiser(family: Family, components, tc: TrainConfig, accelerator: Accelerator) -> torch.nn.Module:
    """What trains: the denoiser with LoRA adapters on the family's targets (the base weights freeze), and the text
    encoders where they train (:mod:`sdtrain.train.text_encoders`); gradient checkpointing, the memory format; on the
    device, in training mode."""
    model = family.denoiser_of(components)
    if tc.lora.rank:
        add_lora(model, tc.lora, family.lora_targets)
    if text_encoders.trains_text(tc) and (is_sharded(accelerator) or zero.is_zero(accelerator)):
        raise ConfigError("train.text_encoder.mode: the text encoders train under DDP or on one device; FSDP2 and "
                         "DeepSpeed shard the denoiser alone (train.text_encoder.mode=frozen)")  # fmt: skip
    model = text_encoders.prepare(family, components, model, tc)
    model.to(accelerator.device).train()
    if tc.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    denoiser, processes = family.denoiser_of(components), accelerator.num_processes
    block_swap.swap_blocks(denoiser, tc.offload.blocks, accelerator.device, tc.gradient_checkpointing, processes)
    if tc.channels_last and (is_sharded(accelerator) or zero.is_zero(accelerator)):
        logger.warning("train.channels_last is ignored under FSDP2 and DeepSpeed (they flatten or shard contiguous "
                       "parameters only)")  # fmt: skip
    elif tc.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@dataclass
class _Run:
    """What the stages of :func:`train` share once set up."""

    config: Config
    family: Family
    components: Any
    accelerator: Accelerator
    model: Any  # the denoiser as prepared: DDP-wrapped, sharded by FSDP2, or DeepSpeed's engine
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    stream: Stream
    generator: torch.Generator
    draws: SharedDraws
    diffusion: objective.DDPM | objective.FlowMatching  # the family's objective
    predict: Any  # (model, noisy, timesteps, cond) -> output: the family's, or through the trained text encoders
    autocast: Any
    eval: _EvalDenoiser
    micro_batch: int
    counters: Counters
    frozen: dict[str, Any]
    placed: placement.Placed  # checkpoints hold the trainable weights alone where the base re-reads
    parked: tuple[str, ...]  # frozen parts on the CPU between samples (placement.to_park)

    @property
    def out(self) -> Path:
        return Path(self.config.train.output_dir)

    def save(self) -> None:
        """A checkpoint of everything a bit-exact resume needs (collective)."""
        r = self
        save_training_state(
            r.accelerator, r.out / "checkpoints", r.config.train.keep_checkpoints, r.model, r.optimizer, r.ema,
            r.stream, r.generator, r.counters, r.frozen, r.family.denoiser, r.placed.base_reloads,
        )  # fmt: skip


def train(config: Config, components: Any | None = None, batches: Iterable | None = None) -> Path:
    """Train the denoiser and export ``output_dir/final`` as a diffusers pipeline folder of the model's family.

    Resumes from the newest valid checkpoint in ``output_dir/checkpoints`` if there is one. The run folder is locked
    for the whole run (:func:`~sdtrain.train.run.run_lock`).

    Args:
        config: the resolved config (written to ``output_dir/config.yaml``).
        components: already-loaded models (the Python API); None loads them from ``config.model``.
        batches: any iterable of batches (the Python API); None reads ``config.data``.

    Returns:
        The export folder.

    Raises:
        UserError: what :func:`~sdtrain.train.preflight.check_run` refuses before the run folder is made; another
            process trains in ``output_dir`` (RunLocked); a write failed (StorageError); the run diverged.
        Preempted: SIGTERM or SIGUSR1 arrived; the step in progress was finished and checkpointed.
    """
    check_run(config, models=components is None, data=batches is None)  # before the run folder is made
    with run_lock(config.train.output_dir), StopWhileSettingUp() as setup:
        return _train(config, components, batches, setup)


def estimate(config: Config) -> MemoryEstimate:
    """The memory estimate :func:`train` prints before its first step, without training (``sdtrain train
    --estimate``; the web UI's form): the config checked as ``train`` checks it, the models loaded and placed as the
    run places them, on the CPU (nothing is taken from a GPU a run may be using), one step profiled; no run folder
    is made. Under fp16 the CPU computes in fp32, so the activations are counted at fp32's size.

    Raises:
        UserError: what :func:`~sdtrain.train.preflight.check_run` refuses.
    """
    check_run(config)
    family, tc = for_config(config.model), config.train
    accelerator = Accelerator(cpu=True, mixed_precision=tc.mixed_precision)
    components = family.load(config)
    placement.prepare(family, components, config, accelerator.device, False, 1)
    _prepare_denoiser(family, components, tc, accelerator)
    parked = placement.to_park(family, components, config)
    micro_batch = micro_batch_size(tc, accelerator)
    return _preflight(accelerator, family, components, family.encoders(components), config, micro_batch, parked)[1]


def _train(config: Config, components: Any | None, batches: Iterable | None, setup: StopWhileSettingUp) -> Path:
    """:func:`train`'s stages, top to bottom (a stop signal before the loop stops the run through ``setup``)."""
    tc, family, out = config.train, for_config(config.model), Path(config.train.output_dir)
    kind = check_objective(config)
    # 1. Accelerator (DDP, FSDP2 or DeepSpeed, as launched), run directory, seeds
    accelerator, generator = _start(config)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    # 2. Components: frozen modules on the device in their precision (a LoRA base too), trained weights in fp32;
    # first, DreamBooth's missing class images, drawn by the base model (the main process; the others wait; under a
    # disk cache `sdtrain cache` drew them)
    if config.data.prior.path and not config.data.cache_dir and accelerator.is_main_process:
        prior.draw_class_images(config, device)
    accelerator.wait_for_everyone()
    components = components or family.load(config)
    frozen_modules = text_encoders.frozen(family, components, tc)
    if placement.base_reloads(config):  # a LoRA run's base, read again on resume
        frozen_modules[family.denoiser] = placement.frozen_base(family, components)
    frozen = describe_frozen(frozen_modules)  # checkpoints record them; resume and export check them
    if accelerator.is_main_process:
        check_disk(out, family.denoiser_of(components), tc.ema_decay is not None)
    sharded = is_sharded(accelerator) or zero.is_zero(accelerator)
    placed = placement.prepare(family, components, config, device, sharded, world)  # dtypes, quantisation, device
    model = _prepare_denoiser(family, components, tc, accelerator)  # LoRA, text encoders, checkpointing, device
    check_muon_skip(model, tc.optim)  # before the data's caching: the optimizer is built after it

    # 3. Data: a resumable stream of micro-batches (the prompts' tokens where the text encoders train)
    micro_batch = micro_batch_size(tc, accelerator)
    encoders = text_encoders.data_encoders(family, components, tc)
    parked = placement.to_park(family, components, config) if batches is None else ()  # unused once encoded
    profile, _ = _preflight(accelerator, family, components, family.encoders(components), config, micro_batch, parked)
    stream = _make_stream(config, encoders, batches, micro_batch, device, rank, world)
    tokens = (config.data.resolution // downsample_factor(encoders.vae) // 2) ** 2  # 2 x 2 patches (dynamic shift)
    diffusion = objective.make(kind, tc.objective, tokens)  # noise, timesteps, targets, weights
    validation = None
    if batches is None and accelerator.is_main_process:
        validation = build_validation_set(config.data, diffusion, encoders, tc.seed)
    has_validation = broadcast_object_list([validation is not None])[0]  # every rank gathers weights for it (FSDP)
    placement.park(components, parked)  # the caches hold what they encoded
    scorer = _fidelity_scorer(config, device) if tc.fidelity.every and batches is None else None  # every process

    # 4. Objective, optimizer, EMA of the trainable weights (on the CPU with ema_offload)
    optimizer = make_optimizer(model, tc.optim, lambda name: text_encoders.lr_scale(name, tc))
    zero.configure(accelerator, tc, micro_batch)  # DeepSpeed: sdtrain's batch, accumulation, clipping, precision
    model, optimizer, template = sharding.prepare(accelerator, model, optimizer)  # DDP, FSDP2 or DeepSpeed's engine
    ema = None
    if tc.ema_decay is not None:  # of this process's parts of the weights under FSDP2 and ZeRO-3
        ema = EMA(ema_parameters(unwrap(accelerator, model)), tc.ema_decay, tc.ema_every, tc.ema_offload)
    run = _Run(
        config, family, components, accelerator, model, optimizer, ema, stream, generator,
        SharedDraws(generator, rank, world, micro_batch), diffusion, text_encoders.predictor(family, tc),
        zero.autocast(accelerator, tc.mixed_precision),  # accelerate's autocast, torch's under DeepSpeed
        _EvalDenoiser(accelerator, model, ema, template),  # what samples, validates and exports
        micro_batch, Counters(), frozen, placed, parked,
    )  # fmt: skip

    # 5. Resume from the newest valid checkpoint
    _resume(run)
    counters, log_path = run.counters, out / "log.jsonl"

    # 6. The loop
    peak = peak_tflops(device, tc.mixed_precision)
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    bar = Progress("train", tc.num_steps, budget, counters.step, disable=not accelerator.is_main_process)
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    consecutive_skips, saved_at = 0, counters.step  # the decisions every rank takes alike
    warmup_share = min(1.0, tc.optim.warmup_steps / tc.num_steps)  # the decay runs over the rest
    started = time.perf_counter() - counters.train_seconds
    # the SIGTERM / SIGUSR1 handlers are the caller's again (and the bar closed) when the loop ends, raises or stops
    setup.done()
    with StopSignal() as stop_signal, bar:
        while counters.step < tc.num_steps and (budget is None or counters.train_seconds < budget):
            # 6a-6d. one optimizer step over gradient_accumulation micro-batches
            progress = max(counters.step / tc.num_steps, counters.train_seconds / budget if budget else 0.0)
            set_lr(optimizer, tc.optim.lr * lr_factor(counters.step, progress, tc.optim, warmup_share))
            step_loss, nonfinite, stop = _optimizer_step(run, stop_signal, started)
            # 6e. EMA, counters, logs; a skipped step leaves weights and EMA unchanged
            if nonfinite:
                consecutive_skips += 1
                scale = f" (fp16 loss scale now {accelerator.scaler.get_scale():g})" if accelerator.scaler else ""
                count_skip(counters, consecutive_skips, tc.max_consecutive_skips, out / "checkpoints",
                           "Lower the learning rate, or use bf16 instead of fp16.", scale)  # fmt: skip
            else:
                consecutive_skips = 0
                if ema is not None:
                    ema.tick(unwrap(accelerator, model))  # averages every train.ema_every steps
            counters.step += 1
            counters.samples_seen += tc.batch_size
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.update(counters.step, counters.train_seconds)
            if counters.step % tc.log_every == 0 or counters.step == tc.num_steps:
                record = _log_record(run, window_loss / window_steps, window_steps, window_start, profile, peak)
                if has_validation and tc.validation_every and counters.step % tc.validation_every == 0:
                    val_loss = _validation(run, validation)
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                if accelerator.is_main_process:
                    report(accelerator, bar, counters, record, log_path)
                window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
            # 6f. checkpoints, validation samples, fidelity scores
            if counters.step % tc.save_every == 0:
                run.save()
                saved_at = counters.step
            _samples_and_scores(run, scorer, log_path)
            # 6g. preemption: all ranks saw the flag in 6d, so they checkpoint together and stop
            if stop:
                bar.close()
                if saved_at != counters.step:
                    run.save()
                accelerator.wait_for_everyone()
                raise Preempted(f"stopped by signal at step {counters.step}; checkpoint written to {out}/checkpoints")
    bar.close()

    # 7. Final checkpoint, fidelity, validation loss, export with EMA weights (+ LoRA weights), samples, loss.png
    if saved_at != counters.step and tc.final_checkpoint:
        run.save()
    accelerator.wait_for_everyone()
    if scorer is not None and counters.step % tc.fidelity.every:  # unless the last step was scored
        _fidelity(scorer, run, run.eval.copy(everywhere=True), log_path)
    return _finish(run, validation, log_path)


def _start(config: Config) -> tuple[Accelerator, torch.Generator]:
    """The Accelerator as launched, the run directory with the resolved config, the seeds; returns the accelerator and
    the generator of the random draws (noise, timesteps, posterior samples, caption dropout), which are made for the
    global micro-batch on every rank, so a run does not depend on the number of processes
    (:mod:`sdtrain.train.randomness`)."""
    tc = config.train
    accelerator, out = make_accelerator(tc, for_config(config.model).unused_parameters), Path(tc.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    random.seed(tc.seed + accelerator.process_index)  # global RNGs (dropout) differ per rank
    np.random.seed(tc.seed + accelerator.process_index)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank, before DDP even broadcasts them
    return accelerator, torch.Generator(accelerator.device).manual_seed(tc.seed)


def _resume(run: _Run) -> None:
    """Continue from the newest valid checkpoint, if any; the log keeps each step once, the trackers start."""
    accelerator, r = run.accelerator, run
    latest = checkpoint.find_latest(run.out / "checkpoints")
    if latest is not None:
        run.counters = load_training_state(
            latest, accelerator, r.model, r.optimizer, r.ema, r.stream, r.generator, r.frozen, r.family.denoiser
        )
        logger.info("resumed from %s at step %d", latest, run.counters.step)
    if run.ema is not None:
        run.ema.place(accelerator.device)
    if accelerator.is_main_process:
        truncate_log(run.out / "log.jsonl", run.counters.step)  # steps logged after the checkpoint are trained again
        accelerator.init_trackers("tracking", config=flat_config(run.config))


def _samples_and_scores(run: _Run, scorer, log_path: Path) -> None:
    """Validation samples every ``train.sample_every`` steps, FID / KID / CLIP scores every ``train.fidelity.every``
    (with the EMA weights; the training denoiser goes back to training mode)."""
    tc, step = run.config.train, run.counters.step
    if tc.sample_every and step % tc.sample_every == 0 and tc.sample_prompts:
        _sample(run, run.eval.copy())
        unwrap(run.accelerator, run.model).train()
    if scorer is not None and step % tc.fidelity.every == 0:
        _fidelity(scorer, run, run.eval.copy(everywhere=True), log_path)
        unwrap(run.accelerator, run.model).train()


def _optimizer_step(run: _Run, stop_signal: StopSignal, started: float) -> tuple[torch.Tensor, bool, bool]:
    """One optimizer step over ``gradient_accumulation`` micro-batches; returns ``(mean loss, non-finite on some rank
    (the step was skipped), a stop signal on some rank)``, the flags the same on every rank."""
    tc, accelerator, model, optimizer, draws = run.config.train, run.accelerator, run.model, run.optimizer, run.draws
    step_loss, nonfinite, stop = torch.zeros((), device=accelerator.device), False, False
    for _ in range(tc.gradient_accumulation):
        # 6a. a micro-batch: latents sampled from the posterior, the prompts' conditioning with caption dropout
        latents, cond = run.stream.next(draws)
        # 6b. noise and timesteps, as the family's objective draws them
        drawn = run.diffusion.draw(tuple(latents.shape), draws)
        # 6c. predict and backpropagate (accelerate skips the all-reduce until the last micro-batch)
        with accelerator.accumulate(model):
            base = functools.partial(adapters_off, model)  # the frozen base, for samples it is the target of
            loss, _ = run.diffusion.loss(run.predict, model, cond, latents, drawn, run.autocast, base)
            accelerator.backward(loss)
            step_loss += loss.detach() / tc.gradient_accumulation
            if accelerator.sync_gradients:
                max_norm = tc.clip_norm if tc.clip_norm is not None else float("inf")
                # (DeepSpeed clips and steps inside backward, skipping a step whose gradient norm is not finite: the
                # norm it reports is the one it clipped)
                grad_norm = sharding.local(accelerator.clip_grad_norm_(model.parameters(), max_norm))
                grad_norm = 0.0 if grad_norm is None else grad_norm  # DeepSpeed with compute_grad_norm off
                # 6d. every rank agrees on: a non-finite loss or gradient on any rank, a stop signal received by any
                # rank, and the elapsed time (so a time budget ends the run on the same step everywhere)
                stopping = stop_signal.received is not None
                nonfinite, stop, run.counters.train_seconds = agree(
                    accelerator, step_loss, grad_norm, stopping, time.perf_counter() - started
                )
                if not nonfinite or accelerator.scaler is not None:
                    # (fp16: the loss scaler skips a non-finite step itself, and must see it to lower its scale)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return step_loss, nonfinite, stop


def _log_record(run: _Run, mean_loss, steps: int, started: float, profile: StepProfile | None, peak) -> dict:
    """The log record of the window of ``steps`` steps since ``started`` (collective: the loss is averaged over
    ranks)."""
    tc, accelerator, counters = run.config.train, run.accelerator, run.counters
    images_per_s = steps * tc.batch_size / (time.perf_counter() - started)
    record = {
        "step": counters.step,
        "loss": accelerator.reduce(mean_loss, reduction="mean").item(),
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": images_per_s,
        "skipped_steps": counters.skipped_steps,
        "skipped_samples": dict(run.stream.skipped),  # bad inputs by reason (corrupt, empty caption, ...)
    }
    if accelerator.device.type == "cuda" and profile is not None:
        record["tflops"] = images_per_s * profile.train_flops / 1e12  # all processes together
        if peak:
            record["mfu"] = record["tflops"] / (peak * accelerator.num_processes)
    return record


def _finish(run: _Run, validation: ValidationSet | None, log_path: Path) -> Path:
    """The end of a run: validation loss, export with the EMA weights (+ LoRA weights), samples, ``loss.png``."""
    tc, accelerator, step = run.config.train, run.accelerator, run.counters.step
    final = run.out / "final"
    exported = run.eval.copy()  # the EMA weights, unsharded, on the main process (None on the others)
    if accelerator.is_main_process:
        if validation is not None:
            args = (run.predict, run.diffusion, validation, run.micro_batch, run.autocast)
            val_loss = validation_loss(exported, *args)
            accelerator.log({"val_loss": val_loss}, step=step)
            append_to_log(log_path, step, {"val_loss": val_loss})
        if tc.export:
            components = text_encoders.components_with(run.family, run.components, exported)
            components, bases = placement.full_precision(run.family, components, run.config, run.placed)
            try:
                export_pipeline(run.family, components, tc.objective, final, run.config.sample, bases)
            except StorageError as e:  # the rerun resumes at the end of training and exports again
                raise StorageError(f"{e}; {checkpoint.resume_note(run.out / 'checkpoints')} and export") from e
        if tc.sample_prompts:
            _sample(run, exported)
        plot_losses(log_path, run.out / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _make_stream(
    config: Config, encoders: Encoders, batches, micro_batch: int, device, rank: int, world: int
) -> Stream:
    """The resumable micro-batch stream of this process: ``batches`` given to ``fit``, or each source (data.path,
    data.datasets, the class images) read from its disk cache, cached in memory or decoded and encoded every step,
    mixed by share."""
    data, seed = config.data, config.train.seed
    if batches is not None:
        return IterableStream(batches, encoders, data.caption_dropout, device, rank, world)
    sources = [source for _, source in data_sources(data, classes=True)]  # the class images last
    streams, sizes = [], []
    for source in sources:
        if data.cache_dir:  # each source its own cache under data.cache_dir
            disk = DiskCache(source, encoders)
            args = (disk, encoders, micro_batch, source.caption_dropout, device, seed, rank, world)
            stream, size = DiskCacheStream(*args, condition_dropout=source.condition_dropout), len(disk)
        elif data.cache_latents:
            cache = build_memory_cache(source, encoders, seed=seed)
            if cache.skipped:
                logger.warning("skipped while caching %s: %s", source.path, cache.skipped.summary())
            args = (cache, encoders, micro_batch, source.caption_dropout, device, seed, rank, world)
            stream, size = MemoryCacheStream(*args, condition_dropout=source.condition_dropout), len(cache)
        else:
            kind = ShardStream if is_shards(source.path) else OnlineStream
            stream = kind(source, encoders, micro_batch, device, seed, rank, world)
            size = None if kind is ShardStream else len(stream.loader.dataset)
        terms = source.loss_weight != 1.0 or source.target == "base"
        streams.append(WeightedStream(stream, source.loss_weight, source.target == "base") if terms else stream)
        sizes.append(size)
    weights = source_weights(sources[: len(sources) - bool(data.prior.path)], sizes)
    if data.prior.path:
        weights.append(prior.share_weight(weights, data.prior.share))
    if len(streams) > 1:
        logger.info("sources drawn by share: %s", ", ".join(
            f"{s.path} {w / sum(weights):.1%}" for s, w in zip(sources, weights)))  # fmt: skip
    return streams[0] if len(streams) == 1 else MixedStream(streams, weights, seed)


def _preflight(
    accelerator, family: Family, components, encoders: Encoders, config: Config, micro_batch: int, parked: tuple
) -> tuple[StepProfile | None, MemoryEstimate | None]:
    """Print parameters, FLOPs and the memory estimate (main process); warn with advice when it will not fit.
    Returns the step's profile and the estimate (None on the other processes)."""
    if not accelerator.is_main_process:
        return None, None
    tc, model = config.train, family.denoiser_of(components)
    size = config.data.resolution // downsample_factor(encoders.vae)
    latent_shape = (latent_channels(encoders.vae), size, size)
    side = config.data.resolution
    cond = size_condition(encoders, ([(side, side)], [(0, 0)]), (side, side), "cpu")
    gray = None
    if encoders.encode_conditions is not None:  # gray condition images, as many as the data gives, of their size
        own = config.data.condition_resolution or side
        gray = [torch.zeros(1, 3, own, own)] * max(1, len(config.data.conditions))
        cond |= {k: v.cpu() for k, v in encode_conditions(encoders, gray, encoders.vae.device).items()}
    cond |= {k: v.cpu() for k, v in encode_prompts(encoders, [""], gray).items()}
    half = placement.compute_dtype(tc, accelerator.device)
    half = half if half != torch.float32 and placement.base_reloads(config) else None  # a base held in it
    profile = profile_denoiser(model, family.predict, latent_shape, cond, accelerator.device, half)
    processes, stage = accelerator.num_processes, zero.stage(accelerator)
    shards = processes if is_sharded(accelerator) else 1
    frozen = placement.on_device(family, components, config, parked)  # what stays: the caches park the encoders
    mode = config.model.quantize
    offloaded = block_swap.offloaded_bytes(model, tc.offload.blocks, mode)
    estimate = estimate_memory(model, frozen, profile, micro_batch, tc, shards, stage, processes, mode, offloaded)
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s %.1fM parameters (%.1fM trainable), %.2f GFLOPs per image per training step at %d px",
        family.denoiser,
        params / 1e6,
        sum(p.numel() for _, p in trainable(model)) / 1e6,
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
    return profile, estimate


@dataclass
class _EvalDenoiser:
    """The denoiser as sampling, validation and export see it: the EMA weights (the training ones without EMA), in
    an ordinary, unsharded module."""

    accelerator: Accelerator
    model: Any  # as prepared: DDP-wrapped, or sharded by FSDP2
    ema: EMA | None
    template: torch.nn.Module | None  # FSDP2: the model's structure on the meta device

    def copy(self, everywhere: bool = False) -> torch.nn.Module | None:
        """A denoiser holding the EMA weights (the training one is left untouched), on the main process or on
        ``everywhere``; None on the other processes. Without EMA and sharding, the training denoiser itself.

        Collective under FSDP2: every process calls it, the weights are gathered whole from the shards.
        """
        accelerator, ema = self.accelerator, self.ema
        keep = everywhere or accelerator.is_main_process
        model = unwrap(accelerator, self.model)
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


def _validation(run: _Run, validation: ValidationSet | None) -> float | None:
    """Validation loss with the EMA weights (the ones exported) on the main process (None on the others): swapped into
    the training denoiser and back out, or under FSDP2 in an unsharded copy (collective)."""
    accelerator, ema, evaluated = run.accelerator, run.ema, run.eval
    args = (run.predict, run.diffusion, validation, run.micro_batch, run.autocast)
    if ema is not None:
        ema.catch_up(unwrap(accelerator, evaluated.model))  # every process: the steps not averaged yet
    if evaluated.template is not None:
        copy = evaluated.copy()
        return None if copy is None else validation_loss(copy, *args)
    if not accelerator.is_main_process:
        return None
    model = unwrap(accelerator, evaluated.model)
    parameters = [p for _, p in trainable(model)]
    if ema is not None:
        ema.store(parameters)
        ema.copy_to(parameters)
    try:
        return validation_loss(model, *args)
    finally:
        if ema is not None:
            ema.restore(parameters)


def _pipeline(run: _Run, model: torch.nn.Module) -> Pipeline:
    """The model with ``model`` as its denoiser, sampled with the ``sample`` settings on the training device."""
    sample = run.config.sample
    return Pipeline(
        text_encoders.components_with(run.family, run.components, model),
        run.family,
        sample.scheduler,
        run.config.train.objective,
        {"num_inference_steps": sample.num_inference_steps, "guidance_scale": sample.guidance_scale},
        run.accelerator.device,
    )


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


def _fidelity(scorer, run: _Run, model: torch.nn.Module, log_path: Path) -> None:
    """FID / KID / CLIP score of the EMA weights sampled with the ``sample`` settings: ``fidelity/step-XXXXXX/``, the
    log record of the step and the trackers. Every process draws its share of the images."""
    accelerator, step, config = run.accelerator, run.counters.step, run.config
    out_dir = run.out / "fidelity" / f"step-{step:06d}"
    scorer.to(accelerator.device)
    try:
        result = scorer.score(
            _pipeline(run, model), out_dir, seed=config.train.seed, batch_size=config.train.fidelity.batch_size
        )
    finally:
        scorer.to("cpu")
        placement.park(run.components, run.parked)  # the pipeline moved every component to the device
        block_swap.settle(model)
    values = {k: result[k] for k in ("fid", "kid_mean", "clip_score") if k in result}
    if accelerator.is_main_process:
        logger.info("fidelity at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        append_to_log(log_path, step, values)
        accelerator.log(values, step=step)


def _sample(run: _Run, model: torch.nn.Module | None) -> Path | None:
    """Validation prompts with fixed seeds drawn by ``model`` (the EMA weights, from ``_EvalDenoiser.copy``) on the
    main process: ``samples/step-XXXXXX.png`` and the trackers."""
    if model is None:  # not the main process
        return None
    config, step = run.config, run.counters.step
    out_dir = run.out / "samples" / f"step-{step:06d}"
    with run.autocast():  # a base held in the compute dtype or quantised, fp32 adapters
        prompts = in_prompts(config.train.sample_prompts, config.data.trigger)
        images = {run.family.condition: sample_images(config.sample.images)} if config.sample.images else {}
        result = _pipeline(run, model).generate(prompts, seed=config.train.seed, **images)
    placement.park(run.components, run.parked)  # the pipeline moved every component to the device
    block_swap.settle(model)
    grid = save_images(result.images, out_dir)
    grid.replace(out_dir.with_suffix(".png"))
    log_images(run.accelerator, result.images, step)
    return out_dir.with_suffix(".png")

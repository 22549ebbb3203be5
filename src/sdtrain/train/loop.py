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
import shutil
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from sdtrain.config import Config, save_config
from sdtrain.data.cache import CachedStream, IterableStream, OnlineStream, build_memory_cache
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.unet import build_unet, load_unet
from sdtrain.models.vae import downsample_factor, load_vae
from sdtrain.sample.pipeline import sampling_scheduler, save_images, txt2img
from sdtrain.train import checkpoint, objective
from sdtrain.train.optim import lr_factor, make_optimizer, set_lr
from sdtrain.train.progress import Progress
from sdtrain.train.randomness import SharedDraws, rng_state, set_rng_state

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # exit code of `sdtrain train` after SIGTERM / SIGUSR1: checkpoint written, rerun to resume


class Preempted(RuntimeError):
    """Training stopped on SIGTERM / SIGUSR1 after writing a checkpoint; running the same command resumes."""


class _StopSignal:
    """Records SIGTERM / SIGUSR1 so the loop can finish its step, checkpoint and stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_disk(out: Path, model: torch.nn.Module, with_ema: bool) -> None:
    """Fail before training when the run directory is not writable or cannot hold two checkpoints."""
    probe = out / ".write-test"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise RuntimeError(f"cannot write to {out}: {e}") from None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint_bytes = params * (4 if with_ema else 3)  # weights, two Adam moments, EMA
    free = shutil.disk_usage(out).free
    if free < 2 * checkpoint_bytes:
        raise RuntimeError(
            f"{out} has {free / 2**30:.2f} GiB free, two checkpoints need {2 * checkpoint_bytes / 2**30:.2f} GiB"
        )


@dataclass
class Components:
    """The three models and the tokenizer; only ``unet`` trains."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: UNet2DConditionModel


def load_components(config: Config) -> Components:
    """Load the frozen text encoder and autoencoder, and build or load the UNet, as the config says."""
    m = config.model
    te_path, te_sub = m.text_encoder.path, m.text_encoder.subfolder
    if m.pretrained and m.text_encoder.path == "minilm" and m.text_encoder.subfolder is None:
        te_path, te_sub = m.pretrained, "text_encoder"  # a pipeline's own encoder wins over the default
    text_encoder, tokenizer = load_text_encoder(
        te_path, te_sub, m.text_encoder.max_length, m.text_encoder.dtype, m.text_encoder.trust_remote_code
    )
    vae_path, vae_sub = (m.vae.path, m.vae.subfolder) if m.vae.path else (m.pretrained, "vae")
    vae = load_vae(vae_path, vae_sub, m.vae.dtype)
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


def export_pipeline(components: Components, objective_config, out_dir: str | Path) -> Path:
    """Save a plain diffusers StableDiffusionPipeline folder (Euler scheduler, no safety checker)."""
    pipe = assemble_pipeline(components, objective_config)
    pipe.save_pretrained(out_dir, safe_serialization=True)
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
    tensors, _, _ = checkpoint.load_checkpoint(path)
    config.model.unet.from_scratch = True  # the weights come from the checkpoint, not from a pretrained UNet
    components = load_components(config)
    weights = dict(tensors["unet"])
    weights.update(tensors.get("ema", {}))
    components.unet.load_state_dict(weights)
    return export_pipeline(components, config.train.objective, out_dir or run_dir / "export" / path.name)


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


@dataclass
class Counters:
    """Where a run stands; saved in every checkpoint's state.json."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0


def save_training_state(
    accelerator: Accelerator, root: Path, keep: int, unet, optimizer, ema, stream, generator, counters: Counters
) -> None:
    """Checkpoint everything a bit-exact resume needs: weights, EMA, optimizer, every rank's RNGs and data position.

    Collective: every rank calls it; only the main process writes.
    """
    model = accelerator.unwrap_model(unet)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"non-finite weights at step {counters.step}: checkpoint not written")
    data_states = accelerator.gather_for_metrics([stream.state()], use_gather_object=True)
    rng_states = accelerator.gather_for_metrics([rng_state(generator)], use_gather_object=True)
    if not accelerator.is_main_process:
        return
    tensors = {"unet": model.state_dict()}
    ema_meta = {}
    if ema is not None:
        tensors["ema"] = dict(zip([n for n, _ in model.named_parameters()], ema.shadow_params))
        ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    objects = {"optimizer": optimizer.state_dict()} | {f"rng-{i}": s for i, s in enumerate(rng_states)}
    if accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker
        objects["scaler"] = accelerator.scaler.state_dict()
    state = {**dataclasses.asdict(counters), "ema": ema_meta, "data": data_states}
    try:
        checkpoint.save_checkpoint(root, counters.step, tensors, objects, state, keep=keep)
    except OSError as e:  # full disk, permissions: the temporary folder is gone, the previous checkpoint intact
        previous = checkpoint.find_latest(root)
        raise RuntimeError(
            f"could not write the checkpoint of step {counters.step} ({e}); {previous or 'no earlier checkpoint'} is "
            "intact: free some space and run the same command to resume"
        ) from e


def load_training_state(path: Path, accelerator: Accelerator, unet, optimizer, ema, stream, generator) -> Counters:
    """Restore what :func:`save_training_state` wrote; returns the counters."""
    tensors, objects, state = checkpoint.load_checkpoint(path)
    model = accelerator.unwrap_model(unet)
    model.load_state_dict(tensors["unet"])
    optimizer.load_state_dict(objects["optimizer"])
    if ema is not None:
        shadow = [tensors["ema"][n] for n, _ in model.named_parameters()]
        ema.load_state_dict({**state["ema"], "shadow_params": shadow})
        ema.to(accelerator.device)
    if accelerator.scaler is not None and "scaler" in objects:
        accelerator.scaler.load_state_dict(objects["scaler"])
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(state["data"]) != world:
        raise checkpoint.CheckpointError(
            f"{path} was written by {len(state['data'])} processes; resume it with the same number, not {world}"
        )
    set_rng_state(objects[f"rng-{rank}"], generator)
    stream.load_state(state["data"][rank])
    return Counters(**{f.name: state[f.name] for f in dataclasses.fields(Counters)})


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
    # 1. Accelerator, seeds, run directory
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", tc.mixed_precision) != tc.mixed_precision:
        AcceleratorState._reset_state()  # a second run in this process (the Python API) with another precision
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation,
        # several processes on a machine without CUDA (`accelerate launch --multi_gpu` on CPUs): DDP over gloo
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
    )
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
    if accelerator.is_main_process:
        check_disk(out, unet, tc.ema_decay is not None)
    vae.to(device).requires_grad_(False).eval()
    text_encoder.to(device).requires_grad_(False).eval()
    unet.train()

    # 3. Data: a resumable stream of micro-batches, each process its own share
    micro_batch = tc.batch_size // (tc.gradient_accumulation * accelerator.num_processes)
    if micro_batch < 1:
        raise ValueError(
            f"train.batch_size={tc.batch_size} is smaller than gradient_accumulation x processes "
            f"({tc.gradient_accumulation} x {accelerator.num_processes})"
        )
    draws = SharedDraws(generator, rank, world, micro_batch)
    if accelerator.is_main_process:
        kind, accumulation = accelerator.distributed_type.value, tc.gradient_accumulation
        logger.info(
            "world size %d (%s on %s): global batch %d = micro-batch %d x accumulation %d x processes %d",
            *(world, kind, device, tc.batch_size, micro_batch, accumulation, world),
        )
    if batches is not None:
        stream = IterableStream(batches, vae, text_encoder, components.tokenizer, config.data.caption_dropout, device)
    elif config.data.cache_latents:
        cache = build_memory_cache(config.data, vae, text_encoder, components.tokenizer)
        if cache.skipped:
            logger.warning("skipped while caching: %s", cache.skipped.summary())
        stream = CachedStream(cache, vae, micro_batch, config.data.caption_dropout, device, tc.seed, rank, world)
    else:
        stream = OnlineStream(
            config.data, vae, text_encoder, components.tokenizer, micro_batch, device, tc.seed, rank, world
        )

    # 4. Objective, optimizer, EMA
    noise_scheduler = objective.make_noise_scheduler(tc.objective)
    optimizer = make_optimizer(unet, tc.optim)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = None
    if tc.ema_decay is not None:
        parameters = accelerator.unwrap_model(unet).parameters()
        ema = EMAModel(parameters, decay=tc.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
        ema.to(device)

    # 5. Resume from the newest valid checkpoint
    counters = Counters()
    latest = checkpoint.find_latest(ckpt_root)
    if latest is not None:
        counters = load_training_state(latest, accelerator, unet, optimizer, ema, stream, generator)
        logger.info("resumed from %s at step %d", latest, counters.step)
    ckpt_args = (accelerator, ckpt_root, tc.keep_checkpoints, unet, optimizer, ema, stream, generator, counters)

    # 6. The loop
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        _truncate_log(log_path, counters.step)  # steps logged after the checkpoint are trained (and logged) again
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    bar = Progress("train", tc.num_steps, budget, counters.step, disable=not accelerator.is_main_process)
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    consecutive_skips, stop, saved_at = 0, False, counters.step  # the decisions every rank takes alike
    started = time.perf_counter() - counters.train_seconds
    stop_signal = _StopSignal().__enter__()
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
                with accelerator.autocast():
                    loss, _ = objective.diffusion_loss(unet(noisy, t, cond).sample, target, weights)
                accelerator.backward(loss)
                step_loss += loss.detach() / tc.gradient_accumulation
                if accelerator.sync_gradients:
                    max_norm = tc.clip_norm if tc.clip_norm is not None else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_norm)
                    # 6d. one all-reduce (max) makes every rank agree on: a non-finite loss or gradient on any
                    # rank, a stop signal received by any rank, and the elapsed time (so a time budget ends the
                    # run on the same step everywhere)
                    finite = torch.isfinite(step_loss) & torch.isfinite(torch.as_tensor(grad_norm, device=device))
                    flags = torch.tensor(
                        [0.0, float(stop_signal.received is not None), time.perf_counter() - started],
                        device=device,
                        dtype=torch.float64,
                    )
                    flags[0] = (~finite).double()
                    flags = accelerator.reduce(flags, reduction="max")
                    nonfinite, stop, counters.train_seconds = bool(flags[0]), bool(flags[1]), float(flags[2])
                    if not nonfinite:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        # 6e. EMA, counters, logs; a skipped step leaves weights and EMA unchanged
        if nonfinite:
            counters.skipped_steps += 1
            consecutive_skips += 1
            logger.warning("non-finite loss or gradient at step %d: step skipped", counters.step)
            if consecutive_skips >= tc.max_consecutive_skips:
                raise RuntimeError(
                    f"{consecutive_skips} consecutive steps had a non-finite loss or gradient (last: step "
                    f"{counters.step}); the newest checkpoint in {ckpt_root} holds finite weights. Lower the "
                    "learning rate, or use bf16 instead of fp16."
                )
        else:
            consecutive_skips = 0
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
        counters.step += 1
        counters.samples_seen += tc.batch_size
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        bar.update(counters.step, counters.train_seconds)
        if counters.step % tc.log_every == 0 or counters.step == tc.num_steps:
            mean_loss = accelerator.reduce(window_loss / window_steps, reduction="mean").item()  # over ranks
            record = {
                "step": counters.step,
                "loss": mean_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": window_steps * tc.batch_size / (time.perf_counter() - window_start),
                "skipped_steps": counters.skipped_steps,
                "skipped_samples": dict(stream.skipped),  # bad inputs by reason (corrupt, empty caption, ...)
            }
            if accelerator.is_main_process:
                postfix = {"loss": f"{record['loss']:.4f}", "img_s": f"{record['images_per_s']:.0f}"}
                bar.update(counters.step, counters.train_seconds, **postfix)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
        # 6f. checkpoints and validation samples
        if counters.step % tc.save_every == 0:
            save_training_state(*ckpt_args)
            saved_at = counters.step
        if tc.sample_every and counters.step % tc.sample_every == 0 and tc.sample_prompts:
            if accelerator.is_main_process:
                _sample(components, unet, ema, accelerator, config, out / "samples" / f"step-{counters.step:06d}")
        # 6g. preemption: all ranks saw the flag in 6d, so they checkpoint together and stop
        if stop:
            bar.close()
            stop_signal.__exit__()
            if saved_at != counters.step:
                save_training_state(*ckpt_args)
            accelerator.wait_for_everyone()
            raise Preempted(f"stopped by signal at step {counters.step}; checkpoint written to {ckpt_root}")
    stop_signal.__exit__()
    bar.close()

    # 7. Final checkpoint, export with EMA weights, validation samples
    if saved_at != counters.step:
        save_training_state(*ckpt_args)
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        export = _with_ema(components, unet, ema, accelerator)
        export_pipeline(export, tc.objective, final)
        if tc.sample_prompts:
            _sample(components, unet, ema, accelerator, config, out / "samples" / f"step-{counters.step:06d}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written before a crash, and about to be written again by the resumed run)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _with_ema(components: Components, unet, ema, accelerator) -> Components:
    """Components whose UNet is a copy holding the EMA weights (the training UNet is left untouched)."""
    model = accelerator.unwrap_model(unet)
    if ema is None:
        return Components(components.vae, components.text_encoder, components.tokenizer, model)
    copy = UNet2DConditionModel.from_config(model.config).to(model.device)
    copy.load_state_dict(model.state_dict())
    ema.copy_to(copy.parameters())
    return Components(components.vae, components.text_encoder, components.tokenizer, copy.eval())


def _sample(components, unet, ema, accelerator, config: Config, out_dir: Path) -> Path:
    pipe = assemble_pipeline(
        _with_ema(components, unet, ema, accelerator), config.train.objective, config.sample.scheduler
    )
    result = txt2img(
        pipe,
        config.train.sample_prompts,
        num_inference_steps=config.sample.num_inference_steps,
        guidance_scale=config.sample.guidance_scale,
        seed=config.train.seed,
    )
    unet.train()
    grid = save_images(result.images, out_dir)
    grid.replace(out_dir.with_suffix(".png"))
    return out_dir.with_suffix(".png")

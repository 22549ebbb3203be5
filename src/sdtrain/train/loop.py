"""The UNet training loop: one linear function, top to bottom.

``train(config)`` is what ``sdtrain train`` runs; ``StableDiffusion.fit`` calls the same function with components and
batches it already has. Helpers are small functions of their own (components in ``sdtrain.models``, the math in
``sdtrain.train.objective``, batches in ``sdtrain.data.cache``, checkpoints in ``sdtrain.train.checkpoint``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sdtrain.config import Config, save_config
from sdtrain.data.cache import CachedStream, IterableStream, OnlineStream, build_memory_cache
from sdtrain.models.text import hidden_size, load_text_encoder
from sdtrain.models.unet import build_unet, load_unet
from sdtrain.models.vae import downsample_factor, load_vae
from sdtrain.sample.pipeline import sampling_scheduler, save_images, txt2img
from sdtrain.train import checkpoint, objective
from sdtrain.train.optim import lr_factor, make_optimizer, set_lr

logger = logging.getLogger(__name__)


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
    text_encoder, tokenizer = load_text_encoder(te_path, te_sub, m.text_encoder.max_length, m.text_encoder.dtype)
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


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor: the file is read back with torch.load(weights_only=True)
        "numpy": [torch.from_numpy(v.astype(np.int64)) if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(_tuple(state["python"]))
    np.random.set_state(tuple(v.numpy().astype(np.uint32) if torch.is_tensor(v) else v for v in state["numpy"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


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
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.gradient_accumulation)
    out = Path(tc.output_dir)
    ckpt_root = out / "checkpoints"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    seed = tc.seed + accelerator.process_index
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = accelerator.device
    generator = torch.Generator(device).manual_seed(seed)  # noise, timesteps, caption dropout

    # 2. Components: frozen encoders on the device, the UNet in fp32 master weights
    components = components or load_components(config)
    vae, text_encoder, unet = components.vae, components.text_encoder, components.unet
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
    rank, world = accelerator.process_index, accelerator.num_processes
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
        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=tc.ema_decay, use_ema_warmup=True, power=2 / 3)
        ema.to(device)
    param_names = [n for n, _ in accelerator.unwrap_model(unet).named_parameters()]

    # 5. Resume from the newest valid checkpoint
    step, samples_seen, skipped_steps, train_seconds = 0, 0, 0, 0.0
    latest = checkpoint.find_latest(ckpt_root)
    if latest is not None:
        tensors, objects, state = checkpoint.load_checkpoint(latest)
        accelerator.unwrap_model(unet).load_state_dict(tensors["unet"])
        optimizer.load_state_dict(objects["optimizer"])
        if ema is not None:
            ema.load_state_dict({**state["ema"], "shadow_params": [tensors["ema"][n] for n in param_names]})
            ema.to(device)
        rng = objects[f"rng-{rank}"] if f"rng-{rank}" in objects else objects["rng-0"]
        _set_rng_state(rng, generator)
        stream.load_state(state["data"][rank] if isinstance(state["data"], list) else state["data"])
        step, samples_seen = state["step"], state["samples_seen"]
        skipped_steps, train_seconds = state["skipped_steps"], state["train_seconds"]
        logger.info("resumed from %s at step %d", latest, step)

    def save(step: int) -> None:
        weights = {n: p for n, p in accelerator.unwrap_model(unet).named_parameters()}
        if not all(torch.isfinite(p).all() for p in weights.values()):
            raise RuntimeError(f"non-finite weights at step {step}: checkpoint not written")
        data_states = accelerator.gather_for_metrics([stream.state()], use_gather_object=True)
        rng_states = accelerator.gather_for_metrics([_rng_state(generator)], use_gather_object=True)
        if not accelerator.is_main_process:
            return
        tensors = {"unet": accelerator.unwrap_model(unet).state_dict()}
        ema_meta = {}
        if ema is not None:
            tensors["ema"] = dict(zip(param_names, ema.shadow_params))
            ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        objects = {"optimizer": optimizer.state_dict()} | {f"rng-{i}": s for i, s in enumerate(rng_states)}
        state = {
            "step": step,
            "samples_seen": samples_seen,
            "skipped_steps": skipped_steps,
            "train_seconds": train_seconds,
            "ema": ema_meta,
            "data": data_states,
        }
        checkpoint.save_checkpoint(ckpt_root, step, tensors, objects, state, keep=tc.keep_checkpoints)

    # 6. The loop
    log_path = out / "log.jsonl"
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    bar = tqdm(total=tc.num_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    started = time.perf_counter() - train_seconds
    while step < tc.num_steps and (budget is None or time.perf_counter() - started < budget):
        progress = max(step / tc.num_steps, (time.perf_counter() - started) / budget if budget else 0.0)
        set_lr(optimizer, tc.optim.lr * lr_factor(step, progress, tc.optim))
        step_loss = 0.0
        for _ in range(tc.gradient_accumulation):
            # 6a. a micro-batch: latents sampled from the posterior, text embeddings with caption dropout
            latents, cond = stream.next(generator)
            # 6b. noise it at random timesteps
            noise = objective.sample_noise(latents, tc.objective.noise_offset, generator)
            timesteps = objective.sample_timesteps(latents.shape[0], tc.objective.num_train_timesteps, device, generator)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = objective.target(noise_scheduler, latents, noise, timesteps)
            weights = objective.loss_weights(noise_scheduler, timesteps, tc.objective.snr_gamma)
            # 6c. predict and backpropagate
            with accelerator.accumulate(unet), accelerator.autocast():
                prediction = unet(noisy, timesteps, cond).sample
                loss, _ = objective.diffusion_loss(prediction, target, weights)
                accelerator.backward(loss)
                step_loss += loss.detach().item() / tc.gradient_accumulation
                if accelerator.sync_gradients:
                    max_norm = tc.clip_norm if tc.clip_norm is not None else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_norm)
                    # 6d. non-finite guard: gradients are all-reduced, so every rank takes the same decision
                    if torch.isfinite(torch.as_tensor(grad_norm)):
                        optimizer.step()
                    else:
                        skipped_steps += 1
                        logger.warning("non-finite gradient at step %d: step skipped", step)
                    optimizer.zero_grad(set_to_none=True)
        # 6e. EMA, counters, logs
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        step += 1
        samples_seen += tc.batch_size
        window_loss += step_loss
        window_steps += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.num_steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "loss": window_loss / window_steps,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": window_steps * tc.batch_size / elapsed,
                "skipped_steps": skipped_steps,
            }
            if accelerator.is_main_process:
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        train_seconds = time.perf_counter() - started
        # 6f. checkpoints and validation samples
        if step % tc.save_every == 0:
            save(step)
        if tc.sample_every and step % tc.sample_every == 0 and tc.sample_prompts and accelerator.is_main_process:
            _sample(components, unet, ema, accelerator, config, out / "samples" / f"step-{step:06d}")
    bar.close()

    # 7. Final checkpoint, export with EMA weights, validation samples
    if not (ckpt_root / checkpoint.step_dir(ckpt_root, step).name).exists():
        save(step)
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        export = _with_ema(components, unet, ema, accelerator)
        export_pipeline(export, tc.objective, final)
        if tc.sample_prompts:
            _sample(components, unet, ema, accelerator, config, out / "samples" / f"step-{step:06d}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


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
    pipe = assemble_pipeline(_with_ema(components, unet, ema, accelerator), config.train.objective, config.sample.scheduler)
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

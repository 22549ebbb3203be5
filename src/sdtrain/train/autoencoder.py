"""Stage 1: train the autoencoder the UNet will work in (``sdtrain train-vae``), or fine-tune one.

AutoencoderKL: L1 + L2 reconstruction of a posterior sample plus a small KL term. VQModel: the same reconstruction loss
plus diffusers' codebook / commitment loss; codebook usage is reported. AutoencoderDC (Sana's kind: deterministic
latents, residual blocks with pixel-(un)shuffle resampling): the reconstruction loss alone, as DC-AE trains. LDM's two
other terms are options: ``train.perceptual_weight`` (LPIPS, ``sdtrain.evaluate.lpips``) and ``train.disc_weight`` (a
PatchGAN critic, hinge loss, adaptively weighted). ``model.pretrained`` fine-tunes an existing autoencoder, with
``train.decoder_only`` its decoder alone (its latents unchanged). ``train.ema_decay`` keeps an EMA, which the metrics
and the export use. Training images are decoded once into memory, or streamed (``train.in_memory=false``,
``sdtrain.data.images``). Checkpoints every ``train.save_every`` steps; a rerun resumes bit for bit.
At the end: PSNR, SSIM (and LPIPS) on held-out images, the latent scaling factor (1 / std of the latents, as Stable
Diffusion computed 0.18215; a pretrained model keeps its own), a diffusers folder in ``output_dir/final`` with
``scaling_factor`` set in its config, and ``output_dir/reconstructions.png`` (held-out images above their
reconstructions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderDC, AutoencoderKL, VQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from sdtrain.config import AutoencoderConfig, AutoencoderModelConfig, ConfigError, save_config
from sdtrain.data.decode import DataError
from sdtrain.data.images import MemoryBatches, StreamedBatches, decode_all
from sdtrain.data.sources import list_records
from sdtrain.errors import Diverged
from sdtrain.evaluate.lpips import LPIPS, load_lpips
from sdtrain.evaluate.metrics import psnr, ssim
from sdtrain.models.discriminator import PatchDiscriminator, hinge_loss
from sdtrain.models.vae import downsample_factor, encode_moments, load_vae
from sdtrain.sample.pipeline import make_grid
from sdtrain.train import checkpoint
from sdtrain.train.ema import EMA, ema_parameters
from sdtrain.train.optim import set_lr, warmup_times_cosine
from sdtrain.train.preemption import Preempted, StopSignal, StopWhileSettingUp
from sdtrain.train.preflight import check_autoencoder_run
from sdtrain.train.progress import Progress
from sdtrain.train.randomness import rng_state, set_rng_state
from sdtrain.train.run import append_record, count_skip, run_lock
from sdtrain.train.state import Counters, trainable, truncate_log

logger = logging.getLogger(__name__)


def build_autoencoder(config: AutoencoderModelConfig) -> AutoencoderKL | VQModel | AutoencoderDC:
    """A fresh AutoencoderKL, VQModel or AutoencoderDC with ``len(block_out_channels) - 1`` downsamplings."""
    levels = len(config.block_out_channels)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        mid_block_add_attention=config.mid_block_attention,
    )
    if config.kind == "dc":
        return build_dc(config)
    if config.kind == "kl":
        vae = AutoencoderKL(**common)
        with torch.no_grad():
            # start the posterior narrow (std e^-3 instead of 1): early training is not drowned in sampling noise,
            # which the small KL weight would otherwise take thousands of steps to shrink
            vae.quant_conv.bias[config.latent_channels :] = -6.0
        return vae
    return VQModel(**common, num_vq_embeddings=config.num_vq_embeddings, vq_embed_dim=config.latent_channels)


def build_dc(config: AutoencoderModelConfig) -> AutoencoderDC:
    """A fresh AutoencoderDC: residual blocks at every level (with ``model.mid_block_attention``, DC-AE's
    linear-attention blocks at the deepest), pixel-unshuffle down and pixel-shuffle up, as Sana's autoencoder."""
    levels = len(config.block_out_channels)
    deepest = config.block_out_channels[-1]
    attention = ("EfficientViTBlock",) if config.mid_block_attention else ("ResBlock",)
    blocks = ("ResBlock",) * (levels - 1) + attention
    scales = ((),) * (levels - 1) + (((5,),) if config.mid_block_attention else ((),))
    return AutoencoderDC(
        in_channels=3,
        latent_channels=config.latent_channels,
        attention_head_dim=math.gcd(32, deepest),  # DC-AE's 32 where the width allows
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=tuple(config.block_out_channels),
        decoder_block_out_channels=tuple(config.block_out_channels),
        encoder_layers_per_block=(config.layers_per_block,) * levels,
        decoder_layers_per_block=(config.layers_per_block,) * levels,
        encoder_qkv_multiscales=scales,
        decoder_qkv_multiscales=scales,
    )


def load_trainable(config: AutoencoderConfig) -> AutoencoderKL | VQModel | AutoencoderDC:
    """``model.pretrained`` to fine-tune, in fp32: whole, or its decoder only (``train.decoder_only``: the encoder,
    its quant_conv and a VQ codebook frozen, so its latents do not change). Its downsampling factor must divide the
    resolution and the crops."""
    vae = load_vae(config.model.pretrained, config.model.subfolder).requires_grad_(True)
    if config.train.decoder_only:
        frozen = [vae.encoder] + ([] if isinstance(vae, AutoencoderDC) else [vae.quant_conv])
        frozen += [vae.quantize] if isinstance(vae, VQModel) else []
        for module in frozen:
            module.requires_grad_(False)
    factor = downsample_factor(vae)
    for key, side in (("data.resolution", config.data.resolution), ("train.crop_size", config.train.crop_size)):
        if side is not None and side % factor:
            raise ConfigError(
                f"{key}={side} is not a multiple of {config.model.pretrained}'s downsampling factor {factor}"
            )
    return vae


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1


def reconstruction_loss(
    vae, x: torch.Tensor, config, perceptual: LPIPS | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """One batch's reconstruction loss (weighted L1 + L2, + LPIPS with a ``perceptual`` network), its weighted
    regulariser (KL, or VQ's codebook and commitment terms), the reconstruction, and the parts for the log
    (detached)."""
    tc = config.train
    if isinstance(vae, VQModel):
        out = vae(x)
        rec, reg = out.sample.float(), out.commit_loss.float().mean()
        reg_weight = 1.0  # diffusers' VQ loss already weighs commitment (beta) against the codebook term
    elif isinstance(vae, AutoencoderDC):  # deterministic latents, no regulariser
        rec = vae.decode(vae.encode(x).latent).sample.float()
        reg, reg_weight = torch.zeros((), device=x.device), 0.0
    else:
        posterior = vae.encode(x).latent_dist
        if posterior.parameters.dtype != torch.float32:  # under bf16 autocast: sample and sum the KL in fp32
            posterior = DiagonalGaussianDistribution(posterior.parameters.float())
        rec = vae.decode(posterior.sample()).sample.float()
        reg, reg_weight = posterior.kl().mean() / x[0].numel(), tc.kl_weight
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).pow(2).mean()
    parts = {"l1": l1.detach(), "l2": l2.detach(), "reg": reg.detach()}
    rec_loss = tc.l1_weight * l1 + tc.l2_weight * l2
    if perceptual is not None:
        distance = perceptual(rec, x).mean()
        rec_loss = rec_loss + tc.perceptual_weight * distance
        parts["lpips"] = distance.detach()
    return rec_loss, reg_weight * reg, rec, parts


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """LDM's balance of the adversarial term: ``|grad rec_loss| / (|grad gan_loss| + 1e-4)`` at the decoder's last
    layer, clamped to [0, 1e4] and detached, so the adversarial gradient there is as large as the reconstruction's
    (times ``train.disc_weight``) whatever the two losses' scales."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor, batch_size: int = 128) -> dict[str, Any]:
    """Scaling factor (1 / std of the latents) and, for a VQModel, codebook usage."""
    latents, used = [], set()
    for start in range(0, len(images), batch_size):
        x = _to_float(images[start : start + batch_size]).to(vae.device)
        if isinstance(vae, VQModel):
            h = vae.encode(x).latents
            _, _, (_, _, indices) = vae.quantize(h)
            used.update(indices.flatten().tolist())
            latents.append(h.float().cpu())
        elif isinstance(vae, AutoencoderDC):
            latents.append(vae.encode(x).latent.float().cpu())
        else:
            latents.append(vae.encode(x).latent_dist.sample().float().cpu())
    stacked = torch.cat(latents)
    stats = {"scaling_factor": float(1.0 / stacked.std()), "latent_mean": float(stacked.mean())}
    if isinstance(vae, VQModel):
        stats["codebook_usage"] = len(used) / vae.config.num_vq_embeddings
    return stats


@torch.no_grad()
def reconstruction_metrics(
    vae, images: torch.Tensor, batch_size: int = 128, perceptual: LPIPS | None = None
) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and, with a ``perceptual`` network, LPIPS of deterministic reconstructions (posterior
    mean / nearest codes)."""
    values_p, values_s, values_l = [], [], []
    for start in range(0, len(images), batch_size):
        x = _to_float(images[start : start + batch_size]).to(vae.device)
        rec = _reconstruct(vae, x)
        values_p.append(psnr(rec, x).cpu())
        values_s.append(ssim(rec, x).cpu())
        if perceptual is not None:
            values_l.append(perceptual(rec, x).cpu())
    metrics = {"psnr": float(torch.cat(values_p).mean()), "ssim": float(torch.cat(values_s).mean())}
    if perceptual is not None:
        metrics["lpips"] = float(torch.cat(values_l).mean())
    return metrics


@torch.no_grad()
def reconstruction_grid(vae, images: torch.Tensor) -> Image.Image:
    """Held-out images (top row) above their deterministic reconstructions (bottom row)."""
    x = _to_float(images).to(vae.device)
    pixels = ((torch.cat([x, _reconstruct(vae, x)]) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return make_grid([Image.fromarray(p.numpy()) for p in pixels], columns=len(images))


def _reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """The deterministic reconstruction (posterior mean / nearest codes), clamped to [-1, 1]."""
    return vae.decode(encode_moments(vae, x)[0]).sample.clamp(-1, 1)


def train_autoencoder(config: AutoencoderConfig) -> dict[str, Any]:
    """Train, evaluate and export an autoencoder; a rerun of the same config resumes from its newest checkpoint.

    Returns:
        Metrics: ``path`` (the export), ``psnr``, ``ssim``, ``scaling_factor``, ``steps``, ``seconds``,
        ``skipped_steps``; for VQ ``codebook_usage``, with LPIPS ``lpips``, for a pretrained model
        ``measured_scaling_factor``. Also written to ``output_dir/final/metrics.json``.

    Raises:
        RunLocked: another process trains in ``output_dir``.
        Preempted: SIGTERM or SIGUSR1 arrived; the step in progress was finished and checkpointed.
    """
    check_autoencoder_run(config)  # before the run folder is made
    with run_lock(config.train.output_dir, main_process=True), StopWhileSettingUp() as setup:
        return _train_autoencoder(config, setup)


def _train_autoencoder(config: AutoencoderConfig, setup: StopWhileSettingUp) -> dict[str, Any]:
    """:func:`train_autoencoder`'s stages, top to bottom (a stop signal before the loop stops it through ``setup``)."""
    tc = config.train
    # 1. Seeds, run directory, device, precision, the perceptual network (its weight files before any image is read)
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tc.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.mixed_precision=bf16: {torch.cuda.get_device_name()} has no bf16; use 'no'")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.mixed_precision == "bf16")
    perceptual = _perceptual_network(tc, device)

    # 2. Model, discriminator (train.disc_weight > 0) and their optimizers
    vae = (load_trainable(config) if config.model.pretrained else build_autoencoder(config.model)).to(device).train()
    if isinstance(vae, VQModel):
        vae.quantize.beta = tc.commitment_weight  # diffusers' VectorQuantizer: beta * ||sg(z_q) - z||^2
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=tc.lr, weight_decay=0.0)
    ema = EMA(ema_parameters(vae), tc.ema_decay) if tc.ema_decay is not None else None
    critic = critic_optimizer = None
    if tc.disc_weight > 0:
        critic = PatchDiscriminator(tc.disc_layers, tc.disc_channels).to(device).train()
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=tc.disc_lr or tc.lr, betas=(0.5, 0.9))

    # 3. Data: held-out images in memory; training images in memory or streamed from disk (train.in_memory)
    generator = torch.Generator().manual_seed(tc.seed)
    records, eval_images, batches = _data(config, generator)
    m = _Models(vae, optimizer, ema, critic, critic_optimizer, generator, batches)

    # 4. Resume from the newest valid checkpoint
    root, log_path = out / "checkpoints", out / "log.jsonl"
    counters = Counters()
    latest = checkpoint.find_latest(root)
    if latest is not None:
        counters = _load_state(latest, config, m)
        logger.info("resumed from %s at step %d", latest, counters.step)
    truncate_log(log_path, counters.step)

    # 5. The loop: random batches (and crops), warm-up then cosine decay to 10 %, by steps or by time budget
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    saved_at, consecutive_skips = counters.step, 0
    started = time.perf_counter() - counters.train_seconds
    bar = Progress("train-vae", tc.num_steps, budget, counters.step)
    # the SIGTERM / SIGUSR1 handlers are the caller's again (and the bar closed) when the loop ends, raises or stops
    setup.done()
    with StopSignal() as stop_signal, bar:
        while counters.step < tc.num_steps and (budget is None or time.perf_counter() - started < budget):
            progress = max(counters.step / tc.num_steps, (time.perf_counter() - started) / budget if budget else 0)
            lr = tc.lr * warmup_times_cosine(counters.step, progress)
            set_lr(optimizer, lr)
            if critic_optimizer is not None:
                set_lr(critic_optimizer, lr * (tc.disc_lr or tc.lr) / tc.lr)
            # 5a-5c. the autoencoder's step and the critic's; a non-finite loss or gradient skips both
            loss, parts, finite = _step(config, m, batches.next(), autocast, perceptual, counters.step)
            if finite:
                consecutive_skips = 0
            else:
                consecutive_skips += 1
                count_skip(counters, consecutive_skips, tc.max_consecutive_skips, root, "Lower train.lr or "
                           "train.disc_weight.")  # fmt: skip
            counters.step += 1
            counters.train_seconds = time.perf_counter() - started
            bar.update(counters.step, counters.train_seconds)
            # 5d. log, checkpoint, and stop cleanly on SIGTERM / SIGUSR1
            if counters.step % tc.log_every == 0:
                bar.update(counters.step, counters.train_seconds, loss=f"{loss.item():.4f}")
                record = {"step": counters.step, "loss": loss.item(), "lr": lr}
                record |= {k: float(v) for k, v in parts.items()} | {"skipped_steps": counters.skipped_steps}
                append_record(log_path, record)
            if counters.step % tc.save_every == 0:
                _save_state(root, tc.keep_checkpoints, counters, config, m)
                saved_at = counters.step
            if stop_signal.received is not None:
                bar.close()
                if saved_at != counters.step:
                    _save_state(root, tc.keep_checkpoints, counters, config, m)
                raise Preempted(f"stopped by signal at step {counters.step}; checkpoint written to {root}")
    bar.close()
    if saved_at != counters.step:  # the end of the run: a checkpoint a larger train.num_steps continues from
        _save_state(root, tc.keep_checkpoints, counters, config, m)

    # 6. Evaluate, set the scaling factor, export (with the EMA weights where there is an EMA)
    return _finish(config, m, records, eval_images, perceptual, counters)


def _perceptual_network(tc, device: torch.device) -> LPIPS | None:
    """LPIPS for ``train.perceptual_weight`` > 0 (a missing weight file is a config error, raised now)."""
    if tc.perceptual_weight <= 0:
        return None
    try:
        return load_lpips(tc.lpips_vgg, tc.lpips_lin).to(device)
    except FileNotFoundError as e:
        raise ConfigError(f"train.perceptual_weight={tc.perceptual_weight}: {e}") from None


def _data(config: AutoencoderConfig, generator: torch.Generator):
    """``(training records, held-out images, training batches)``: the held-out images (``eval_data``, or the last
    ``train.eval_images`` records) decoded into memory, the training ones decoded once or streamed."""
    data, tc = config.data, config.train
    records = list_records(data.path, data.image_column, data.caption_column, data.skip_bad_rows)
    if config.eval_data:
        eval_records = list_records(config.eval_data, data.image_column, data.caption_column, data.skip_bad_rows)
    else:
        if len(records) <= tc.eval_images:
            raise DataError(f"{len(records)} images leave none for training after {tc.eval_images} held out")
        records, eval_records = records[: -tc.eval_images], records[-tc.eval_images :]
    eval_images, _ = decode_all(eval_records[: tc.eval_images], data.resolution, "held-out images")
    if tc.in_memory:
        batches = MemoryBatches(records, data.resolution, tc.batch_size, generator)
        if batches.skipped:
            logger.warning("skipped images: %s", batches.skipped.summary())
    else:
        batches = StreamedBatches(
            records, data.resolution, tc.batch_size, tc.seed, data.num_workers, data.max_bad_share
        )
    return records, eval_images, batches


def recolour(x: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` (B x 3 x H x W in [-1, 1]) with a ``share`` of its images recoloured: the hue turned by a random angle
    about the grey axis, the saturation scaled by 0.2-1.3 and the brightness by 0.5-1.2 (one 3 x 3 matrix per image,
    drawn from ``generator``), clamped to the range."""
    n = x.shape[0]
    draws = torch.rand(n, 4, generator=generator, device=generator.device).to(x.device)
    chosen, angle = draws[:, 0] < share, draws[:, 1] * 2 * math.pi
    saturation, brightness = 0.2 + 1.1 * draws[:, 2], 0.5 + 0.7 * draws[:, 3]
    grey = torch.full((3, 3), 1 / 3, device=x.device)
    axis = torch.ones(3, device=x.device) / math.sqrt(3)
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=x.dtype, device=x.device) / math.sqrt(3)
    eye = torch.eye(3, device=x.device)
    cos, sin = angle.cos().view(n, 1, 1), angle.sin().view(n, 1, 1)
    rotation = cos * eye + sin * cross + (1 - cos) * torch.outer(axis, axis)  # Rodrigues, about the grey axis
    matrix = brightness.view(n, 1, 1) * (grey + saturation.view(n, 1, 1) * rotation @ (eye - grey))
    recoloured = torch.einsum("nij,njhw->nihw", matrix, (x + 1) / 2).clamp(0, 1) * 2 - 1
    return torch.where(chosen.view(n, 1, 1, 1), recoloured.to(x.dtype), x)  # the others exactly as they were


def _step(config: AutoencoderConfig, m: _Models, batch: torch.Tensor, autocast, perceptual, step: int):
    """One training step on ``batch`` (randomly cropped to ``train.crop_size``): the autoencoder's (reconstruction +
    regulariser + the adversarial term once the critic is on), then the critic's; returns ``(loss, parts for the
    log, finite)``. A non-finite loss or gradient leaves weights, moments, critic and EMA unchanged."""
    tc, vae, critic, res = config.train, m.vae, m.critic, config.data.resolution
    x = _to_float(batch).to(vae.device)
    if tc.crop_size is not None and tc.crop_size < res:
        factor = downsample_factor(vae)
        top, left = (int(v) * factor for v in torch.randint(0, (res - tc.crop_size) // factor + 1, (2,),
                                                            generator=m.generator))  # fmt: skip
        x = x[:, :, top : top + tc.crop_size, left : left + tc.crop_size]
    if tc.color_augment:
        x = recolour(x, tc.color_augment, m.generator)
    # 5a. the autoencoder's step: reconstruction + regulariser (+ the adversarial term once the critic is on)
    adversarial = critic is not None and step >= tc.disc_start
    with autocast:
        rec_loss, reg_loss, rec, parts = reconstruction_loss(vae, x, config, perceptual)
        if adversarial:
            critic.requires_grad_(False)
            gan_loss = -critic(rec).float().mean()
    loss = rec_loss + reg_loss
    if adversarial:
        weight = tc.disc_weight * adaptive_weight(rec_loss, gan_loss, vae.decoder.conv_out.weight)
        loss = loss + weight * gan_loss
        parts.update(gan=gan_loss.detach(), gan_weight=weight)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(m.optimizer.param_groups[0]["params"], 1.0)
    # 5b. the critic's step: real crops against this step's reconstructions
    if adversarial:
        critic.requires_grad_(True)
        with autocast:
            critic_loss = hinge_loss(critic(x).float(), critic(rec.detach()).float())
        critic_loss.backward()
        norm = norm + torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        parts["critic"] = critic_loss.detach()
    # 5c. a non-finite loss or gradient skips the step for both: weights, moments and critic unchanged
    finite = bool(torch.isfinite(loss.detach() + norm))
    if finite:
        m.optimizer.step()
        if adversarial:
            m.critic_optimizer.step()
        if m.ema is not None:
            m.ema.tick(vae)
    m.optimizer.zero_grad(set_to_none=True)
    if m.critic_optimizer is not None:
        m.critic_optimizer.zero_grad(set_to_none=True)
    return loss, parts, finite


def _finish(config: AutoencoderConfig, m: _Models, records, eval_images, perceptual, counters: Counters) -> dict:
    """Evaluate, set the scaling factor, export (with the EMA weights where there is an EMA)."""
    tc, vae, out = config.train, m.vae, Path(config.train.output_dir)
    if m.ema is not None:
        m.ema.copy_to(ema_parameters(vae))
    vae.eval()
    metrics: dict[str, Any] = reconstruction_metrics(vae, eval_images, perceptual=perceptual)
    res = config.data.resolution
    sample = m.batches.images[:2048] if tc.in_memory else decode_all(records[:2048], res, "training images")[0]
    metrics.update(latent_statistics(vae, sample))
    metrics.update(steps=counters.step, seconds=counters.train_seconds, skipped=dict(m.batches.skipped))
    metrics["skipped_steps"] = counters.skipped_steps
    if config.model.pretrained:  # its latents' scale is what UNets trained on it expect: kept, the measured one told
        metrics["measured_scaling_factor"] = metrics["scaling_factor"]
        metrics["scaling_factor"] = vae.config.scaling_factor
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    final = out / "final"
    vae.save_pretrained(final, safe_serialization=True)
    (final / "metrics.json").write_text(json.dumps(metrics, indent=1))
    reconstruction_grid(vae, eval_images[:8]).save(out / "reconstructions.png")
    metrics["path"] = str(final)
    return metrics


@dataclass
class _Models:
    """What a stage-1 checkpoint holds besides its counters."""

    vae: AutoencoderKL | VQModel | AutoencoderDC
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    critic: PatchDiscriminator | None
    critic_optimizer: torch.optim.Optimizer | None
    generator: torch.Generator
    batches: MemoryBatches | StreamedBatches


def _save_state(root: Path, keep: int, counters: Counters, config: AutoencoderConfig, m: _Models):
    """A checkpoint of everything a bit-exact resume needs: weights, optimizer moments, critic, RNGs, counters."""
    tensors = {"vae": m.vae.state_dict()}
    objects = {"optimizer": m.optimizer.state_dict(), "rng": rng_state(m.generator)}
    ema_meta = {}
    if m.ema is not None:
        names = [n for n, _ in trainable(m.vae)]
        tensors["ema"] = dict(zip(names, m.ema.shadow_params))
        ema_meta = {k: v for k, v in m.ema.state_dict().items() if k != "shadow_params"}
    if m.critic is not None:
        tensors["critic"] = m.critic.state_dict()
        objects["critic_optimizer"] = m.critic_optimizer.state_dict()
    if not all(torch.isfinite(t).all() for t in tensors["vae"].values() if t.is_floating_point()):
        raise Diverged(f"non-finite weights at step {counters.step}: checkpoint not written")
    state = {
        **dataclasses.asdict(counters),
        "model": dataclasses.asdict(config.model),
        "critic": {"layers": config.train.disc_layers, "channels": config.train.disc_channels},
        "train_images": len(m.batches),
        "data": m.batches.state(),
        "ema": ema_meta,
    }
    checkpoint.save_or_keep_previous(root, counters.step, tensors, objects, state, keep)


def _load_state(path: Path, config: AutoencoderConfig, m: _Models) -> Counters:
    """Restore what :func:`_save_state` wrote into ``m``; returns the counters. The model must be the one the
    checkpoint was written for; a critic may be added (it starts fresh) or dropped on resume."""
    tensors, objects, state = checkpoint.load_checkpoint(path)
    wanted = dataclasses.asdict(config.model)
    if state["model"] != wanted:
        saved = ", ".join(f"model.{k}={state['model'].get(k)}" for k in wanted if state["model"].get(k) != wanted[k])
        raise checkpoint.CheckpointError(
            f"{path} holds an autoencoder built with {saved}: resume with those settings, or start a new run in "
            "another train.output_dir"
        )
    m.vae.load_state_dict(tensors["vae"])
    m.optimizer.load_state_dict(objects["optimizer"])
    if m.critic is not None and "critic" in tensors:
        critic = {"layers": config.train.disc_layers, "channels": config.train.disc_channels}
        if state["critic"] != critic:
            raise checkpoint.CheckpointError(
                f"{path} holds a discriminator with disc_layers={state['critic']['layers']}, "
                f"disc_channels={state['critic']['channels']}: resume with those (or train.disc_weight=0)"
            )
        m.critic.load_state_dict(tensors["critic"])
        m.critic_optimizer.load_state_dict(objects["critic_optimizer"])
    elif m.critic is not None:
        logger.info("the discriminator starts at step %d (the checkpoint has none)", state["step"])
    elif "critic" in tensors:
        logger.warning("train.disc_weight=0: the checkpoint's discriminator is left out from step %d", state["step"])
    if m.ema is not None and "ema" in tensors:
        shadow = [tensors["ema"][n] for n, _ in trainable(m.vae)]
        m.ema.load_state_dict({**state["ema"], "shadow_params": shadow})
        m.ema.to(next(m.vae.parameters()).device)
    elif m.ema is not None:
        logger.info("the EMA starts at step %d (the checkpoint has none)", state["step"])
    set_rng_state(objects["rng"], m.generator)
    if state["train_images"] != len(m.batches):
        logger.warning(
            "the checkpoint was trained on %d images, data.path now has %d: the run goes on with the new set",
            state["train_images"],
            len(m.batches),
        )
    elif state.get("data"):  # a streamed run's position (a set of another size starts its epochs afresh)
        m.batches.load_state(state["data"])
    return Counters(**{f.name: state[f.name] for f in dataclasses.fields(Counters) if f.name in state})

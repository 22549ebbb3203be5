"""Stage 1: train the autoencoder the UNet will work in (``sdtrain train-vae``).

AutoencoderKL: L1 + L2 reconstruction of a posterior sample plus a small KL term (the LDM recipe without its
perceptual loss and PatchGAN discriminator, which need pretrained perceptual weights that are not available offline).
VQModel: the same reconstruction loss plus diffusers' codebook / commitment loss; codebook usage is reported.
At the end: PSNR and SSIM on held-out images, the latent scaling factor (1 / std of the latents, as Stable Diffusion
computed 0.18215), and a diffusers folder in ``output_dir/final`` with ``scaling_factor`` set in its config.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel
from tqdm.auto import tqdm

from sdtrain.config import AutoencoderConfig, AutoencoderModelConfig, DataConfig, save_config
from sdtrain.data.decode import Skip, SkipCounter, decode_image
from sdtrain.data.folder import resize_crop
from sdtrain.data.sources import list_records
from sdtrain.evaluate.metrics import psnr, ssim
from sdtrain.train.progress import Progress

logger = logging.getLogger(__name__)


def build_autoencoder(config: AutoencoderModelConfig) -> AutoencoderKL | VQModel:
    """A fresh AutoencoderKL or VQModel with ``len(block_out_channels) - 1`` downsamplings."""
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
    if config.kind == "kl":
        vae = AutoencoderKL(**common)
        with torch.no_grad():
            # start the posterior narrow (std e^-3 instead of 1): early training is not drowned in sampling noise,
            # which the small KL weight would otherwise take thousands of steps to shrink
            vae.quant_conv.bias[config.latent_channels :] = -6.0
        return vae
    return VQModel(**common, num_vq_embeddings=config.num_vq_embeddings, vq_embed_dim=config.latent_channels)


def load_images(config: DataConfig, limit: int | None = None) -> tuple[torch.Tensor, SkipCounter]:
    """Decode a folder's images (captions are not needed) into a uint8 N x 3 x R x R tensor, counting skips."""
    records = list_records(config.path, config.image_column, config.caption_column)[:limit]
    skipped = SkipCounter()
    images = []
    for record in tqdm(records, desc=f"reading {Path(config.path).name}", unit="img", leave=False):
        try:
            image = decode_image(record["image"])
        except Skip as skip:
            skipped[skip.reason] += 1
            continue
        pixels, _ = resize_crop(image, config.resolution, center_crop=True)
        images.append(((pixels + 1) * 127.5).round().to(torch.uint8))
    if not images:
        raise ValueError(f"no usable images in {config.path} (skipped: {skipped.summary()})")
    return torch.stack(images), skipped


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1


def reconstruction_loss(vae, x: torch.Tensor, config) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts."""
    tc = config.train
    if isinstance(vae, VQModel):
        out = vae(x)
        rec, reg = out.sample, out.commit_loss.mean()
        reg_weight = 1.0  # diffusers' VQ loss already weighs commitment (beta) against the codebook term
    else:
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        reg, reg_weight = posterior.kl().mean() / x[0].numel(), tc.kl_weight
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).pow(2).mean()
    loss = tc.l1_weight * l1 + tc.l2_weight * l2 + reg_weight * reg
    return loss, {"l1": l1.item(), "l2": l2.item(), "reg": reg.item()}


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
        else:
            latents.append(vae.encode(x).latent_dist.sample().float().cpu())
    stacked = torch.cat(latents)
    stats = {"scaling_factor": float(1.0 / stacked.std()), "latent_mean": float(stacked.mean())}
    if isinstance(vae, VQModel):
        stats["codebook_usage"] = len(used) / vae.config.num_vq_embeddings
    return stats


@torch.no_grad()
def reconstruction_metrics(vae, images: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of deterministic reconstructions (posterior mean / nearest codes)."""
    values_p, values_s = [], []
    for start in range(0, len(images), batch_size):
        x = _to_float(images[start : start + batch_size]).to(vae.device)
        if isinstance(vae, VQModel):
            rec = vae.decode(vae.encode(x).latents).sample
        else:
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        rec = rec.clamp(-1, 1)
        values_p.append(psnr(rec, x).cpu())
        values_s.append(ssim(rec, x).cpu())
    return {"psnr": float(torch.cat(values_p).mean()), "ssim": float(torch.cat(values_s).mean())}


def train_autoencoder(config: AutoencoderConfig) -> dict[str, Any]:
    """Train, evaluate and export an autoencoder.

    Returns:
        Metrics: ``path`` (the export), ``psnr``, ``ssim``, ``scaling_factor``, ``steps``, ``seconds`` and, for VQ,
        ``codebook_usage``. Also written to ``output_dir/final/metrics.json``.
    """
    tc = config.train
    # 1. Seeds, run directory, device
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 2. Data in memory (stage-1 datasets here are small; large ones go through the latent cache of the data issue)
    images, skipped = load_images(config.data)
    if config.eval_data:
        eval_images, _ = load_images(DataConfig(path=config.eval_data, resolution=config.data.resolution))
    else:
        if len(images) <= tc.eval_images:
            raise ValueError(f"{len(images)} images leave none for training after {tc.eval_images} held out")
        images, eval_images = images[: -tc.eval_images], images[-tc.eval_images :]
    eval_images = eval_images[: tc.eval_images]
    if skipped:
        logger.warning("skipped images: %s", skipped.summary())

    # 3. Model and optimizer
    vae = build_autoencoder(config.model).to(device).train()
    if isinstance(vae, VQModel):
        vae.quantize.beta = tc.commitment_weight  # diffusers' VectorQuantizer: beta * ||sg(z_q) - z||^2
    optimizer = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(tc.seed)
    crop, res = tc.crop_size, config.data.resolution
    factor = 2 ** (len(config.model.block_out_channels) - 1)

    # 4. The loop: random batches (and crops), warm-up then cosine decay to 10 %, by steps or by time budget
    budget = tc.max_minutes * 60 if tc.max_minutes is not None else None
    log_path = out / "log.jsonl"
    started = time.perf_counter()
    step = 0
    bar = Progress("train-vae", tc.num_steps, budget)
    while step < tc.num_steps and (budget is None or time.perf_counter() - started < budget):
        progress = max(step / tc.num_steps, (time.perf_counter() - started) / budget if budget else 0.0)
        lr = tc.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(images), (tc.batch_size,), generator=generator)
        x = _to_float(images[index]).to(device)
        if crop is not None and crop < res:
            top, left = (
                int(v) * factor for v in torch.randint(0, (res - crop) // factor + 1, (2,), generator=generator)
            )
            x = x[:, :, top : top + crop, left : left + crop]
        loss, parts = reconstruction_loss(vae, x, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(step, time.perf_counter() - started)
        if step % tc.log_every == 0:
            bar.update(step, time.perf_counter() - started, loss=f"{loss.item():.4f}")
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr, **parts}) + "\n")
    bar.close()
    seconds = time.perf_counter() - started

    # 5. Evaluate, set the scaling factor, export
    vae.eval()
    metrics: dict[str, Any] = reconstruction_metrics(vae, eval_images)
    metrics.update(latent_statistics(vae, images[: min(len(images), 2048)]))
    metrics.update(steps=step, seconds=seconds, skipped=dict(skipped))
    vae.register_to_config(scaling_factor=metrics["scaling_factor"])
    final = out / "final"
    vae.save_pretrained(final, safe_serialization=True)
    (final / "metrics.json").write_text(json.dumps(metrics, indent=1))
    metrics["path"] = str(final)
    return metrics

"""One place for the diffusion math: noise schedule, noising, targets and loss weights.

Training, validation loss and tests all use these functions. With ``alpha_bar_t`` the cumulative product of the
schedule, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` and the UNet predicts one of
``eps`` (epsilon), ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0`` (v_prediction) or ``x_0`` (sample).
Min-SNR-gamma weighting (Hang et al. 2023) scales each sample's MSE so that the effective weight on the x_0 error is
``min(SNR_t, gamma)``, where ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from sdtrain.config import ObjectiveConfig


def make_noise_scheduler(config: ObjectiveConfig) -> DDPMScheduler:
    """The training-time DDPM schedule; sampling schedulers are built from the same config keys."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_zero_terminal_snr,
        clip_sample=False,
    )


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` at integer timesteps."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    return (alpha_bar / (1 - alpha_bar)).float()


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None):
    """Gaussian noise like ``latents``, plus an optional per-(sample, channel) offset."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset.to(latents.dtype)
    return noise


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    config: ObjectiveConfig | None = None,
) -> torch.Tensor:
    """Integer timesteps: uniform, or logit-normal (``T * sigmoid(N(mean, std))``, as Stable Diffusion 3 trains)."""
    if config is None or config.timestep_sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()
    normal = torch.randn(batch_size, generator=generator, device=device) * config.logit_std + config.logit_mean
    return (torch.sigmoid(normal) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet should output for ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}")


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """Per-sample weights of the MSE: ones, or min-SNR-gamma converted to the prediction type's scale."""
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    clipped = ratio.clamp(max=snr_gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        weights = clipped / ratio
    elif kind == "v_prediction":
        weights = clipped / (ratio + 1)
    else:
        weights = clipped
    # zero terminal SNR: keep the last timestep trained (weight 0 or 0/0 otherwise), as diffusers' examples do
    return torch.where(ratio == 0, torch.ones_like(weights), weights)


def diffusion_loss(
    model_output: torch.Tensor, target_: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted MSE in fp32: returns ``(mean loss, per-sample loss)``."""
    per_sample = (model_output.float() - target_.float()).pow(2).mean(dim=tuple(range(1, target_.ndim)))
    return (per_sample * weights).mean(), per_sample.detach()

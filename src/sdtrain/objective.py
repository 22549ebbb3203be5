"""One place for the diffusion math: noise schedule, noising, targets and loss weights.

Training, validation loss and tests all use these functions. With ``alpha_bar_t`` the cumulative product of the
schedule, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` and the UNet predicts one of
``eps`` (epsilon), ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0`` (v_prediction) or ``x_0`` (sample).
Min-SNR-gamma weighting (Hang et al. 2023) scales each sample's MSE so that the effective weight on the x_0 error is
``min(SNR_t, gamma)``, where ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMScheduler

from sdtrain.config import ObjectiveConfig

if TYPE_CHECKING:
    from sdtrain.train.randomness import SharedDraws


def schedule(config: ObjectiveConfig) -> dict[str, Any]:
    """The noise schedule as diffusers schedulers' config keys: the training scheduler and every sampler share it."""
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "prediction_type": config.prediction_type,
        "rescale_betas_zero_snr": config.rescale_zero_terminal_snr,
    }


def from_scheduler(scheduler) -> ObjectiveConfig:
    """The objective a scheduler's config describes (a saved pipeline's): :func:`schedule` read back."""
    c, default = scheduler.config, ObjectiveConfig()
    return ObjectiveConfig(
        prediction_type=c.get("prediction_type", default.prediction_type),
        num_train_timesteps=c.get("num_train_timesteps", default.num_train_timesteps),
        beta_schedule=c.get("beta_schedule", default.beta_schedule),
        beta_start=c.get("beta_start", default.beta_start),
        beta_end=c.get("beta_end", default.beta_end),
        rescale_zero_terminal_snr=bool(c.get("rescale_betas_zero_snr", default.rescale_zero_terminal_snr)),
    )


def make_noise_scheduler(config: ObjectiveConfig) -> DDPMScheduler:
    """The training-time DDPM schedule; sampling schedulers are built from the same :func:`schedule`."""
    return DDPMScheduler(**schedule(config), clip_sample=False)


def timestep_range(config: ObjectiveConfig) -> tuple[int, int]:
    """The trained timesteps ``[t_min, t_max]``, both included."""
    high = config.max_timestep if config.max_timestep is not None else config.num_train_timesteps - 1
    return config.min_timestep, high


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` at integer timesteps."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    return (alpha_bar / (1 - alpha_bar)).float()


def sample_noise(shape: tuple[int, ...], noise_offset: float, draws: SharedDraws) -> torch.Tensor:
    """Gaussian noise of ``shape``, plus an optional per-(sample, channel) offset (Guttenberg's noise offset)."""
    noise = draws.randn(shape)
    if noise_offset:
        noise = noise + noise_offset * draws.randn(shape[:2] + (1,) * (len(shape) - 2))
    return noise


def sample_timesteps(n: int, config: ObjectiveConfig, draws: SharedDraws) -> torch.Tensor:
    """Integer timesteps in ``[t_min, t_max]``: uniform, or logit-normal (``sigmoid(N(mean, std))`` over the range,
    as Stable Diffusion 3 trains)."""
    low, high = timestep_range(config)
    if config.timestep_sampling == "uniform":
        return draws.randint(high - low + 1, n).long() + low
    u = torch.sigmoid(draws.randn((n,)) * config.logit_std + config.logit_mean)
    return (low + u * (high - low + 1)).long().clamp(low, high)


def perturb(noise: torch.Tensor, gamma: float, draws: SharedDraws) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): the noise put into ``x_t`` is ``noise + gamma * extra``; the target
    keeps ``noise``. ``gamma = 0`` returns ``noise`` itself and draws nothing."""
    if not gamma:
        return noise
    return noise + gamma * draws.randn(tuple(noise.shape)).to(noise)


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


def loss(
    predict: Callable[..., torch.Tensor],
    model: torch.nn.Module,
    cond: dict[str, torch.Tensor],
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None,
    input_noise: torch.Tensor | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch, for the loop and validation alike: noise the latents, predict, weigh the MSE.

    Args:
        predict: the family's denoiser call, ``(model, noisy latents, timesteps, cond) -> model output``.
        model: the denoiser.
        cond: the conditioning of the batch (the family's encoding of its prompts).
        scheduler: the training schedule (:func:`make_noise_scheduler`).
        latents: clean latents ``x_0``.
        noise: the noise the target is built from.
        timesteps: one integer timestep per sample.
        snr_gamma: min-SNR-gamma, or None for plain MSE.
        input_noise: the noise put into ``x_t`` where it differs from ``noise`` (input perturbation).
        autocast: entered around the model call and the loss (mixed precision).

    Returns:
        ``(mean loss, per-sample loss)``, as :func:`diffusion_loss`.
    """
    noisy = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    target_ = target(scheduler, latents, noise, timesteps)
    weights = loss_weights(scheduler, timesteps, snr_gamma)
    with autocast():
        return diffusion_loss(predict(model, noisy, timesteps, cond), target_, weights)

"""One place for the diffusion math: noise schedule, noising, targets and loss weights, for the two objectives the
families train with: DDPM (:class:`DDPM`: Stable Diffusion 1.x / 2.x, SDXL) and rectified flow matching
(:class:`FlowMatching`: SD3, Flux, and PixArt where asked). The loop and validation call an objective's ``draw`` and
``loss``; :func:`make` builds the one :func:`kind_of` names.

Training, validation loss and tests all use these functions. With ``alpha_bar_t`` the cumulative product of the
schedule, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` and the UNet predicts one of
``eps`` (epsilon), ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0`` (v_prediction) or ``x_0`` (sample).
Min-SNR-gamma weighting (Hang et al. 2023) scales each sample's MSE so that the effective weight on the x_0 error is
``min(SNR_t, gamma)``, where ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDPMScheduler

from sdtrain.config import ConfigError, ObjectiveConfig

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


def flow_schedule(config: ObjectiveConfig) -> dict[str, Any]:
    """Flow matching's shift as ``FlowMatchEulerDiscreteScheduler``'s config keys (how sampling shifts its sigmas
    as training did)."""
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "shift": config.shift,
        "use_dynamic_shifting": config.dynamic_shift,
        "base_shift": config.base_shift,
        "max_shift": config.max_shift,
        "base_image_seq_len": config.base_seq_len,
        "max_image_seq_len": config.max_seq_len,
        "shift_terminal": config.shift_terminal,
    }


def is_flow(scheduler) -> bool:
    """Whether a scheduler samples a flow-matching model: the ``FlowMatch*`` schedulers, and the multistep solvers
    with ``use_flow_sigmas`` (PixArt's and Sana's pipelines call ``scale_model_input``, which only those have)."""
    c = scheduler.config
    return ("shift" in c and "beta_start" not in c) or bool(c.get("use_flow_sigmas", False))


def from_scheduler(scheduler) -> ObjectiveConfig:
    """The objective a scheduler's config describes (a saved pipeline's): :func:`schedule` (or, for a
    flow-matching scheduler, :func:`flow_schedule`) read back, with its ``kind``."""
    c, default = scheduler.config, ObjectiveConfig()
    if is_flow(scheduler):
        return ObjectiveConfig(
            kind="flow",
            num_train_timesteps=c.get("num_train_timesteps", default.num_train_timesteps),
            shift=c.get("shift", c.get("flow_shift", default.shift)),
            dynamic_shift=bool(c.get("use_dynamic_shifting", False)),
            base_shift=c.get("base_shift", default.base_shift),
            max_shift=c.get("max_shift", default.max_shift),
            base_seq_len=c.get("base_image_seq_len", default.base_seq_len),
            max_seq_len=c.get("max_image_seq_len", default.max_seq_len),
            shift_terminal=c.get("shift_terminal", default.shift_terminal),
        )
    return ObjectiveConfig(
        kind="ddpm",
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


LOSS_MASK = "loss_mask"  # a batch's loss mask travels with its conditioning (data.masked_loss)
LOSS_WEIGHT = "loss_weight"  # and its samples' loss weights (data.prior's class images)
BASE_TARGET = "base_target"  # 1 where a sample's target is the frozen base's prediction (a dataset's target=base)
LOSS_TERMS = (LOSS_MASK, LOSS_WEIGHT, BASE_TARGET)


def split_loss_terms(
    cond: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The conditioning without what shapes the loss, the loss mask (B x 1 x h x w at the latents' size) or None,
    the samples' loss weights (B) or None, and their base-target flags (B) or None."""
    if not any(k in cond for k in LOSS_TERMS):
        return cond, None, None, None
    rest = {k: v for k, v in cond.items() if k not in LOSS_TERMS}
    return rest, cond.get(LOSS_MASK), cond.get(LOSS_WEIGHT), cond.get(BASE_TARGET)


def preserved(target_: torch.Tensor, flags: torch.Tensor | None, base, base_output) -> torch.Tensor:
    """``target_`` with the frozen base's prediction where ``flags`` is 1: differential output preservation (as
    ai-toolkit's), the adapters taught to leave what the base draws for those prompts unchanged, at the cost of one
    more forward without gradients. ``base``: a context under which the model is its frozen base (LoRA off);
    ``base_output()`` the model's prediction, called under it."""
    if flags is None:
        return target_
    if base is None:
        raise ValueError("a batch whose target is the base model's prediction needs the frozen base (LoRA)")
    with torch.no_grad(), base():
        frozen = base_output()
    keep = flags.view(-1, *[1] * (target_.ndim - 1)).to(target_.device) > 0
    return torch.where(keep, frozen.to(target_.dtype), target_)


def diffusion_loss(
    model_output: torch.Tensor, target_: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted MSE in fp32: returns ``(mean loss, per-sample loss)``. ``mask`` (broadcast over the channels)
    weighs each latent pixel's error, as kohya's masked loss does: a masked-out pixel gives no gradient, and the
    mean is over every pixel (a half-masked image counts half)."""
    error = (model_output.float() - target_.float()).pow(2)
    if mask is not None:
        error = error * mask.float()
    per_sample = error.mean(dim=tuple(range(1, target_.ndim)))
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
    base: Callable[[], Any] | None = None,
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
        base: a context under which ``model`` is its frozen base, for samples whose target is the base's prediction
            (``cond[BASE_TARGET]``, :func:`preserved`).

    Returns:
        ``(mean loss, per-sample loss)``, as :func:`diffusion_loss`.
    """
    noisy = scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    target_ = target(scheduler, latents, noise, timesteps)
    weights = loss_weights(scheduler, timesteps, snr_gamma)
    cond, mask, sample_weights, flags = split_loss_terms(cond)
    if sample_weights is not None:
        weights = weights * sample_weights.to(weights)
    with autocast():
        target_ = preserved(target_, flags, base, lambda: predict(model, noisy, timesteps, cond))
        return diffusion_loss(predict(model, noisy, timesteps, cond), target_, weights, mask)


@dataclass
class Draw:
    """The random part of one training batch: the noise the target is built from, the timesteps (DDPM: integers;
    flow matching: ``1000 sigma``), and the noise put into ``x_t`` where it differs (input perturbation)."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    input_noise: torch.Tensor | None = None


class DDPM:
    """The DDPM objective (epsilon / v / x0 targets, min-SNR-gamma, noise offset, input perturbation) on the schedule
    of ``config``; what :func:`loss` and the functions above compute, behind the interface the loop calls."""

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        self.scheduler = make_noise_scheduler(config)

    def draw(self, shape: tuple[int, ...], draws: SharedDraws) -> Draw:
        """Noise (with the noise offset), timesteps, input perturbation: drawn in this order."""
        o = self.config
        noise = sample_noise(shape, o.noise_offset, draws)
        timesteps = sample_timesteps(shape[0], o, draws)
        return Draw(noise, timesteps, perturb(noise, o.input_perturbation, draws) if o.input_perturbation else None)

    def fixed_timesteps(self, count: int) -> torch.Tensor:
        """``count`` timesteps spread evenly over the trained range (validation's fixed grid)."""
        low, high = timestep_range(self.config)
        grid = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return (low + grid * (high - low + 1)).long().clamp(low, high)

    def loss(
        self, predict, model, cond, latents: torch.Tensor, draw: Draw, autocast=contextlib.nullcontext, base=None
    ):
        """``(mean loss, per-sample loss)`` of ``model`` on ``latents`` noised as ``draw`` says (``base``: as
        :func:`loss`)."""
        noise = draw.noise.to(latents)
        input_noise = None if draw.input_noise is None else draw.input_noise.to(latents)
        return loss(
            predict, model, cond, self.scheduler, latents, noise, draw.timesteps, self.config.snr_gamma, input_noise,
            autocast, base,
        )  # fmt: skip


def flow_sigmas(u: torch.Tensor, config: ObjectiveConfig, image_seq_len: int | None = None) -> torch.Tensor:
    """Sigmas from uniform-ish ``u`` in (0, 1), shifted towards noise as SD3 and Flux train: a constant ``shift``
    (SD3: ``shift u / (1 + (shift - 1) u)``), or with ``dynamic_shift`` Flux's shift from the image's sequence length
    (``exp(mu) / (exp(mu) + 1 / u - 1)``, ``mu`` linear in the length between ``base_seq_len`` and
    ``max_seq_len``), as ``FlowMatchEulerDiscreteScheduler`` shifts its sigmas."""
    if config.dynamic_shift:
        if image_seq_len is None:
            raise ValueError("a dynamic shift needs the image's sequence length")
        slope = (config.max_shift - config.base_shift) / (config.max_seq_len - config.base_seq_len)
        mu = image_seq_len * slope + config.base_shift - slope * config.base_seq_len
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return config.shift * u / (1 + (config.shift - 1) * u)


def flow_density(n: int, config: ObjectiveConfig, draws: SharedDraws) -> torch.Tensor:
    """``u`` in (0, 1) as ``diffusers.training_utils.compute_density_for_timestep_sampling`` draws it: uniform,
    logit-normal (``sigmoid(N(mean, std))``) or SD3's mode sampling (``mode_scale``)."""
    if config.timestep_sampling == "logit_normal":
        return torch.sigmoid(draws.randn((n,)) * config.logit_std + config.logit_mean)
    u = draws.rand(n)
    if config.timestep_sampling == "mode":
        u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample weights as ``diffusers.training_utils.compute_loss_weighting_for_sd3``: none, ``sigma_sqrt``
    (``sigma^-2``) or ``cosmap`` (``2 / (pi (1 - 2 sigma + 2 sigma^2))``)."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


class FlowMatching:
    """Rectified flow matching: ``x_t = (1 - sigma) x_0 + sigma noise``, the model predicts the velocity
    ``noise - x_0`` at timestep ``1000 sigma`` (with input perturbation, ``x_t`` takes the perturbed noise); sigmas
    drawn by :func:`flow_density` and shifted by :func:`flow_sigmas`, weighted by :func:`flow_loss_weights`
    (``config.flow_weighting``)."""

    def __init__(self, config: ObjectiveConfig, image_seq_len: int | None = None):
        self.config, self.image_seq_len = config, image_seq_len
        self.num_train_timesteps = config.num_train_timesteps

    def draw(self, shape: tuple[int, ...], draws: SharedDraws) -> Draw:
        """Noise (with the noise offset), sigmas, input perturbation: drawn in this order. A dynamic shift is Flux's
        for the batch's sequence length (its latents in 2 x 2 patches, as SD3's and Flux's transformers take them)."""
        noise = sample_noise(shape, self.config.noise_offset, draws)
        tokens = shape[-2] * shape[-1] // 4 if self.config.dynamic_shift else None
        sigmas = flow_sigmas(flow_density(shape[0], self.config, draws), self.config, tokens)
        gamma = self.config.input_perturbation
        return Draw(noise, sigmas * self.num_train_timesteps, perturb(noise, gamma, draws) if gamma else None)

    def fixed_timesteps(self, count: int) -> torch.Tensor:
        """``count`` timesteps at evenly spread ``u``, shifted as training shifts them at ``image_seq_len`` tokens
        (validation's fixed grid)."""
        u = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return (flow_sigmas(u, self.config, self.image_seq_len) * self.num_train_timesteps).float()

    def loss(
        self, predict, model, cond, latents: torch.Tensor, draw: Draw, autocast=contextlib.nullcontext, base=None
    ):
        """``(mean loss, per-sample loss)`` of the velocity ``model`` predicts against ``noise - x_0`` (or the frozen
        base's prediction: ``base`` as :func:`loss`)."""
        timesteps = draw.timesteps.to(device=latents.device, dtype=torch.float32)
        sigmas = (timesteps / self.num_train_timesteps).view(-1, *[1] * (latents.ndim - 1)).to(latents)
        noise = draw.noise.to(latents)
        input_noise = noise if draw.input_noise is None else draw.input_noise.to(latents)
        noisy = (1 - sigmas) * latents + sigmas * input_noise  # the target below keeps the plain noise
        weights = flow_loss_weights(sigmas.flatten().float(), self.config.flow_weighting)
        cond, mask, sample_weights, flags = split_loss_terms(cond)
        if sample_weights is not None:
            weights = weights * sample_weights.to(weights)
        with autocast():
            target_ = preserved(noise - latents, flags, base, lambda: predict(model, noisy, timesteps, cond))
            return diffusion_loss(predict(model, noisy, timesteps, cond), target_, weights, mask)


def kind_of(config: ObjectiveConfig, family) -> str:
    """The objective a run trains: ``config.kind``, else the family's default (the first of ``Family.objectives``).

    Raises:
        ValueError: the family's pipelines cannot sample a model trained with ``config.kind``, or ``config`` sets a
            knob only the other objective reads (:data:`_ONLY`).
    """
    kind = config.kind or family.objectives[0]
    if kind not in family.objectives:
        raise ConfigError(
            f"train.objective.kind={kind}: {family.name} models train with {' or '.join(family.objectives)}"
        )
    unused = [key for key, set_ in _ONLY[kind](config).items() if set_]
    if unused:
        other = "flow" if kind == "ddpm" else "ddpm"
        raise ConfigError(
            f"train.objective: {', '.join(unused)} only appl{'ies' if len(unused) == 1 else 'y'} to "
            f"kind={other}, and this run trains with {kind} ({family.name}'s "
            f"{'default' if not config.kind else 'setting'}): remove {'it' if len(unused) == 1 else 'them'}, or "
            f"set train.objective.kind={other} if {family.name} trains with it"
        )
    return kind


# The knobs one objective reads and the other would silently ignore: set under the other kind, a run refuses them.
_ONLY = {
    "ddpm": lambda o: {  # flow matching's, set under DDPM
        "shift": o.shift != 1.0,
        "dynamic_shift": o.dynamic_shift,
        "shift_terminal": o.shift_terminal is not None,
        "flow_weighting": o.flow_weighting != "none",
        "timestep_sampling=mode": o.timestep_sampling == "mode",
    },
    "flow": lambda o: {  # DDPM's, set under flow matching
        "prediction_type": o.prediction_type != "epsilon",
        "rescale_zero_terminal_snr": o.rescale_zero_terminal_snr,
        "snr_gamma": o.snr_gamma is not None,
    },
}


def make(kind: str, config: ObjectiveConfig, image_seq_len: int | None = None) -> DDPM | FlowMatching:
    """The objective of ``kind`` (:func:`kind_of`): ``ddpm`` or ``flow``."""
    if kind == "ddpm":
        return DDPM(config)
    if kind == "flow":
        return FlowMatching(config, image_seq_len)
    raise ValueError(f"unknown objective {kind!r}")

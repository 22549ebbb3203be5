"""The flow-matching objective (SD3, Flux) against its closed forms and against diffusers' own training helpers
(``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``), the scheduler's shifts, and the
objective interface the loop calls for both objectives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdtrain import objective
from sdtrain.config import ConfigError, ObjectiveConfig
from sdtrain.train.randomness import SharedDraws


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_timestep_densities_are_diffusers(scheme):
    config = ObjectiveConfig(timestep_sampling=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = objective.flow_density(4096, config, SharedDraws(torch.Generator().manual_seed(5)))
    theirs = compute_density_for_timestep_sampling(
        "none" if scheme == "uniform" else scheme, 4096, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert 0 < ours.min() and ours.max() < 1


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_sd3s(scheme):
    sigmas = torch.linspace(0.01, 0.99, 99)
    assert torch.allclose(objective.flow_loss_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_shifts_are_the_schedulers():
    """SD3's constant shift is FlowMatchEulerDiscreteScheduler(shift=3)'s; Flux's dynamic shift is the scheduler's
    exponential time shift at the mu the Flux pipeline computes from the image's sequence length."""
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.from_numpy(np.linspace(1, 1000, 1000)[::-1].copy() / 1000).float()
    assert torch.allclose(objective.flow_sigmas(u, ObjectiveConfig(shift=3.0)), sd3.sigmas, atol=1e-6)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    expected = flux.time_shift(mu, 1.0, u)
    assert torch.allclose(objective.flow_sigmas(u, ObjectiveConfig(dynamic_shift=True), 1024), expected, atol=1e-6)
    with pytest.raises(ValueError, match="sequence length"):
        objective.flow_sigmas(u, ObjectiveConfig(dynamic_shift=True))


def test_flow_loss_is_the_closed_form():
    """x_t = (1 - sigma) x_0 + sigma noise, the target noise - x_0, the model called at 1000 sigma, the MSE
    weighted by the scheme."""
    config = ObjectiveConfig(shift=3.0, timestep_sampling="logit_normal", flow_weighting="cosmap")
    flow = objective.make("flow", config)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    drawn = flow.draw(tuple(x0.shape), SharedDraws(torch.Generator().manual_seed(2)))
    assert drawn.timesteps.shape == (3,) and (0 < drawn.timesteps).all() and (drawn.timesteps < 1000).all()
    seen = {}

    def predict(model, noisy, timesteps, cond):
        seen.update(noisy=noisy, timesteps=timesteps)
        return model * torch.ones_like(noisy)

    loss, per_sample = flow.loss(predict, 0.5, {}, x0, drawn)
    sigma = drawn.timesteps / 1000
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["noisy"], (1 - s) * x0 + s * drawn.noise)
    assert torch.equal(seen["timesteps"], drawn.timesteps)
    expected_per_sample = (0.5 - (drawn.noise - x0)).pow(2).mean(dim=(1, 2, 3))
    weights = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    assert torch.allclose(per_sample, expected_per_sample) and torch.allclose(
        loss, (expected_per_sample * weights).mean()
    )


def test_ddpm_behind_the_interface_draws_as_the_loop_drew():
    """The DDPM objective draws noise, then timesteps, then the input perturbation, from the same shared draws as
    the functions the loop called before: the same numbers, so runs and their resumes are unchanged."""
    config = ObjectiveConfig(noise_offset=0.1, input_perturbation=0.05, timestep_sampling="logit_normal")
    shape = (4, 4, 8, 8)
    drawn = objective.make("ddpm", config).draw(shape, SharedDraws(torch.Generator().manual_seed(3)))
    draws = SharedDraws(torch.Generator().manual_seed(3))
    noise = objective.sample_noise(shape, 0.1, draws)
    timesteps = objective.sample_timesteps(4, config, draws)
    perturbed = objective.perturb(noise, 0.05, draws)
    assert torch.equal(drawn.noise, noise) and torch.equal(drawn.timesteps, timesteps)
    assert torch.equal(drawn.input_noise, perturbed)
    grid = objective.make("ddpm", ObjectiveConfig(min_timestep=100, max_timestep=899)).fixed_timesteps(8)
    assert grid.min() >= 100 and grid.max() <= 899 and (grid.diff() > 0).all()
    with pytest.raises(ValueError, match="unknown objective"):
        objective.make("edm", config)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_every_flow_sampler_walks_the_training_sigmas_and_reads_back_the_objective(name):
    """Each flow sampler (FlowMatch Euler / Heun, and the multistep solvers on flow sigmas that PixArt's pipeline can
    run) starts at the training shift's sigma for t = 1, and its config reads back as the same flow objective."""
    from sdtrain.sample.pipeline import flow_sampler, sampler_name, with_scheduler

    config = ObjectiveConfig(kind="flow", shift=3.0)
    scheduler = flow_sampler(config, name)
    scheduler.set_timesteps(10)
    first = float(scheduler.sigmas[0])
    expected = float(objective.flow_sigmas(torch.tensor(1.0 - 1e-3), config))  # the solvers start at 1 - 1/1000
    assert first == pytest.approx(expected, abs=2e-3) and float(scheduler.timesteps[0]) == pytest.approx(
        1000 * first, abs=1.0
    )
    assert sampler_name(scheduler) == name
    back = objective.from_scheduler(scheduler)
    assert back.kind == "flow" and back.shift == 3.0
    assert objective.from_scheduler(with_scheduler(scheduler, "euler")).shift == 3.0
    with pytest.raises(ValueError, match=r"samples with dpmpp_2m, unipc \(flow matching\), not 'euler'"):
        with_scheduler(scheduler, "euler", ("dpmpp_2m", "unipc"))


def test_dpmpp_2m_and_its_sde_variant_are_told_apart():
    """One diffusers class, two samplers: the name sets algorithm_type, and a scheduler reads back as its name."""
    from diffusers import EulerDiscreteScheduler

    from sdtrain.sample.pipeline import sampler_name, with_scheduler

    sde = with_scheduler(EulerDiscreteScheduler(), "dpmpp_2m_sde")
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sampler_name(sde) == "dpmpp_2m_sde"
    plain = with_scheduler(sde, "dpmpp_2m")
    assert plain.config.algorithm_type == "dpmsolver++" and sampler_name(plain) == "dpmpp_2m"
    assert with_scheduler(sde, "dpmpp_2m_sde") is sde and sampler_name(EulerDiscreteScheduler()) == "euler"


def test_flow_input_perturbation_noises_the_input_and_keeps_the_target():
    """Input perturbation under flow matching: x_t takes ``noise + gamma * extra`` (drawn after the sigmas, so the
    noise and sigmas are those of the run without it), the velocity target keeps ``noise - x_0``."""
    shape = (3, 4, 8, 8)
    plain = objective.make("flow", ObjectiveConfig()).draw(shape, SharedDraws(torch.Generator().manual_seed(4)))
    flow = objective.make("flow", ObjectiveConfig(input_perturbation=0.1))
    drawn = flow.draw(shape, SharedDraws(torch.Generator().manual_seed(4)))
    assert plain.input_noise is None
    assert torch.equal(drawn.noise, plain.noise) and torch.equal(drawn.timesteps, plain.timesteps)
    extra = (drawn.input_noise - drawn.noise) / 0.1
    assert 0.8 < extra.std() < 1.2
    seen = {}

    def predict(model, noisy, timesteps, cond):
        seen["noisy"] = noisy
        return torch.zeros_like(noisy)

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    _, per_sample = flow.loss(predict, None, {}, x0, drawn)
    s = (drawn.timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(seen["noisy"], (1 - s) * x0 + s * drawn.input_noise)
    assert torch.allclose(per_sample, (drawn.noise - x0).pow(2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    ("family", "kind", "setting", "named"),
    [
        ("sd", None, {"shift": 3.0}, "shift"),
        ("sd", None, {"flow_weighting": "cosmap", "dynamic_shift": True}, "dynamic_shift, flow_weighting"),
        ("pixart", "ddpm", {"timestep_sampling": "mode"}, "timestep_sampling=mode"),
        ("pixart", "flow", {"snr_gamma": 5.0}, "snr_gamma"),
        ("flux", None, {"prediction_type": "v_prediction", "rescale_zero_terminal_snr": True}, "prediction_type"),
    ],
)
def test_a_knob_of_the_other_objective_is_refused(family, kind, setting, named):
    """A knob only the other objective reads (which this run would ignore) is refused, naming it and the way out."""
    from sdtrain.models.families import families

    config = ObjectiveConfig(kind=kind, **setting)
    with pytest.raises(ConfigError, match=rf"{named}.* only appl.*remove"):
        objective.kind_of(config, families()[family])
    assert objective.kind_of(ObjectiveConfig(kind=kind, input_perturbation=0.1), families()[family])

"""Sampler contract: every registry entry builds, samples Gaussian data correctly, and is seed-deterministic."""

from __future__ import annotations

import inspect
import math

import diffusers
import numpy as np
import pytest
import torch

from sdbatch.config.sampler_registry import SAMPLERS, a1111_name, effective_schedule, scheduler_options
from sdbatch.engine.core.denoise_loop import sample
from sdbatch.engine.core.model_fn import Conditioning, ModelFn
from sdbatch.engine.core.noise import generators, initial_noise
from sdbatch.engine.core.scheduler_factory import STEP_KWARGS, make_scheduler

torch.set_num_threads(1)
MU, SD = 0.5, 0.5  # the toy data distribution: every latent element ~ N(MU, SD²)


def _gaussian_eps(scheduler) -> ModelFn:
    """The exact eps-prediction for Gaussian data, at any (possibly fractional) timestep.

    Every scheduler hands the model x_t in variance-preserving units (sigma schedulers divide by
    sqrt(sigma² + 1) in scale_model_input), so x_t = sqrt(a)·x0 + sqrt(1 - a)·eps.
    """
    log_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().log().double().numpy()
    grid = np.arange(len(log_sigmas), dtype=np.float64)

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = math.exp(np.interp(float(t), grid, log_sigmas))
        a = 1 / (1 + sigma**2)  # alpha_cumprod at t
        return (math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / (a * SD**2 + 1 - a)).to(x.dtype)

    return model


def _run(name: str, seeds: list[int], steps: int = 25) -> torch.Tensor:
    scheduler = make_scheduler(name, "default", v_prediction=False)
    scheduler.set_timesteps(steps)
    gens = generators(seeds)
    latents = initial_noise(gens, 4, 16, 16) * scheduler.init_noise_sigma
    cond = Conditioning(embeddings=torch.zeros(len(seeds), 1, 1))
    return sample(_gaussian_eps(scheduler), scheduler, latents, cond, gens, eta=0.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name: str) -> None:
    out = _run(name, [1, 2, 3, 4])
    assert out.shape == (4, 4, 16, 16) and torch.isfinite(out).all()
    assert abs(out.mean().item() - MU) < 0.08, "samples must converge to the data mean"
    assert abs(out.std().item() - SD) < 0.1, "samples must converge to the data spread"
    assert torch.equal(out, _run(name, [1, 2, 3, 4])), "same seeds must give the same samples"


@pytest.mark.parametrize("name", ["euler_a", "dpm_2_a", "dpmpp_2m_sde", "ddim"])
def test_ancestral_noise_is_per_image(name: str) -> None:
    alone = _run(name, [7])
    in_batch = _run(name, [3, 7, 9])
    assert torch.equal(alone[0], in_batch[1])


def test_step_kwargs_table_matches_diffusers() -> None:
    for class_name, names in STEP_KWARGS.items():
        params = inspect.signature(getattr(diffusers, class_name).step).parameters
        assert set(names) == {p for p in ("eta", "generator") if p in params}, class_name
    assert {e.scheduler for e in SAMPLERS.values()} <= set(STEP_KWARGS)


def test_reference_configuration() -> None:
    cls, opts = scheduler_options("ddim", "default", v_prediction=False)
    assert cls == "DDIMScheduler"
    assert opts["beta_schedule"] == "scaled_linear" and opts["steps_offset"] == 1 and opts["clip_sample"] is False
    assert opts["beta_start"] == 0.00085 and opts["beta_end"] == 0.012 and opts["num_train_timesteps"] == 1000
    assert "steps_offset" not in scheduler_options("dpmsingle", "default", False)[1]
    assert scheduler_options("euler", "default", True)[1]["prediction_type"] == "v_prediction"


def test_schedules_map_to_diffusers_switches() -> None:
    assert scheduler_options("dpmpp_2m_karras", "default", False)[1]["use_karras_sigmas"] is True
    assert scheduler_options("euler", "exponential", False)[1]["use_exponential_sigmas"] is True
    assert effective_schedule("dpmpp_2m_karras", "default") == "karras"
    assert a1111_name("k_euler_a") == "Euler a" and a1111_name("dpmpp_2m_karras") == "DPM++ 2M"

"""Gradual Latent: the blur, the growth step (diffusers' Euler ancestral maths), the schedule, runs, config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from engine_helpers import init_images, max_diff, run_images, spec
from scipy.ndimage import correlate1d

from sdbatch.config.gradual_latent_schema import GradualLatent
from sdbatch.config.spec import GradualLatentConfig
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.features.gradual_latent import GradualLatentScheduler, gaussian_blur, start_latents
from sdbatch.errors import PromptError
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

SETTINGS = GradualLatent(timesteps=800, ratio=0.5, every_n_steps=2, ratio_step=0.25, s_noise=1.0, unsharp=None)


def test_blur_is_torchvisions_gaussian_with_reflect_padding() -> None:
    x = torch.randn(1, 2, 9, 7, generator=torch.Generator().manual_seed(0))
    ksize, sigma = 5, 0.8
    half = (ksize - 1) / 2
    weights = np.exp(-0.5 * (np.linspace(-half, half, ksize) / sigma) ** 2)
    weights /= weights.sum()
    expected = correlate1d(correlate1d(x.numpy(), weights, axis=2, mode="mirror"), weights, axis=3, mode="mirror")
    assert np.allclose(gaussian_blur(x, ksize, sigma).numpy(), expected, atol=1e-6)


def _scheduler(settings=SETTINGS, steps=10, full=(16, 16)):
    inner = make_scheduler("euler_a", "default", False)
    inner.set_timesteps(steps)
    return GradualLatentScheduler(inner, settings, full)


@pytest.mark.parametrize("unsharp", [None, (3, 0.5, 0.0, 0), (3, 0.5, 0.0, 1)])  # both orders; strength 0
def test_a_growth_to_the_same_size_is_diffusers_step(unsharp) -> None:
    """Resizing to the size it has is exact, so the growth step must then equal diffusers' own step."""
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours = _scheduler(dataclasses.replace(SETTINGS, unsharp=unsharp))
    theirs = make_scheduler("euler_a", "default", False)
    theirs.set_timesteps(10)
    t = ours.timesteps[3]
    ours._inner._init_step_index(t)
    theirs._init_step_index(t)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    got = ours._growth_step(output, t, sample, (8, 8), gens)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    expected = theirs.step(output, t, sample, generator=gens, return_dict=False)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_latents_grow_every_n_steps_and_end_at_full_size() -> None:
    scheduler = _scheduler()
    x = start_latents(torch.randn(1, 4, 16, 16), SETTINGS)
    sizes = [tuple(x.shape[-2:])]
    gens = [torch.Generator().manual_seed(0)]
    for t in scheduler.timesteps:
        x = scheduler.step(torch.randn_like(x), t, x, generator=gens)[0]
        sizes.append(tuple(x.shape[-2:]))
    low = [t for t in scheduler.timesteps if t < 800]
    assert sizes[0] == (8, 8) and sizes[-1] == (16, 16)
    first = len(scheduler.timesteps) - len(low)  # the first step below 800 grows, then every 2nd
    assert sizes[first + 1] == (8, 8) and sizes[first + 3] == (16, 16)  # 0.75 → 12 → 8 (multiple of 8), then full
    never = _scheduler(dataclasses.replace(SETTINGS, timesteps=1))  # no step below t=1: the last step grows
    x = start_latents(torch.randn(1, 4, 16, 16), SETTINGS)
    for t in never.timesteps:
        x = never.step(torch.randn_like(x), t, x, generator=gens)[0]
    assert tuple(x.shape[-2:]) == (16, 16)


def test_runs_with_gradual_latent(sd1_single_file, tmp_path) -> None:
    base = spec(sd1_single_file, sampler="euler_a", steps=12, prompt="a red cube", seed=3, width=128, height=128)
    plain, _ = run_images(base, tmp_path / "plain")
    grown, lines = run_images(dataclasses.replace(base, prompt="a red cube --glt 900 --glr 0.5 --gle 2 --gls 0.25"),
                           tmp_path / "gl")
    assert grown[0].shape == plain[0].shape and max_diff(grown, plain) > 8
    assert lines[0]["gradual_latent"]["ratio"] == 0.5 and lines[0]["gradual_latent"]["timesteps"] == 900
    by_run, _ = run_images(dataclasses.replace(base, gradual_latent=GradualLatentConfig(
        timesteps=900, ratio=0.5, every_n_steps=2, ratio_step=0.25)), tmp_path / "run")
    assert max_diff(by_run, grown) == 0
    full, _ = run_images(dataclasses.replace(base, prompt="a red cube --glr 1"), tmp_path / "one")
    assert max_diff(full, plain) == 0, "ratio 1: nothing to grow, the plain euler_a image"


def test_other_samplers_and_inpainting_are_refused_with_the_line(tmp_path) -> None:
    with pytest.raises(PromptError, match="p:1: Gradual Latent .* use sampler=euler_a"):
        plan(spec("x.safetensors"), [PromptLine("a cat --glt 700", "", "p:1")], 0)
    [image] = init_images(tmp_path, [1])
    line = PromptLine("a cat --glt 700", "", "p:2", init_image=str(image), mask_image=str(image))
    with pytest.raises(PromptError, match="p:2: Gradual Latent cannot be combined with inpainting"):
        plan(spec("x.safetensors", sampler="euler_a"), [line], 0)


def test_unsharp_sharpens_the_grown_latents() -> None:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sharp = start_latents(x, dataclasses.replace(SETTINGS, unsharp=(3, 1.0, 0.5, 0)))
    soft = start_latents(x, SETTINGS)
    assert sharp.shape == soft.shape == (1, 4, 8, 8) and sharp.std() > soft.std()

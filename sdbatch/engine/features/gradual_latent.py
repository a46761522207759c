"""Gradual Latent (kohya): sample euler_a at a reduced latent size first and grow it step by step, so a large
image is composed at the scale the model knows; the resizes happen inside the ancestral step.

It wraps the scheduler, not the loop: `GradualLatentScheduler` forwards everything to diffusers'
EulerAncestralDiscreteScheduler except the steps where the size changes, which it computes itself
(the same maths, with the resize and the noise drawn at the new size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature, Start

SUPPORTED = ("euler_a", "k_euler_a")  # the reference supports only the Euler ancestral step
# settings: a fully resolved GradualLatent (sdbatch.config.gradual_latent_schema; every field set, unsharp may be None)


def start_latents(latents: torch.Tensor, settings: Any) -> torch.Tensor:
    """The first step's latents: scaled by settings.ratio (bicubic), unsharp-masked when asked."""
    small = _resize(latents, scale_factor=settings.ratio)
    return _unsharp(small, settings.unsharp)


class GradualLatentScheduler:
    """An Euler ancestral scheduler whose latents grow from settings.ratio to the full (height, width)."""

    STEP_KWARGS = ("generator",)  # what sampling passes to step() (sdbatch.engine.core.scheduler_factory.step_kwargs)

    def __init__(self, scheduler, settings: Any, full_size: tuple[int, int]) -> None:
        self._inner = scheduler
        self.settings = settings
        self.full_size = full_size
        self.ratio = settings.ratio
        self.size = tuple(int(side * settings.ratio) for side in full_size)  # as start_latents makes it
        self._since_growth = 1000  # the first eligible step grows at once (the reference's start value)
        self._host_timesteps = scheduler.timesteps.tolist()  # read once: float() of a GPU timestep syncs each step

    def __getattr__(self, name: str):  # timesteps, init_noise_sigma, scale_model_input, config, ...
        return getattr(self._inner, name)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = False) -> tuple[torch.Tensor, ...]:
        index = self._step_index(timestep)
        target = self._growth(self._host_timesteps[index], last=index == len(self._host_timesteps) - 1)
        if target is None:
            return self._inner.step(model_output, timestep, sample, generator=generator, return_dict=False)
        self.size = target
        return (self._growth_step(model_output, timestep, sample, target, generator),)

    def _growth(self, t: float, last: bool) -> tuple[int, int] | None:
        """The size to grow to at this step, or None (every_n_steps apart, once t < settings.timesteps).

        The last step always reaches the full size: the reference could end smaller than asked (its sizes
        are rounded down to multiples of 8, and few steps may not finish the growth)."""
        s, size = self.settings, None
        if t < s.timesteps and self.ratio < 1 and self._since_growth >= s.every_n_steps:
            self.ratio = min(self.ratio + s.ratio_step, 1.0)
            size = self.full_size if self.ratio >= 1 else _size(self.full_size, self.ratio)
            self._since_growth = 0
        self._since_growth += 1
        if last and (size or self.size) != self.full_size:
            size = self.full_size
        return size

    def _step_index(self, timestep) -> int:
        """The inner scheduler's index of this step (set from the timestep on the first step, as diffusers does)."""
        if self._inner.step_index is None:
            self._inner._init_step_index(timestep)
        return self._inner.step_index

    def _growth_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, size: tuple[int, int],
                     generator) -> torch.Tensor:
        """diffusers' Euler ancestral step with the latents resized to `size` (the reference's two orders)."""
        sch = self._inner
        self._step_index(timestep)
        sigma_from, sigma_to = sch.sigmas[sch.step_index], sch.sigmas[sch.step_index + 1]
        sample = sample.to(torch.float32)
        if sch.config.prediction_type == "v_prediction":
            original = model_output * (-sigma_from / (sigma_from**2 + 1) ** 0.5) + sample / (sigma_from**2 + 1)
        else:
            original = sample - sigma_from * model_output
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        dt = (sigma_to**2 - sigma_up**2) ** 0.5 - sigma_from
        derivative = (sample - original) / sigma_from
        unsharp = self.settings.unsharp
        if unsharp is not None and len(unsharp) > 3 and unsharp[3]:  # target_x: step, then resize the result
            prev = _unsharp(_resize(sample + derivative * dt, size=size), unsharp)
        else:  # resize the latents (sharpened) and the derivative, then step
            prev = _unsharp(_resize(sample, size=size), unsharp) + _resize(derivative, size=size) * dt
        noise = randn_tensor(prev.shape, dtype=model_output.dtype, device=model_output.device, generator=generator)
        prev = prev + noise * sigma_up * self.settings.s_noise
        sch._step_index += 1
        return prev.to(model_output.dtype)


def _size(full: tuple[int, int], ratio: float) -> tuple[int, int]:
    """The reference's intermediate size: ratio × full, down to a multiple of 8 (at least 8)."""
    return tuple(max(8, int(side * ratio) // 8 * 8) for side in full)


def _resize(x: torch.Tensor, **size) -> torch.Tensor:
    """Bicubic resize (align_corners=False) in fp32, as the reference does."""
    return F.interpolate(x.float(), mode="bicubic", align_corners=False, **size).to(x.dtype)


def _unsharp(x: torch.Tensor, params: tuple[float, ...] | None) -> torch.Tensor:
    """x + (x − gaussian_blur(x)) · strength; params = (ksize, sigma, strength[, target_x]); None: x."""
    if not params:
        return x
    ksize, sigma, strength = int(params[0]), float(params[1]), float(params[2])
    return x + (x - gaussian_blur(x, ksize, sigma)) * strength


def gaussian_blur(x: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """torchvision's gaussian_blur (odd kernel, reflect padding), separable, without torchvision."""
    half = (ksize - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, ksize, dtype=torch.float32) / sigma) ** 2)
    kernel = (pdf / pdf.sum()).to(device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    pad = ksize // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, ksize).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, ksize, 1).repeat(channels, 1, 1, 1), groups=channels)


class GradualLatentFeature(Feature):
    """A start modifier (the latents begin small) and a scheduler wrapper (they grow inside the steps)."""

    name = "gradual_latent"
    order = 15  # after the start providers (txt2img, img2img)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings = ctx.key.features.get(self.name)
        if settings is None or ctx.start_given:
            return None
        full = (ctx.key.height // ctx.engine.latent_factor, ctx.key.width // ctx.engine.latent_factor)
        return BatchHooks(start=lambda begun: Start(begun.timesteps, start_latents(begun.latents, settings)),
                          scheduler=lambda scheduler: GradualLatentScheduler(scheduler, settings, full))


FEATURE = GradualLatentFeature()

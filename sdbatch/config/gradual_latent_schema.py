"""Gradual Latent's schema: the gradual_latent.* run config, a line's --gl* overrides, checks, per-image settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from sdbatch.config.feature_schema import PlannedImage, given_or
from sdbatch.errors import ConfigError, PromptError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec

_SAMPLERS = ("euler_a", "k_euler_a")  # it grows the latents inside the Euler ancestral step


@dataclass(frozen=True, slots=True)
class GradualLatent:
    """Gradual Latent overrides from --glt --glr --gle --gls --glsn --glus; None = not given on the line.

    Any of them turns Gradual Latent on; `timesteps=None` means the run's value (or the default 650). An image's
    resolved settings (`GradualLatentConfig.for_image`) are a GradualLatent with every field set (unsharp may be
    None).
    """

    timesteps: int | None = None  # upscaling starts once t < this
    ratio: float | None = None  # initial latent scale in (0, 1]
    every_n_steps: int | None = None
    ratio_step: float | None = None
    s_noise: float | None = None
    unsharp: tuple[float, ...] | None = None  # ksize, sigma, strength[, target_x]


@dataclass(frozen=True, slots=True)
class GradualLatentConfig:
    """Gradual Latent (the reference's --gradual_latent_*; sampler euler_a): latents start small and grow."""

    LINE: ClassVar[type[GradualLatent]] = GradualLatent  # the line's overrides (--glt ...)

    timesteps: int | None = None  # growing starts once t < this; null = off (a prompt's --glt/--glr/... turn it on)
    ratio: float = 0.5  # start scale of the latents, 0 < ratio <= 1
    ratio_step: float = 0.125  # added to the scale at each growth
    every_n_steps: int = 3  # steps between growths
    s_noise: float = 1.0  # ancestral noise multiplier on growth steps
    unsharp: list[float] | None = None  # [ksize, sigma, strength(, target_x 0/1)] unsharp mask after each resize

    def check(self, spec: RunSpec) -> None:
        """The run-level checks of gradual_latent.* (keys named in every message)."""
        if self.timesteps is not None and not 1 <= self.timesteps <= 1000:
            raise ConfigError(f"gradual_latent.timesteps must be a timestep from 1 to 1000, got {self.timesteps}")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"gradual_latent.ratio must be in (0, 1], got {self.ratio}")
        for key, valid, ok in (("ratio_step", "> 0", self.ratio_step > 0),
                               ("every_n_steps", ">= 1", self.every_n_steps >= 1),
                               ("s_noise", ">= 0", self.s_noise >= 0)):
            if not ok:  # nan compares false: refused too
                raise ConfigError(f"gradual_latent.{key} must be {valid}, got {getattr(self, key)}")
        if self.unsharp is not None and (len(self.unsharp) not in (3, 4) or int(self.unsharp[0]) % 2 == 0):
            raise ConfigError("gradual_latent.unsharp is [ksize (odd), sigma, strength(, target_x)], "
                              f"got {self.unsharp}")
        if self.timesteps is not None and spec.sampler.name not in _SAMPLERS:
            raise ConfigError(f"gradual_latent needs sampler=euler_a (it grows the latents inside the Euler ancestral "
                              f"step), not {spec.sampler.name}")

    def for_image(self, given: GradualLatent | None, job: PlannedImage) -> GradualLatent | None:
        """The image's Gradual Latent settings: the line's --glt --glr --gle --gls --glsn --glus over
        gradual_latent.*; off unless gradual_latent.timesteps is set or the line gives any of them."""
        if given is None and self.timesteps is None:
            return None
        if job.sampler not in _SAMPLERS:
            raise PromptError(f"{job.origin}: Gradual Latent grows the latents inside the Euler ancestral step; use "
                              f"sampler=euler_a (not {job.sampler}) <gradual_latent.*, --glt ...>")
        if job.mask_image is not None:
            raise PromptError(f"{job.origin}: Gradual Latent cannot be combined with inpainting (mask_image)")
        given = given or GradualLatent()
        unsharp = given.unsharp if given.unsharp is not None else self.unsharp
        return GradualLatent(timesteps=given_or(given.timesteps, given_or(self.timesteps, 650)),
                             ratio=given_or(given.ratio, self.ratio),
                             every_n_steps=given_or(given.every_n_steps, self.every_n_steps),
                             ratio_step=given_or(given.ratio_step, self.ratio_step),
                             s_noise=given_or(given.s_noise, self.s_noise),
                             unsharp=tuple(float(v) for v in unsharp) if unsharp else None)

"""Highres. fix's schema: the highres group, its checks, the stage-1 size, the upscaler plug-in, names and records.

Plain Python: the torch work is in sdbatch.engine.features.highres_fix; config checks, planning and outputs use
this module without loading a model. Highres. fix has no prompt-line options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sdbatch.config.feature_schema import PlannedImage
from sdbatch.config.plugins import load_callable
from sdbatch.config.sampler_registry import MIN_STEPS
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec

LATENT_MODES = ("bilinear", "bicubic")


@dataclass(frozen=True, slots=True)
class HighresConfig:
    """Highres. fix: txt2img at a smaller size, upscale, then img2img; also an image's settings when it is on."""

    LINE: ClassVar[None] = None  # no prompt-line options

    name: str = "off"  # off | on: Highres. fix (txt2img at a smaller size, upscale, then img2img)
    scale: float = 0.5  # stage-1 size = scale × width/height, rounded down to a multiple of 8
    steps: int = 28  # stage-1 (txt2img) steps; stage 2 uses sampler.steps × strength
    strength: float = 0.5  # stage-2 img2img strength, 0 < strength <= 1
    latent_upscale: bool = False  # false: upscale the decoded images (LANCZOS); true: upscale the latents
    latent_mode: str = "bilinear"  # bilinear | bicubic: interpolation of latent_upscale
    save_first_stage: bool = False  # also write the stage-1 images (NAME-first.png, "stage": 1 in the manifest)
    upscaler: str | None = None  # "module:function" replacing the built-in upscale (see README "Highres. fix")
    disable_controlnet: bool = False  # stage 2 without ControlNet (guidance=controlnet): stage 1 alone follows the hint

    def check(self, spec: RunSpec) -> None:
        """The run-level checks: the group's own (`check` below), then those against the rest of the run."""
        check(self)
        if self.name != "on":
            return
        if spec.init_image is not None:
            raise ConfigError("highres=on makes its own first stage (txt2img); it cannot start from init_image. "
                              "For the second stage alone, run img2img on the first-stage image")
        if int(spec.sampler.steps * self.strength) < 1:
            raise ConfigError(f"highres.strength {self.strength} × sampler.steps {spec.sampler.steps} leaves "
                              "no second-stage step; raise highres.strength or sampler.steps")
        if self.steps < MIN_STEPS.get(spec.sampler.name, 1):
            raise ConfigError(f"sampler {spec.sampler.name} needs highres.steps >= {MIN_STEPS[spec.sampler.name]}")

    def for_image(self, given: None, job: PlannedImage) -> HighresConfig | None:
        """Every image of the run gets the run's settings when highres=on (no per-line options)."""
        return self if self.name == "on" else None

    def record(self, job: PlannedImage) -> dict[str, Any]:
        """The image's settings for its metadata, with the stage-1 size and the stage-2 seed."""
        width, height = first_stage_size(job.width, job.height, self.scale)
        # stage 2 draws from a fresh generator of the image's own seed: it is exactly img2img of the stage-1 image
        return {**dataclasses.asdict(self), "first_width": width, "first_height": height,
                "stage2_seed": job.seed, "upscaler_name": upscaler_name(self)}


def first_stage_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Stage-1 (width, height): scale × the final size, each rounded down to a multiple of 8."""
    size = (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)
    if min(size) < 8:
        raise ConfigError(f"highres.scale={scale} makes the first stage of {width}x{height} smaller than 8 pixels; "
                          "raise highres.scale or the size <highres.scale>")
    return size


def load_upscaler(path: str) -> Callable:
    """The `module:function` callable named by highres.upscaler; ConfigError naming the key otherwise."""
    return load_callable(path, "highres.upscaler", "my_pkg.upscale:run")


def upscaler_name(cfg: HighresConfig) -> str:
    """A1111's `Hires upscaler` value: Latent, Latent (bicubic), Lanczos, or the plug-in's path."""
    if cfg.upscaler:
        return cfg.upscaler
    if cfg.latent_upscale:
        return "Latent" if cfg.latent_mode == "bilinear" else f"Latent ({cfg.latent_mode})"
    return "Lanczos"


def check(cfg: HighresConfig) -> None:
    """The checks of the highres group on its own (keys named in every message)."""
    if cfg.name not in ("off", "on"):
        raise ConfigError(f"highres={cfg.name!r} is not valid; choose off or on")
    if not 0 < cfg.scale <= 1:
        raise ConfigError(f"highres.scale must be in (0, 1] (stage-1 size = scale × size), got {cfg.scale}")
    if cfg.steps < 1:
        raise ConfigError(f"highres.steps must be a positive number, got {cfg.steps}")
    if not 0 < cfg.strength <= 1:
        raise ConfigError(f"highres.strength must be in (0, 1], got {cfg.strength}")
    if cfg.latent_mode not in LATENT_MODES:
        raise ConfigError(f"highres.latent_mode={cfg.latent_mode!r} is not valid; choose one of: bilinear, bicubic")
    if cfg.name == "on" and cfg.upscaler:
        load_upscaler(cfg.upscaler)

"""Highres. fix settings in plain Python: the stage-1 size, the upscaler plug-in, names and records.

The torch work is in sdbatch.engine.features.highres_fix; this module stays light so planning, config checks and
outputs can use it without loading a model.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from sdbatch.config.spec import HighresConfig
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import ImageJob

LATENT_MODES = ("bilinear", "bicubic")


def first_stage_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Stage-1 (width, height): scale × the final size, each rounded down to a multiple of 8."""
    size = (int(width * scale) // 8 * 8, int(height * scale) // 8 * 8)
    if min(size) < 8:
        raise ConfigError(f"highres.scale={scale} makes the first stage of {width}x{height} smaller than 8 pixels; "
                          "raise highres.scale or the size <highres.scale>")
    return size


def first_stage_job(job: ImageJob) -> ImageJob:
    """The plain txt2img job stage 1 runs: the small size, highres.steps, named NAME-first.png."""
    cfg = job.highres
    width, height = first_stage_size(job.width, job.height, cfg.scale)
    stem, _, ext = job.file_name.rpartition(".")
    return dataclasses.replace(job, width=width, height=height, steps=cfg.steps, highres=None,
                               file_name=f"{stem}-first.{ext}")


def load_upscaler(path: str) -> Callable:
    """The `module:function` callable named by highres.upscaler; ConfigError naming the key otherwise."""
    module_name, colon, attr = path.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"highres.upscaler={path!r} must be 'module:function', e.g. 'my_pkg.upscale:run'")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as ex:
        raise ConfigError(f"highres.upscaler={path!r} cannot be loaded: {ex}") from None
    if not callable(function):
        raise ConfigError(f"highres.upscaler={path!r} is not callable")
    return function


def upscaler_name(cfg: HighresConfig) -> str:
    """A1111's `Hires upscaler` value: Latent, Latent (bicubic), Lanczos, or the plug-in's path."""
    if cfg.upscaler:
        return cfg.upscaler
    if cfg.latent_upscale:
        return "Latent" if cfg.latent_mode == "bilinear" else f"Latent ({cfg.latent_mode})"
    return "Lanczos"


def check(cfg: HighresConfig) -> None:
    """The run-level checks of the highres group (keys named in every message)."""
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


def record(job: ImageJob) -> dict[str, Any] | None:
    """The highres settings of an image for its metadata, with the stage-1 size and the stage-2 seed."""
    if job.highres is None:
        return None
    width, height = first_stage_size(job.width, job.height, job.highres.scale)
    # stage 2 draws from a fresh generator of the image's own seed: it is exactly img2img of the stage-1 image
    return {**dataclasses.asdict(job.highres), "first_width": width, "first_height": height,
            "stage2_seed": job.seed, "upscaler_name": upscaler_name(job.highres)}

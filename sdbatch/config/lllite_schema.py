"""guidance=lllite: kohya's ControlNet-LLLite (SDXL) keys, their checks and each image's LLLite settings.

The guidance group's keys, read the LLLite way (the reference's --control_net_lllite_models with
--control_net_multipliers and --control_net_ratios): guidance.models are LLLite files, guidance.weights their
multipliers, guidance.ratios the fraction of the steps after which each is switched off, guidance.guide_image
the conditioning images (one per model per image, in turn, as for ControlNet), guidance.preprocess optional.
ControlNet's start, combine and guess_mode have no LLLite meaning and are refused. Plain Python: the engine's
sdbatch.engine.features.lllite loads and runs the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdbatch.config.feature_schema import PlannedImage
from sdbatch.config.guidance_schema import Preprocess, parse_preprocess
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.guidance_schema import GuidanceConfig
    from sdbatch.config.spec import RunSpec

NAME = "lllite"
_CONTROLNET_ONLY = ("start", "combine", "guess_mode")


@dataclass(frozen=True, slots=True)
class LLLiteUnit:
    """One LLLite file as an image uses it: guidance.models[i] with its preprocess, multiplier and ratio."""

    model: str
    preprocess: Preprocess
    weight: float  # the LLLite multiplier (0: the file does nothing)
    ratio: float  # active while step / steps <= ratio (the reference's rule); 1 = every step

    start: float = 0.0  # for the records (A1111's "Guidance Start"): LLLite always starts at the first step

    def active(self, step: int, steps: int) -> bool:
        """The reference's switch: off once ratio < step / steps (and never off at ratio 1)."""
        return self.weight != 0 and (self.ratio >= 1 or step / steps <= self.ratio)


@dataclass(frozen=True, slots=True)
class LLLiteSettings:
    """An image's LLLite settings (the same for every image of a batch: part of the batch key)."""

    units: tuple[LLLiteUnit, ...]
    save_hints: bool = False

    def record(self, job: PlannedImage) -> dict[str, Any]:
        """The image's LLLite entry for its metadata (the outputs add each model's name and hash); its units
        are recorded like ControlNet's, as A1111's ControlNet extension records LLLite models."""
        return {"name": NAME, "units": [{"model": unit.model, "guide_image": guide, "preprocess": unit.preprocess.name,
                                         "weight": unit.weight, "start": unit.start, "ratio": unit.ratio}
                                        for unit, guide in zip(self.units, job.guide_images or [None] * len(self.units),
                                                               strict=True)]}

    def with_weights(self, weights: tuple[float, ...]) -> LLLiteSettings:
        """These settings with the first len(weights) multipliers replaced (a grid's guidance.weights)."""
        units = tuple(unit if i >= len(weights) else LLLiteUnit(unit.model, unit.preprocess, weights[i], unit.ratio)
                      for i, unit in enumerate(self.units))
        return LLLiteSettings(units, self.save_hints)


def check(cfg: GuidanceConfig, spec: RunSpec) -> None:
    """guidance=lllite's run-level checks (keys named in every message)."""
    if not cfg.models:
        raise ConfigError("guidance=lllite needs guidance.models=[FILE, ...] (ControlNet-LLLite .safetensors files)")
    if cfg.guide_image is None:
        raise ConfigError("guidance=lllite needs guidance.guide_image=FILE_OR_FOLDER (the conditioning images)")
    for key in _CONTROLNET_ONLY:
        if getattr(cfg, key) not in ([], False, "sum"):
            raise ConfigError(f"guidance.{key} is a ControlNet key; ControlNet-LLLite has no {key} and cannot be "
                              "combined with ControlNet: drop the key, or use guidance=controlnet")
    if spec.highres.disable_controlnet:
        raise ConfigError("highres.disable_controlnet=true needs guidance=controlnet; with guidance=lllite use "
                          "guidance.ratios to switch LLLite off early")
    for i, model in enumerate(cfg.models):
        if not Path(model).expanduser().is_file():
            raise ConfigError(f"guidance.models[{i}]: no such file {model}; give a ControlNet-LLLite .safetensors file")
    units(cfg)


def units(cfg: GuidanceConfig) -> tuple[LLLiteUnit, ...]:
    """One LLLiteUnit per model: the lists checked (lengths, ranges) and their defaults filled in."""
    count = len(cfg.models)
    for key in ("preprocess", "weights", "ratios"):
        given = getattr(cfg, key)
        if given and len(given) != count:
            raise ConfigError(f"guidance.{key} has {len(given)} value(s) for {count} model(s) in guidance.models; "
                              "give one per model, or none for the defaults")
    preps = [parse_preprocess(p, f"guidance.preprocess[{i}]") for i, p in enumerate(cfg.preprocess)]
    found = []
    for i, model in enumerate(cfg.models):
        weight, ratio = _number(cfg.weights, i, 1.0, "weights"), _number(cfg.ratios, i, 1.0, "ratios")
        if not 0 < ratio <= 1:
            raise ConfigError(f"guidance.ratios[{i}] must be in (0, 1] (a fraction of the steps), got {ratio}")
        found.append(LLLiteUnit(model, preps[i] if preps else Preprocess("none", "none"), weight, ratio))
    return tuple(found)


def settings(cfg: GuidanceConfig) -> LLLiteSettings:
    """Every image of a guidance=lllite run gets the run's settings (its guide images travel per image)."""
    return LLLiteSettings(units(cfg), cfg.save_hints)


def _number(values: list[float], i: int, default: float, key: str) -> float:
    value = float(values[i]) if values else default
    if not math.isfinite(value):
        raise ConfigError(f"guidance.{key}[{i}] must be a finite number, got {value}")
    return value

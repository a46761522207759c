"""The guidance group's schema: guidance=controlnet's keys, their checks, each image's ControlNet settings, records.

Plain Python: loading the ControlNets and running them is sdbatch.engine.features.controlnet; config checks,
planning and outputs use this module without loading a model. The guide images are per image (ImageJob's
`guide_images`, assigned in turn by the planning stage), so images with different hints share a batch; everything
else here is per model and the same for the whole batch (`ControlNetSettings`, part of the batch key).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdbatch.config.feature_schema import PlannedImage
from sdbatch.config.plugins import load_callable
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec

GUIDANCE_OPTIONS = ("none", "controlnet", "lllite")  # lllite: sdbatch.config.lllite_schema
COMBINE_MODES = ("sum", "mean", "alternate")
CANNY_DEFAULT = (63, 191)  # the reference's thresholds
EXTRA = "pip install 'sdbatch[controlnet]'"  # OpenCV for canny


@dataclass(frozen=True, slots=True)
class Preprocess:
    """One model's hint preprocessing, parsed from guidance.preprocess[i]."""

    name: str  # as written: none, canny, canny_100_200, invert, my_pkg.edges:run
    kind: str  # none | canny | invert | plugin
    low: int = CANNY_DEFAULT[0]  # canny's hysteresis thresholds (0..255 grey levels)
    high: int = CANNY_DEFAULT[1]
    plugin: str | None = None  # "module:function": f(PIL.Image RGB) → PIL.Image

    @property
    def a1111_module(self) -> str:
        """The name A1111's ControlNet extension gives this preprocessor ("Module: ..." in its infotext)."""
        return {"none": "none", "canny": "canny", "invert": "invert"}.get(self.kind, self.name)


def parse_preprocess(name: str, key: str) -> Preprocess:
    """`none`, `canny`, `canny_LOW`, `canny_LOW_HIGH`, `invert` or `module:function`; ConfigError naming `key`."""
    text = str(name).strip()
    if text.lower() in ("none", ""):
        return Preprocess(text or "none", "none")
    if text.lower() == "invert":
        return Preprocess(text, "invert")
    if ":" in text:
        return Preprocess(text, "plugin", plugin=text)
    head, *numbers = text.split("_")
    if head.lower() != "canny":
        raise ConfigError(f"{key}={text!r} is not a preprocessor; choose none, canny, canny_LOW_HIGH (e.g. "
                          "canny_63_191), invert, or 'module:function' for your own")
    if len(numbers) > 2 or not all(n.isdigit() for n in numbers):
        raise ConfigError(f"{key}={text!r}: canny takes up to two whole-number thresholds, e.g. canny_63_191")
    low, high = (*[int(n) for n in numbers], *CANNY_DEFAULT[len(numbers):])[:2]
    if not 0 <= low <= high <= 255 * 4:
        raise ConfigError(f"{key}={text!r}: canny thresholds need 0 <= LOW <= HIGH, e.g. canny_63_191")
    return Preprocess(text, "canny", low, high)


def canny_available() -> bool:
    """Whether OpenCV (the [controlnet] extra) can be imported."""
    return importlib.util.find_spec("cv2") is not None


@dataclass(frozen=True, slots=True)
class ControlUnit:
    """One ControlNet as an image uses it: guidance.models[i] with its preprocess, weight, start and ratio."""

    model: str  # the file or folder as given (guidance.models[i]), or builtin:tiny
    preprocess: Preprocess
    weight: float  # residual multiplier
    start: float  # the model acts from this fraction of the steps ...
    ratio: float  # ... up to this one (diffusers' control_guidance_start / _end)

    def active(self, step: int, steps: int) -> bool:
        """Whether the model acts at step `step` of `steps`: diffusers' rule, i/n >= start and (i+1)/n <= ratio."""
        return step / steps >= self.start and (step + 1) / steps <= self.ratio


@dataclass(frozen=True, slots=True)
class ControlNetSettings:
    """An image's ControlNet settings (the same for every image of a batch: part of the batch key)."""

    units: tuple[ControlUnit, ...]
    combine: str = "sum"  # sum | mean | alternate
    guess_mode: bool = False
    save_hints: bool = False

    def record(self, job: PlannedImage) -> dict[str, Any]:
        """The image's ControlNet entry for its metadata (the outputs add each model's name and hash)."""
        return {"name": "controlnet", "combine": self.combine, "guess_mode": self.guess_mode,
                "units": [{"model": unit.model, "guide_image": guide, "preprocess": unit.preprocess.name,
                           "weight": unit.weight, "start": unit.start, "ratio": unit.ratio}
                          for unit, guide in zip(self.units, job.guide_images or [None] * len(self.units),
                                                 strict=True)]}

    def with_weights(self, weights: tuple[float, ...]) -> ControlNetSettings:
        """These settings with the first len(weights) models' weights replaced (a grid's guidance.weights)."""
        units = tuple(unit if i >= len(weights) else _replace_weight(unit, weights[i])
                      for i, unit in enumerate(self.units))
        return ControlNetSettings(units, self.combine, self.guess_mode, self.save_hints)


def _replace_weight(unit: ControlUnit, weight: float) -> ControlUnit:
    return ControlUnit(unit.model, unit.preprocess, weight, unit.start, unit.ratio)


@dataclass(frozen=True, slots=True)
class GuidanceConfig:
    """The guidance group: none, or controlnet with one entry per model in each list."""

    LINE: ClassVar[None] = None  # no prompt-line options

    name: str = "none"  # none | controlnet
    models: list[str] = field(default_factory=list)  # ControlNet files or diffusers folders (three formats)
    guide_image: str | None = None  # a file, or a folder used in turn; each image takes len(models) in a row
    preprocess: list[str] = field(default_factory=list)  # per model: none | canny[_LOW_HIGH] | invert | mod:fn
    weights: list[float] = field(default_factory=list)  # per model: residual multiplier (default 1)
    start: list[float] = field(default_factory=list)  # per model: fraction of steps where it starts (default 0)
    ratios: list[float] = field(default_factory=list)  # per model: fraction of steps where it stops (default 1)
    # sum: add the acting models' residuals; mean: their element-wise average (what gen_img's SDXL ControlNet
    # meant to do); alternate: model step % count acts
    combine: str = "sum"
    guess_mode: bool = False  # "control is more important": no control residuals on the unconditional rows
    save_hints: bool = False  # also write each image's preprocessed hints (NAME-hint0.png, ...)

    def check(self, spec: RunSpec) -> None:
        """The run-level checks of guidance.* (keys named in every message)."""
        if self.name not in GUIDANCE_OPTIONS:
            raise ConfigError(f"guidance={self.name!r} is not valid; choose one of: {', '.join(GUIDANCE_OPTIONS)}")
        if self.name == "none":
            _check_unused(self)
            if spec.highres.disable_controlnet:
                raise ConfigError("highres.disable_controlnet=true needs guidance=controlnet (there is no "
                                  "ControlNet to switch off); drop the key or add guidance=controlnet")
            return
        if self.name == "lllite":
            from sdbatch.config import lllite_schema  # imports this module: imported on use

            return lllite_schema.check(self, spec)
        if not self.models:
            raise ConfigError("guidance=controlnet needs guidance.models=[FILE, ...] (ControlNet files or folders)")
        if self.guide_image is None:
            raise ConfigError("guidance=controlnet needs guidance.guide_image=FILE_OR_FOLDER (the hint images)")
        if self.combine not in COMBINE_MODES:
            raise ConfigError(f"guidance.combine={self.combine!r} is not valid; choose sum, mean or alternate")
        if spec.model.xti_embeddings:
            raise ConfigError("guidance=controlnet cannot be combined with model.xti_embeddings (per-block text "
                              "for the ControlNet's blocks is not supported); use model.textual_inversion instead")
        for i, model in enumerate(self.models):
            _check_model(model, f"guidance.models[{i}]")
        self.units()  # lengths, ranges and preprocessors

    def units(self) -> tuple[ControlUnit, ...]:
        """One ControlUnit per model: the lists checked (their lengths, ranges) and their defaults filled in."""
        count = len(self.models)
        for key in ("preprocess", "weights", "start", "ratios"):
            given = getattr(self, key)
            if given and len(given) != count:
                raise ConfigError(f"guidance.{key} has {len(given)} value(s) for {count} model(s) in "
                                  f"guidance.models; give one per model, or none for the defaults")
        preps = [parse_preprocess(p, f"guidance.preprocess[{i}]") for i, p in enumerate(self.preprocess)]
        units = tuple(ControlUnit(model, preps[i] if preps else Preprocess("none", "none"),
                                  _number(self.weights, i, 1.0, "weights"), _number(self.start, i, 0.0, "start"),
                                  _number(self.ratios, i, 1.0, "ratios"))
                      for i, model in enumerate(self.models))
        for i, unit in enumerate(units):
            _check_unit(unit, i)
        return units

    def for_image(self, given: None, job: PlannedImage) -> Any:
        """Every image of a guidance=controlnet (or lllite) run gets the run's settings (its guide images travel
        per image): ControlNetSettings, LLLiteSettings or None."""
        if self.name == "lllite":
            from sdbatch.config import lllite_schema

            return lllite_schema.settings(self)
        if self.name != "controlnet":
            return None
        return ControlNetSettings(self.units(), self.combine, self.guess_mode, self.save_hints)


def _number(values: list[float], i: int, default: float, key: str) -> float:
    value = float(values[i]) if values else default
    if not math.isfinite(value):
        raise ConfigError(f"guidance.{key}[{i}] must be a finite number, got {value}")
    return value


def _check_unit(unit: ControlUnit, i: int) -> None:
    if not 0 <= unit.start < 1:
        raise ConfigError(f"guidance.start[{i}] must be in [0, 1) (a fraction of the steps), got {unit.start}")
    if not 0 < unit.ratio <= 1:
        raise ConfigError(f"guidance.ratios[{i}] must be in (0, 1] (a fraction of the steps), got {unit.ratio}")
    if unit.start >= unit.ratio:
        raise ConfigError(f"guidance.start[{i}]={unit.start} must be below guidance.ratios[{i}]={unit.ratio}: "
                          "the model would never act; lower start or raise the ratio")
    prep, key = unit.preprocess, f"guidance.preprocess[{i}]"
    if prep.kind == "canny" and not canny_available():
        raise ConfigError(f"{key}={prep.name}: canny needs OpenCV; {EXTRA}")
    if prep.kind == "plugin":
        load_callable(prep.plugin or "", key, "my_pkg.edges:detect")


def _check_model(model: str, key: str) -> None:
    """A model file or folder that does not exist fails before anything loads (builtin:tiny is built on use)."""
    if model.startswith("builtin:"):
        if model != "builtin:tiny":
            raise ConfigError(f"{key}={model} is unknown; the built-in ControlNet is builtin:tiny "
                              "(for model=tiny and tiny_xl)")
        return
    if not Path(model).expanduser().exists():
        raise ConfigError(f"{key}: no such file or folder {model}; give a ControlNet .safetensors/.pth file or a "
                          "diffusers ControlNet folder")


def _check_unused(cfg: GuidanceConfig) -> None:
    """guidance=none with ControlNet keys set: they would have no effect, so say so."""
    for key in ("models", "guide_image", "preprocess", "weights", "start", "ratios", "guess_mode", "save_hints"):
        if getattr(cfg, key):
            raise ConfigError(f"guidance.{key} is set but guidance=none; add guidance=controlnet to use it")
    if cfg.combine != "sum":
        raise ConfigError("guidance.combine is set but guidance=none; add guidance=controlnet to use it")

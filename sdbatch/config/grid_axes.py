"""Fused-grid axes: `grid.x.key=KEY grid.x.values=[V1,V2]` or `grid.x=KEY:V1,V2` parsed and every value
checked, before any job or model exists."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdbatch.config.sampler_registry import MIN_STEPS, SAMPLERS
from sdbatch.config.spec import UNSET_AXIS, RunSpec
from sdbatch.errors import ConfigError

SEED_LIMIT = 2**32  # seeds live in [0, 2**32), as in A1111 and the reference tool

# axis key → (ImageJob field, value parser); prompt_sr, sampler and network_muls are handled specially
AXIS_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "seed": ("seed", int),
    "sampler.cfg_scale": ("cfg_scale", float),
    "cfg_scale": ("cfg_scale", float),
    "sampler.steps": ("steps", int),
    "steps": ("steps", int),
    "width": ("width", int),
    "height": ("height", int),
    "strength": ("strength", float),
    "negative_prompt": ("negative_prompt", str),
    "prompt": ("prompt", str),
}
SAMPLER_KEYS = ("sampler", "sampler.name")
# network_muls: one value per cell, the networks' multipliers separated by ";" ("0.5" or "0.5;1"), like --am;
# guidance.weights: the ControlNet weights the same way, from the first model on ("0.5" sets the first model's)
MULTI_KEYS = ("network_muls", "guidance.weights")
AXIS_KEYS = (*AXIS_FIELDS, *SAMPLER_KEYS, "prompt_sr", *MULTI_KEYS)

# ImageJob field → (check of one value, what a valid value is): the checks the same keys get in resolve
_VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < SEED_LIMIT, f"a seed from 0 to {SEED_LIMIT - 1}"),
    "steps": (lambda v: v >= 1, "a positive number of steps"),
    "cfg_scale": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "strength": (lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "width": (lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8"),
    "height": (lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8"),
}


@dataclass(frozen=True, slots=True)
class Axis:
    """One grid axis: the key it changes and its values, as written (they are the labels)."""

    key: str
    values: tuple[str, ...]

    @property
    def labels(self) -> list[str]:
        """Cell labels: the key's last part and the value ("cfg_scale: 7"), short enough for small cells."""
        return [f"{self.key.rpartition('.')[2]}: {v}" for v in self.values]


def parse_axis(given: Any, name: str) -> Axis:
    """grid.x/y/z as given → Axis, every value checked; a bad key or value names grid.x/y/z and what is valid.

    `given` is `sampler.cfg_scale:5,7,9` or the mapping {key: sampler.cfg_scale, values: [5, 7, 9]}.
    """
    key, items = _structured_axis(given, name) if isinstance(given, Mapping) else _string_axis(given, name)
    if key not in AXIS_KEYS:
        raise ConfigError(f"grid.{name}: unknown axis key '{key}'; choose one of: {', '.join(AXIS_KEYS)}")
    if not items:
        raise ConfigError(f"grid.{name}: no values for {key}; give them as 'grid.{name}.values=[1,2,3]'")
    axis = Axis(key, items)
    for value in items:  # fail before any model loads, not halfway through the run
        parse_value(axis, value, name)
    return axis


def _string_axis(text: Any, name: str) -> tuple[str, tuple[str, ...]]:
    """`KEY:V1,V2` → (key, values); the values split at commas."""
    if not isinstance(text, str):
        raise ConfigError(f"grid.{name}={text!r}: give grid.{name}.key=KEY 'grid.{name}.values=[V1,V2]' (or one "
                          f"string \"grid.{name}='KEY:V1,V2'\")")
    key, sep, values = text.partition(":")
    if not sep:
        raise ConfigError(f"grid.{name}={text!r}: give values after a colon, e.g. \"grid.{name}='{key.strip()}:1,2,3'\""
                          f", or grid.{name}.key={key.strip()} 'grid.{name}.values=[1,2,3]'")
    return key.strip(), tuple(v.strip() for v in values.split(",") if v.strip())


def _structured_axis(given: Mapping, name: str) -> tuple[str, tuple[str, ...]]:
    """{key: KEY, values: [V1, V2]} → (key, values as written); a list value of network_muls or
    guidance.weights (several multipliers per cell) joins with ';'."""
    unknown = sorted(set(given) - {"key", "values"})
    if unknown:
        raise ConfigError(f"grid.{name}.{unknown[0]}: unknown; an axis has grid.{name}.key and grid.{name}.values")
    if not given.get("key"):
        raise ConfigError(f"grid.{name}.key is not set: name what the axis changes, e.g. grid.{name}.key=seed")
    values = given.get("values")
    if values is None:
        raise ConfigError(f"grid.{name}.values is not set: give the axis's values, e.g. 'grid.{name}.values=[1,2,3]'")
    values = values if isinstance(values, list | tuple) else [values]
    return str(given["key"]).strip(), tuple(_written(v) for v in values if str(v).strip())


def _written(value: Any) -> str:
    """One structured value as the string form writes it (its label): [0.5, 1] → '0.5;1'."""
    if isinstance(value, list | tuple):
        return ";".join(str(v).strip() for v in value)
    return str(value).strip()


def axis_key(given: Any) -> str | None:
    """The key of grid.x/y/z as given, unchecked (None when unset or unreadable)."""
    if isinstance(given, Mapping):
        return str(given.get("key") or "").strip() or None
    return given.partition(":")[0].strip() if isinstance(given, str) else None


def parse_value(axis: Axis, value: str, name: str) -> Any:
    """One cell's value of the axis, parsed and checked: int, float or str by key, a sampler name, or the
    network multipliers as a tuple; prompt_sr words stay as written. `name` (x, y or z) is for the message."""
    if axis.key == "prompt_sr":
        return value
    if axis.key in SAMPLER_KEYS:
        if value not in SAMPLERS:
            raise ConfigError(f"grid.{name}: unknown sampler '{value}'; choose one of: {', '.join(SAMPLERS)}")
        return value
    try:
        if axis.key in MULTI_KEYS:
            muls = tuple(float(v) for v in value.split(";"))
            if not all(math.isfinite(v) for v in muls):
                raise ValueError(value)
            return muls
        field, parse = AXIS_FIELDS[axis.key]
        parsed = parse(value)
    except ValueError:
        raise ConfigError(f"grid.{name}: '{value}' is not a valid {axis.key} value") from None
    check, valid = _VALUE_CHECKS.get(field, (None, ""))
    if check is not None and not check(parsed):
        raise ConfigError(f"grid.{name}: {axis.key} {value} is not valid; give {valid}")
    return parsed


def axis_field(axis: Axis) -> str:
    """The ImageJob field an axis changes (sampler for a sampler name); prompt_sr changes the prompts."""
    if axis.key in SAMPLER_KEYS:
        return "sampler"
    if axis.key in ("prompt_sr", "network_muls"):
        return "network_muls" if axis.key == "network_muls" else "prompt"
    if axis.key == "guidance.weights":
        return "features"
    return AXIS_FIELDS[axis.key][0]


def size_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of width × height is refused before loading (perf.max_pixels), or None."""
    if width * height <= max_pixels:
        return None
    side = math.isqrt(max_pixels)
    limit = f"{side}x{side}" if side * side == max_pixels else f"{max_pixels} pixels"
    return (f"{width}x{height} is {width * height} pixels per image, over perf.max_pixels={max_pixels} ({limit}); "
            f"use a smaller size, or raise the bound with perf.max_pixels={width * height}")


def image_problem(sampler: str, steps: int, width: int | None, height: int | None, *,
                  strength: float | None = None, highres: Any = None, cfg_scale: float = 0.0,
                  max_pixels: int | None = None) -> tuple[str, tuple[str, ...]] | None:
    """What makes one image's final settings unrunnable: (message, the ImageJob fields at fault), or None.

    `strength` only for img2img images, `highres` the image's Highres. fix settings (None when off); the size is
    checked when both sides and `max_pixels` are known. Used for grid cells (config time and planning) and for
    the images of prompt lines, so every way of setting a value gets the same checks.
    """
    least = MIN_STEPS.get(sampler, 1)
    if steps < least:
        return f"sampler {sampler} needs steps >= {least}, got {steps}", ("sampler", "steps")
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        return f"cfg_scale must be a finite number >= 0, got {cfg_scale}", ("cfg_scale",)
    if strength is not None and int(steps * strength) < 1:
        return (f"strength {strength} × steps {steps} leaves no denoising step (diffusers runs int(steps × "
                "strength)); raise strength or steps", ("strength", "steps"))
    if highres is not None:
        if int(steps * highres.strength) < 1:
            return (f"highres.strength {highres.strength} × steps {steps} leaves no second-stage step; raise "
                    "highres.strength or steps", ("steps",))
        if highres.steps < least:
            return f"sampler {sampler} needs highres.steps >= {least}, got {highres.steps}", ("sampler",)
    if max_pixels is not None and width is not None and height is not None:
        problem = size_problem(width, height, max_pixels)
        if problem:
            return problem, ("width", "height")
    return None


def cells_at_fault(cell: list[tuple[str, Axis, str]], fields: tuple[str, ...]) -> str:
    """`grid.x=sampler:plms, grid.y=steps:2`: the cell's values that set one of `fields` ('' when none does)."""
    return ", ".join(f"grid.{name}={axis.key}:{value}" for name, axis, value in sorted(cell, key=lambda c: c[0])
                     if axis_field(axis) in fields)


def axis_given(value: Any) -> bool:
    """Whether grid.x/y/z is set: a string, or a mapping with a key or values (null and "" are unset)."""
    if isinstance(value, Mapping):
        return any(value.get(part) is not None for part in UNSET_AXIS) or bool(set(value) - set(UNSET_AXIS))
    return bool(value)


def grid_axes(spec: RunSpec) -> list[Axis]:
    """The fused-grid axes in x, y, z order (checked: keys, values); empty when no grid is asked for."""
    x, y, z = (axis_given(getattr(spec.grid, name)) for name in "xyz")
    if not x and (y or z):
        raise ConfigError("grid.y / grid.z need grid.x first (grid.x is the columns)")
    if not y and z:
        raise ConfigError("grid.z needs grid.y (grid.y is the rows)")
    axes = [parse_axis(getattr(spec.grid, name), name) for name in "xyz" if axis_given(getattr(spec.grid, name))]
    _check_cells(spec, axes)
    for name, axis in zip("xyz", axes, strict=False):
        if axis.key == "guidance.weights":
            _check_guidance_axis(spec, axis, name)
    return axes


def _check_guidance_axis(spec: RunSpec, axis: Axis, name: str) -> None:
    """guidance.weights sweeps ControlNet weights (LLLite multipliers): it needs guidance=controlnet (or lllite)
    and at most one value per model."""
    if spec.guidance.name not in ("controlnet", "lllite"):
        raise ConfigError(f"grid.{name}=guidance.weights needs guidance=controlnet or lllite with guidance.models")
    count = len(spec.guidance.models)
    for value in axis.values:
        if len(parse_value(axis, value, name)) > count:
            raise ConfigError(f"grid.{name}: guidance.weights value {value!r} gives more weights than the {count} "
                              "model(s) in guidance.models")


def _check_cells(spec: RunSpec, axes: list[Axis]) -> None:
    """Every combination of the axes' sampler, steps, strength and size values with the run's other settings
    (the same checks as the run's own keys), so a bad cell fails before any model loads, naming grid.x/y/z."""
    fields = ("sampler", "steps", "strength", "width", "height", "cfg_scale")
    named = [(name, axis) for name, axis in zip("xyz", axes, strict=False) if axis_field(axis) in fields]
    if not named:
        return
    img2img = spec.init_image is not None
    own = None if img2img else spec.model.default_size  # a size left null: the model's, or the init image's
    base = {"sampler": spec.sampler.name, "steps": spec.sampler.steps, "cfg_scale": spec.sampler.cfg_scale,
            "width": spec.width if spec.width is not None else own,
            "height": spec.height if spec.height is not None else own,
            "strength": spec.strength if img2img else None}
    highres = spec.highres if spec.highres.name == "on" else None
    choices = [[(name, axis, value, parse_value(axis, value, name)) for value in dict.fromkeys(axis.values)]
               for name, axis in reversed(named)]
    for choice in itertools.product(*choices):
        values, cell = dict(base), [(name, axis, value) for name, axis, value, _ in choice]
        for _, axis, _, parsed in choice:  # z first, x last: x wins when two axes set one field, as in expand
            values[axis_field(axis)] = parsed
        if not img2img:
            values["strength"] = None
        problem = image_problem(values["sampler"], values["steps"], values["width"], values["height"],
                                strength=values["strength"], highres=highres, cfg_scale=values["cfg_scale"],
                                max_pixels=spec.perf.max_pixels)
        if problem and (where := cells_at_fault(cell, problem[1])):
            raise ConfigError(f"{where}: {problem[0]}")

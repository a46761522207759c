"""Fused-grid axes: `grid.x/y/z=KEY:V1,V2` parsed and every value checked, before any job or model exists."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdbatch.config.sampler_registry import get_sampler
from sdbatch.config.spec import RunSpec
from sdbatch.errors import ConfigError

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
# network_muls: one value per cell, the networks' multipliers separated by ";" ("0.5" or "0.5;1"), like --am
AXIS_KEYS = (*AXIS_FIELDS, *SAMPLER_KEYS, "prompt_sr", "network_muls")


@dataclass(frozen=True, slots=True)
class Axis:
    """One grid axis: the key it changes and its values, as written (they are the labels)."""

    key: str
    values: tuple[str, ...]

    @property
    def labels(self) -> list[str]:
        """Cell labels: the key's last part and the value ("cfg_scale: 7"), short enough for small cells."""
        return [f"{self.key.rpartition('.')[2]}: {v}" for v in self.values]


def parse_axis(text: str, name: str) -> Axis:
    """`sampler.cfg_scale:5,7,9` → Axis; a bad key or value names grid.x/y/z and what is valid."""
    key, sep, values = text.partition(":")
    key = key.strip()
    items = tuple(v.strip() for v in values.split(",") if v.strip()) if sep else ()
    if key not in AXIS_KEYS:
        raise ConfigError(f"grid.{name}: unknown axis key '{key}'; choose one of: {', '.join(AXIS_KEYS)}")
    if not items:
        raise ConfigError(f"grid.{name}={text!r}: give values after a colon, e.g. grid.{name}={key}:1,2,3")
    axis = Axis(key, items)
    for value in items:  # fail before any model loads, not halfway through the run
        parse_value(axis, value, name)
    return axis


def parse_value(axis: Axis, value: str, name: str) -> Any:
    """One cell's value of the axis, parsed and checked: int, float or str by key, a sampler name, or the
    network multipliers as a tuple; prompt_sr words stay as written. `name` (x, y or z) is for the message."""
    try:
        if axis.key == "prompt_sr":
            return value
        if axis.key == "network_muls":
            return tuple(float(v) for v in value.split(";"))
        if axis.key in SAMPLER_KEYS:
            get_sampler(value)
            return value
        _, parse = AXIS_FIELDS[axis.key]
        parsed = parse(value)
    except ValueError:
        raise ConfigError(f"grid.{name}: '{value}' is not a valid {axis.key} value") from None
    if axis.key in ("width", "height") and (parsed <= 0 or parsed % 8):
        raise ConfigError(f"grid.{name}: {axis.key} {parsed} must be a positive multiple of 8")
    return parsed


def grid_axes(spec: RunSpec) -> list[Axis]:
    """The fused-grid axes in x, y, z order (checked: keys, values); empty when no grid is asked for."""
    given = [(name, getattr(spec.grid, name)) for name in "xyz"]
    if given[0][1] is None and any(text for _, text in given[1:]):
        raise ConfigError("grid.y / grid.z need grid.x first (grid.x is the columns)")
    if given[1][1] is None and given[2][1]:
        raise ConfigError("grid.z needs grid.y (grid.y is the rows)")
    return [parse_axis(text, name) for name, text in given if text]

"""Fused grids: `grid.x=KEY:V1,V2 grid.y=... grid.z=...` expand each planned image into one image per cell.

All cells are jobs of the same run, so cells that differ only in seed, CFG scale or prompt text share
UNet batches. Axis values replace one field of each job; `prompt_sr` is A1111's prompt search/replace.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from sdbatch.config.spec import NetworkConfig
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import ImageJob
from sdbatch.plan.planner import SEED_LIMIT, file_name, network_muls
from sdbatch.config.sampler_registry import effective_schedule, get_sampler

# axis key → (ImageJob field, value parser); prompt_sr and sampler are handled specially
_FIELDS = {
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
# network_muls: one value per cell, the networks' multipliers separated by ";" ("0.5" or "0.5;1"), like --am
AXIS_KEYS = (*_FIELDS, "sampler", "sampler.name", "prompt_sr", "network_muls")


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
        _apply(_PROBE, axis, value, name)
    return axis


def expand(jobs: list[ImageJob], axes: list[Axis], naming: str, network: NetworkConfig | None = None,
           ) -> list[ImageJob]:
    """Every job once per cell (z slowest, x fastest), renumbered; the prompt_sr word is the first value.

    `network` (the run's) completes network_muls cells as --am is completed: the last value repeats.
    """
    for name, axis in zip("xyz", axes, strict=False):
        if axis.key == "prompt_sr":
            check_search_word(jobs, axis.values[0], f"grid.{name}=prompt_sr")
    cells = list(itertools.product(*(axis.values for axis in reversed(axes))))
    out = []
    for job in jobs:
        for cell in cells:
            new = job
            for axis, value in zip(reversed(axes), cell, strict=True):
                new = _apply(new, axis, value, "xyz"[axes.index(axis)])
            if network is not None and new.network_muls is not None:
                new = dataclasses.replace(new, network_muls=network_muls(new.network_muls, network))
            index = len(out)
            out.append(dataclasses.replace(new, index=index, file_name=file_name(naming, index, new.seed)))
    return out


def search_replace(job: ImageJob, search: str, word: str) -> ImageJob:
    """A1111's Prompt S/R on one image: `search` replaced by `word` in its prompt and its negative prompt."""
    return dataclasses.replace(job, prompt=job.prompt.replace(search, word),
                               negative_prompt=job.negative_prompt.replace(search, word))


def check_search_word(jobs: list[ImageJob], search: str, key: str) -> None:
    """Prompt S/R needs its search word in some prompt: otherwise every image would come out the same."""
    if jobs and not any(search in job.prompt or search in job.negative_prompt for job in jobs):
        raise ConfigError(f"{key}: the word {search!r} (the first one, which the others replace) is in no prompt "
                          f"or negative prompt, e.g. not in {jobs[0].prompt!r}; put it in the prompt")


def _apply(job: ImageJob, axis: Axis, value: str, name: str) -> ImageJob:
    try:
        if axis.key == "prompt_sr":
            return search_replace(job, axis.values[0], value)
        if axis.key == "network_muls":
            return dataclasses.replace(job, network_muls=tuple(float(v) for v in value.split(";")))
        if axis.key in ("sampler", "sampler.name"):
            get_sampler(value)
            return dataclasses.replace(job, sampler=value, schedule=effective_schedule(value, "default"))
        field, parse = _FIELDS[axis.key]
        parsed = parse(value)
    except ValueError:
        raise ConfigError(f"grid.{name}: '{value}' is not a valid {axis.key} value") from None
    if field == "seed":
        parsed %= SEED_LIMIT
    if field in ("width", "height") and (parsed <= 0 or parsed % 8):
        raise ConfigError(f"grid.{name}: {axis.key} {parsed} must be a positive multiple of 8")
    return dataclasses.replace(job, **{field: parsed})


_PROBE = ImageJob(index=0, file_name="", prompt="", negative_prompt="", seed=0, width=8, height=8, steps=1,
                  sampler="ddim", schedule="default", cfg_scale=1.0, eta=0.0, origin="grid")


@dataclass(frozen=True, slots=True)
class Sheet:
    """One labelled contact sheet: file names in rows × columns (None = no image), with axis labels."""

    name: str  # grid.png, or grid-z1.png ... with a z axis
    title: str | None
    rows: list[list[str]]
    x_labels: list[str]
    y_labels: list[str]


def sheets(jobs: list[ImageJob], axes: list[Axis], base_count: int) -> list[Sheet]:
    """The X/Y sheets of an expanded run, one per z value; several planned images stack their rows."""
    x, y, z = (axes + [None, None])[:3] if axes else (None, None, None)
    nx, ny = len(x.values) if x else 1, len(y.values) if y else 1
    nz = len(z.values) if z else 1
    per_base = nx * ny * nz
    out = []
    for zi in range(nz):
        rows, y_labels = [], []
        for base in range(base_count):
            for yi in range(ny):
                start = base * per_base + zi * nx * ny + yi * nx
                rows.append([job.file_name for job in jobs[start : start + nx]])
                label = y.labels[yi] if y else ""
                y_labels.append(f"#{base + 1} {label}".strip() if base_count > 1 else label)
        name = f"grid-z{zi + 1}.png" if z else "grid.png"
        out.append(Sheet(name, z.labels[zi] if z else None, rows, x.labels if x else [""], y_labels))
    return out

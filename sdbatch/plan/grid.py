"""Fused grids: `grid.x=KEY:V1,V2 grid.y=... grid.z=...` expand each planned image into one image per cell.

All cells are jobs of the same run, so cells that differ only in seed, CFG scale or prompt text share
UNet batches. Axis values replace one field of each job; `prompt_sr` is A1111's prompt search/replace.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import PurePath

from sdbatch.config.grid_axes import AXIS_FIELDS, SAMPLER_KEYS, Axis, cells_at_fault, image_problem, parse_value
from sdbatch.config.sampler_registry import effective_schedule
from sdbatch.config.spec import NetworkConfig
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import ImageJob
from sdbatch.plan.planner import file_name, network_muls


def expand(jobs: list[ImageJob], axes: list[Axis], naming: str, network: NetworkConfig | None = None,
           max_pixels: int | None = None) -> list[ImageJob]:
    """Every job once per cell (z slowest, x fastest), renumbered; the prompt_sr word is the first value.

    `network` (the run's) completes network_muls cells as --am is completed: the last value repeats. Every
    image gets the run's checks with its cell's values (steps for its sampler, size within `max_pixels`, ...),
    so a cell that cannot run fails here, naming grid.x/y/z, before any model loads.
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
            _check_cell(new, list(zip("xyz", axes, reversed(cell), strict=False)), max_pixels)
            index = len(out)
            name = file_name(naming, index, new.seed, PurePath(new.file_name).suffix)  # keeps output.format's
            out.append(dataclasses.replace(new, index=index, file_name=name))
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
    """The job with one cell's value of the axis in place (checked by parse_value, as at config time)."""
    if axis.key == "prompt_sr":
        return search_replace(job, axis.values[0], value)
    parsed = parse_value(axis, value, name)
    if axis.key == "network_muls":
        return dataclasses.replace(job, network_muls=parsed)
    if axis.key == "guidance.weights":  # the first models' ControlNet weights
        return dataclasses.replace(job, features=job.features.replace(guidance=job.guidance.with_weights(parsed)))
    if axis.key in SAMPLER_KEYS:
        return dataclasses.replace(job, sampler=parsed, schedule=effective_schedule(parsed, "default"))
    field, _ = AXIS_FIELDS[axis.key]
    return dataclasses.replace(job, **{field: parsed})


def _check_cell(job: ImageJob, cell: list[tuple[str, Axis, str]], max_pixels: int | None) -> None:
    """The image of one cell gets the run's checks; a problem a cell's value causes names it and the line."""
    problem = image_problem(job.sampler, job.steps, job.width, job.height, cfg_scale=job.cfg_scale,
                            strength=job.strength if job.init_image else None, highres=job.highres,
                            max_pixels=max_pixels)
    if problem and (where := cells_at_fault(cell, problem[1])):
        raise ConfigError(f"{where} for {job.origin}: {problem[0]}")


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

"""The planning stage: a run spec → every image of the run, in order, with what the run needs besides.

Gathers the prompt lines (prompt_file, prompt, prompt_module, init images and their stored prompts), plans them
(seeds, names, feature settings), assigns ControlNet guide images and region masks, applies Prompt S/R, expands a
fused grid and resolves <lora:...> tags.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.config.grid_axes import Axis, grid_axes
from sdbatch.config.spec import NetworkConfig, RunSpec
from sdbatch.errors import ConfigError
from sdbatch.plan.grid import Sheet, check_search_word, expand, search_replace, sheets
from sdbatch.plan.guides import assign_guides
from sdbatch.plan.jobs import ImageJob
from sdbatch.plan.lora_tags import apply_tags
from sdbatch.plan.planner import plan
from sdbatch.plan.regions import assign_masks
from sdbatch.prompts.init_images import list_images, pair_with_images, prompt_from_image
from sdbatch.prompts.sources import PromptLine, read_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """Every image of a run and what the run needs besides them."""

    jobs: list[ImageJob]  # in run order; names and seeds are final
    network: NetworkConfig  # network.loras plus the files the prompts' <lora:...> tags name
    axes: list[Axis]  # the fused grid's axes, x, y, z (empty without a grid)
    base_count: int  # images planned before the grid expanded each into its cells

    def sheets(self) -> list[Sheet]:
        """The fused grid's labelled sheets (none without a grid)."""
        return sheets(self.jobs, self.axes, self.base_count) if self.axes else []


def plan_run(spec: RunSpec, base_seed: int, engine: Any = None) -> RunPlan:
    """The run's plan; `engine` is handed to a prompt_module (which may use the models), else unused."""
    # a prompt_module sees the run's base seed (drawn when seed=null), so its lines come back on resume
    seeded = spec if spec.seed is not None else dataclasses.replace(spec, seed=base_seed)
    jobs = plan(spec, prompt_lines(seeded, engine), base_seed)
    if spec.prompt_sr is not None:  # one word of a +sweeps=prompt_sr multirun
        check_search_word(jobs, spec.prompt_sr_words[0], "prompt_sr_words")
        jobs = [search_replace(job, spec.prompt_sr_words[0], spec.prompt_sr) for job in jobs]
    jobs = assign_masks(assign_guides(jobs, spec), spec)
    axes, base_count = grid_axes(spec), len(jobs)
    if axes:  # a fused grid: each planned image becomes one image per cell
        jobs = expand(jobs, axes, spec.output.naming, spec.network, spec.perf.max_pixels)
    # after the grid: an axis may write tags into prompts
    jobs, network = apply_tags(jobs, spec.network, spec.paths.models)
    return RunPlan(jobs, network, axes, base_count)


def prompt_lines(spec: RunSpec, engine) -> list[PromptLine]:
    """prompt_file lines, then inline prompts, then what prompt_module yields; with init images attached."""
    lines = []
    if spec.prompt_file or spec.prompt:
        lines = read_prompts(spec.prompt, spec.negative_prompt, spec.prompt_file)
    if spec.prompt_module:
        from sdbatch.prompts.module import load_prompter

        lines += list(load_prompter(spec.prompt_module, spec, engine))
    if spec.init_image is None:
        return lines
    images = list_images(spec.init_image)
    masks = _masks_of(spec, images)
    if not lines:  # no prompt given: each image brings back the prompt it was made with
        return [dataclasses.replace(_stored_prompt(image, spec), init_image=str(image), mask_image=masks[image])
                for image in images]
    return [dataclasses.replace(line, init_image=str(image), mask_image=masks[image])
            for line, image in pair_with_images(lines, images)]


def _masks_of(spec: RunSpec, images: list[Path]) -> dict[Path, str | None]:
    """The mask of each init image: mask_image's files in turn (init image i gets mask i, cycled)."""
    if spec.mask_image is None:
        return dict.fromkeys(images)
    masks = list_images(spec.mask_image, "mask_image")
    if len(masks) > 1 and len(masks) != len(images):
        log.warning("%d init images but %d masks: the masks are used in turn (cycled) <mask_image>",
                    len(images), len(masks))
    return {image: str(masks[i % len(masks)]) for i, image in enumerate(images)}


def _stored_prompt(image: Path, spec: RunSpec) -> PromptLine:
    line = prompt_from_image(image, spec.negative_prompt)
    if line is None:
        raise ConfigError(f"init_image {image} carries no prompt in its metadata that sdbatch can read back; "
                          "give prompt='...'")
    return line

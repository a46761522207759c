"""RunSpec + prompt lines → one ImageJob per image: seeds, repeats and deterministic file names."""

from __future__ import annotations

import random

from sdbatch.config.schema import RunSpec
from sdbatch.jobs import ImageJob
from sdbatch.prompts.sources import PromptLine
from sdbatch.samplers import effective_schedule

SEED_LIMIT = 2**32  # seeds live in [0, 2**32), as in A1111 and the reference tool


def random_base_seed() -> int:
    """A fresh base seed for a run whose `seed` is null (it is recorded, so the run can be redone)."""
    return random.SystemRandom().randrange(SEED_LIMIT)


def plan(spec: RunSpec, lines: list[PromptLine], base_seed: int) -> list[ImageJob]:
    """Every image of the run in order: n_iter passes over the lines, images_per_prompt each.

    Image k of the run gets seed base_seed + k (A1111 style), so any image can be redone alone.
    """
    jobs = []
    for _ in range(spec.n_iter):
        for line in lines:
            for _ in range(spec.images_per_prompt):
                index = len(jobs)
                seed = (base_seed + index) % SEED_LIMIT
                jobs.append(_job(spec, line, index, seed))
    return jobs


def file_name(naming: str, index: int, seed: int) -> str:
    """Deterministic names (no timestamps), so a re-run finds the images it already made."""
    if naming == "sequential":
        return f"im_{index + 1:06d}.png"
    return f"{index:05d}-{seed}.png"


def _job(spec: RunSpec, line: PromptLine, index: int, seed: int) -> ImageJob:
    sampler = spec.sampler
    return ImageJob(
        index=index,
        file_name=file_name(spec.output.naming, index, seed),
        prompt=line.text,
        negative_prompt=line.negative,
        seed=seed,
        width=spec.width,
        height=spec.height,
        steps=sampler.steps,
        sampler=sampler.name,
        schedule=effective_schedule(sampler.name, sampler.schedule),
        cfg_scale=sampler.cfg_scale,
        eta=sampler.eta,
        origin=line.origin,
    )

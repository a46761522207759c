"""Region masks → each planned image: regions.mask's files in turn (image k takes mask k mod count).

Only images whose prompt has AND parts use a mask; a mask given to a run without any is refused, since it would
have no effect.
"""

from __future__ import annotations

import dataclasses

from sdbatch.config.spec import RunSpec
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.couple import part_count
from sdbatch.prompts.init_images import image_size, list_images
from sdbatch.prompts.region_masks import KEY


def assign_masks(jobs: list[ImageJob], spec: RunSpec, start: int = 0) -> list[ImageJob]:
    """Image k (counting from `start`) with AND parts takes mask k mod count; the others take none."""
    coupled = next((job for job in jobs if part_count(job.prompt) > 1), None)
    if coupled is not None and spec.model.xti_embeddings:
        raise ConfigError(f"{coupled.origin}: AND prompts (Attention Couple) cannot be combined with "
                          "model.xti_embeddings; use model.textual_inversion, or drop the AND")
    _check_regional_networks(jobs, spec)
    if spec.regions.mask is None or not jobs:
        return jobs
    if coupled is None:
        raise ConfigError(f"{KEY} is set but no prompt has AND parts (A AND B) for its regions; add them or drop "
                          "the mask")
    masks = list_images(spec.regions.mask, KEY)
    for mask in masks:
        image_size(mask, KEY)
    codes = spec.regions.max_color_codes
    return [dataclasses.replace(job, region_mask=str(masks[(start + k) % len(masks)]), region_codes=codes)
            if part_count(job.prompt) > 1 else job for k, job in enumerate(jobs)]


def _check_regional_networks(jobs: list[ImageJob], spec: RunSpec) -> None:
    """network.regional binds LoRA i to part i: an AND prompt needs a part for every network."""
    count = len(spec.network.loras)
    if not spec.network.regional:
        return
    for job in jobs:
        parts = part_count(job.prompt)
        if 1 < parts < count:
            raise ConfigError(f"{job.origin}: network.regional=true binds {count} LoRA files to AND parts, but the "
                              f"prompt has {parts}; add parts or drop files from network.loras")

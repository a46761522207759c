"""Guide images → each planned image: ControlNet's hints (guidance.guide_image's files in turn, len(models) each)
and guided sampling's target (guided.guide_image's files in turn, one each).

The reference tool divided by the number of groups and crashed (ZeroDivisionError) with fewer guide images than
models; here that is one line naming the key. Assigned before a fused grid expands, so every cell of an image
shares its hints.
"""

from __future__ import annotations

import dataclasses
import logging

from sdbatch.config.spec import RunSpec
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.init_images import image_size, list_images

log = logging.getLogger(__name__)
KEY = "guidance.guide_image"
GUIDED_KEY = "guided.guide_image"


def assign_guides(jobs: list[ImageJob], spec: RunSpec, start: int = 0) -> list[ImageJob]:
    """Image k (counting from `start`) takes group k % groups of the guide images, one image per model, and image
    k % count of guided.guide_image."""
    if not jobs:
        return jobs
    if spec.guided.kind != "none" and spec.guided.guide_image is not None:
        targets = list_images(spec.guided.guide_image, GUIDED_KEY)
        for image in targets:
            image_size(image, GUIDED_KEY)
        jobs = [dataclasses.replace(job, guided_image=str(targets[(start + k) % len(targets)]))
                for k, job in enumerate(jobs)]
    if spec.guidance.name not in ("controlnet", "lllite"):
        return jobs
    groups = guide_groups(spec)
    return [dataclasses.replace(job, guide_images=groups[(start + k) % len(groups)]) for k, job in enumerate(jobs)]


def guide_groups(spec: RunSpec) -> list[tuple[str, ...]]:
    """The guide images in groups of len(guidance.models), each image checked to be readable."""
    images = list_images(spec.guidance.guide_image, KEY)
    count = len(spec.guidance.models)
    if len(images) < count:
        raise ConfigError(f"{KEY}={spec.guidance.guide_image} holds {len(images)} image(s) for {count} models in "
                          f"guidance.models: each image needs one guide image per model; add images to the folder "
                          "or use fewer models")
    if len(images) % count:
        log.warning("%s: %d images for %d models; the last %d are not used <%s>", spec.guidance.guide_image,
                    len(images), count, len(images) % count, KEY)
    for image in images[: len(images) - len(images) % count]:
        image_size(image, KEY)
    return [tuple(str(p) for p in images[g * count : (g + 1) * count]) for g in range(len(images) // count)]

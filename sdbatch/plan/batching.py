"""Group ImageJobs that can share one UNet call, over the whole run, then split to batch_size."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sdbatch.plan.jobs import ImageJob


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Exactly the fields that must be equal for images to share a UNet forward pass.

    Prompt, negative prompt, seed and CFG scale are per image (the scale travels as a tensor).
    """

    width: int
    height: int
    steps: int
    sampler: str
    schedule: str
    eta: float
    strength: float | None = None
    negative_scale: float | None = None
    network_muls: tuple[float, ...] | None = None
    and_parts: int = 1  # number of " AND " sub-prompts (regional prompts)
    deep_shrink: Any = None
    gradual_latent: Any = None
    img2img: bool = False  # starts from init images
    masked: bool = False  # inpainting (a mask_image with the init image)
    highres: Any = None  # Highres. fix settings (run-level today, on the job so the engine sees them)

    @classmethod
    def of(cls, job: ImageJob) -> BatchKey:
        return cls(job.width, job.height, job.steps, job.sampler, job.schedule, job.eta, job.strength,
                   job.negative_scale, job.network_muls, job.prompt.count(" AND ") + 1, job.deep_shrink,
                   job.gradual_latent, job.init_image is not None, job.mask_image is not None, job.highres)

    def order(self) -> tuple:
        """Sort key: network weights change least often (patching is expensive), then size, then the rest."""
        return (repr(self.network_muls), self.width * self.height, self.width, self.height, self.steps,
                self.sampler, self.schedule, repr(self))


@dataclass(frozen=True, slots=True)
class Batch:
    key: BatchKey
    jobs: tuple[ImageJob, ...]


def make_batches(jobs: Iterable[ImageJob], batch_size: int, per_image_networks: bool = False) -> list[Batch]:
    """Group by BatchKey across the whole run, order the groups to avoid switches, then split.

    Output names and seeds live on the jobs, so neither grouping, order nor batch_size changes any file.
    `per_image_networks` (network.mode=hooked): LoRA multipliers are per image, so they do not split batches.
    """
    groups: dict[BatchKey, list[ImageJob]] = {}
    for job in jobs:
        key = BatchKey.of(job)
        if per_image_networks:
            key = dataclasses.replace(key, network_muls=None)
        groups.setdefault(key, []).append(job)
    return [
        Batch(key, tuple(groups[key][i : i + batch_size]))
        for key in sorted(groups, key=BatchKey.order)
        for i in range(0, len(groups[key]), batch_size)
    ]


def neighbour_batches(jobs: Iterable[ImageJob], batch_size: int) -> list[Batch]:
    """The reference tool's batching, for comparison: only consecutive equal keys share a batch."""
    batches: list[Batch] = []
    pending: list[ImageJob] = []
    for job in jobs:
        if pending and (BatchKey.of(pending[-1]) != BatchKey.of(job) or len(pending) == batch_size):
            batches.append(Batch(BatchKey.of(pending[0]), tuple(pending)))
            pending = []
        pending.append(job)
    if pending:
        batches.append(Batch(BatchKey.of(pending[0]), tuple(pending)))
    return batches

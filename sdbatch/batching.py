"""Group ImageJobs that can share one UNet call, over the whole run, then split to batch_size."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sdbatch.jobs import ImageJob


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

    @classmethod
    def of(cls, job: ImageJob) -> BatchKey:
        return cls(job.width, job.height, job.steps, job.sampler, job.schedule, job.eta)


@dataclass(frozen=True, slots=True)
class Batch:
    key: BatchKey
    jobs: tuple[ImageJob, ...]


def make_batches(jobs: Iterable[ImageJob], batch_size: int) -> list[Batch]:
    """Group by BatchKey across the whole run (groups in order of first appearance), then split.

    Output names and seeds live on the jobs, so neither the grouping nor batch_size changes any file.
    """
    groups: dict[BatchKey, list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(BatchKey.of(job), []).append(job)
    return [
        Batch(key, tuple(members[i : i + batch_size]))
        for key, members in groups.items()
        for i in range(0, len(members), batch_size)
    ]

"""Group ImageJobs that can share one UNet call, over the whole run, then split to batch_size."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sdbatch.config.spec import feature_attribute
from sdbatch.plan.jobs import PER_IMAGE, ImageJob

# BatchKey fields computed from the job instead of copied from it: name → (type, how)
_DERIVED: dict[str, tuple[type, Callable[[ImageJob], Any]]] = {
    "and_parts": (int, lambda job: job.prompt.count(" AND ") + 1),  # number of " AND " sub-prompts (regional)
    "img2img": (bool, lambda job: job.init_image is not None),  # starts from init images
    "masked": (bool, lambda job: job.mask_image is not None),  # inpainting (a mask_image with the init image)
}
_HINTS = typing.get_type_hints(ImageJob)
_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(ImageJob) if f.name not in PER_IMAGE)


def _of(cls: type, job: ImageJob) -> Any:
    """The batch key of `job`."""
    return cls(**{name: getattr(job, name) for name in _JOB_FIELDS},
               **{name: derive(job) for name, (_, derive) in _DERIVED.items()})


def _order(self: Any) -> tuple:
    """Sort key: network weights change least often (patching is expensive), then size, then the rest."""
    return (repr(self.network_muls), self.width * self.height, self.width, self.height, self.steps,
            self.sampler, self.schedule, repr(self))


_BATCH_KEY_DOC = """Exactly the fields that must be equal for images to share a UNet forward pass.

Generated from ImageJob: every field not marked per-image (`sdbatch.plan.jobs.PER_IMAGE`: prompt, negative prompt,
seed, CFG scale, ... travel per image), `features` included, then `and_parts`, `img2img` and `masked` (`_DERIVED`).
`BatchKey.of(job)` builds it; `key.order()` sorts keys; `key.deep_shrink` reads `key.features` by feature name.
"""
BatchKey = dataclasses.make_dataclass(
    "BatchKey",
    [(name, _HINTS[name]) for name in _JOB_FIELDS] + [(name, tp) for name, (tp, _) in _DERIVED.items()],
    frozen=True, slots=True,
    namespace={"__module__": __name__, "__qualname__": "BatchKey", "__doc__": _BATCH_KEY_DOC,
               "of": classmethod(_of), "order": _order, "__getattr__": feature_attribute},
)


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

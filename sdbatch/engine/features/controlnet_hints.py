"""guidance.save_hints: each image's preprocessed ControlNet hints, written beside it as NAME-hint0.png, ...

A post-decode step outside Highres. fix's (order 90 > 50), so the hints saved are those of the final size, the
ones the user compares with the image. They come from the same cache the ControlNet's pass read them from.
"""

from __future__ import annotations

import dataclasses

from sdbatch.config.guidance_schema import ControlNetSettings
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import Decoded, Feature, PassWrapper, RunPass, StageImage
from sdbatch.engine.features.controlnet import batch_hints
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.jobs import ImageJob


def hint_job(job: ImageJob, index: int) -> ImageJob:
    """The record of model `index`'s hint of `job`: the job named NAME-hintINDEX.png."""
    stem, _, ext = job.file_name.rpartition(".")
    return dataclasses.replace(job, file_name=f"{stem}-hint{index}.{ext}")


class SaveHints(Feature):
    name = "guidance_hints"
    order = 90  # outside Highres. fix: the final size's hints

    def around_pass(self, engine, key: BatchKey, run: RunSpec | None) -> PassWrapper | None:
        settings: ControlNetSettings | None = key.features.get("guidance")
        if settings is None or not settings.save_hints:
            return None

        def with_hints(batch: Batch, run_pass: RunPass) -> Decoded:
            done = run_pass(batch)
            hints = tuple(StageImage(hint_job(job, i), image, {"hint": i}, save=True)
                          for i, unit in enumerate(settings.units)
                          for job, image in zip(batch.jobs, batch_hints(batch.jobs, i, unit, key.width, key.height),
                                                strict=True))
            return Decoded(done.latents, done.images, done.stages + hints)

        return with_hints


FEATURE = SaveHints()

"""What every per-image feature schema shares: the planned image it reads and `given_or`.

A per-image feature (Deep Shrink, Gradual Latent, Highres. fix, ...) is one `*_schema.py` module whose run-config
class is a RunSpec field and has `check(spec)`, `for_image(given, job)` and `LINE` (see `sdbatch.config.spec`).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

T = TypeVar("T")

class PlannedImage(Protocol):
    """The image a feature plans for: sdbatch.plan.jobs.ImageJob, read by duck typing (config cannot import plan)."""

    @property
    def origin(self) -> str: ...  # where the prompt came from, e.g. "prompts.txt:14" (starts error messages)

    @property
    def sampler(self) -> str: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def init_image(self) -> str | None: ...

    @property
    def mask_image(self) -> str | None: ...

    @property
    def guide_images(self) -> tuple[str, ...]: ...  # ControlNet hints, one per guidance.models entry

    @property
    def guided_image(self) -> str | None: ...  # guided sampling's target image (guided.guide_image, in turn)

    @property
    def guided_text(self) -> str | None: ...  # guided=clip's target text


def given_or(value: T | None, default: T) -> T:
    """`value` unless it is None (not given), else `default`."""
    return default if value is None else value

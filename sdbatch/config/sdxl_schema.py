"""SDXL's size conditioning: the sdxl.* run config, a line's --ow --oh --nw --nh --ct --cl, per-image settings.

SDXL's UNet is told six numbers besides the text (its ``add_time_ids``): the original size of the training image,
the top-left corner of its crop, and the target size. diffusers defaults them to original = target = the image
size and crop 0,0; so does sdbatch, and an image that changes none of them has no settings (its batch key is the
same as without SDXL). Sizes are [height, width] and crops [top, left], in diffusers' order; the negative prompt's
numbers default to the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

from sdbatch.config.feature_schema import PlannedImage, given_or
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec

Pair = tuple[int, int]


@dataclass(frozen=True, slots=True)
class SdxlLine:
    """A line's overrides, as the reference's SDXL generator names them; None = not given."""

    original_width: int | None = None  # --ow
    original_height: int | None = None  # --oh
    negative_original_width: int | None = None  # --nw
    negative_original_height: int | None = None  # --nh
    crop_top: int | None = None  # --ct
    crop_left: int | None = None  # --cl


@dataclass(frozen=True, slots=True)
class SizeConditioning:
    """An image's size conditioning; None = the default (the size of the pass, or for negatives the prompt's)."""

    original_size: Pair | None = None  # (height, width)
    crop: Pair = (0, 0)  # (top, left)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crop: Pair | None = None
    negative_target_size: Pair | None = None

    def time_ids(self, height: int, width: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prompt's, negative's) six numbers for an image of height × width: original, crop, target."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        prompt = (*original, *self.crop, *target)
        negative = (*(self.negative_original_size or original), *(self.negative_crop or self.crop),
                    *(self.negative_target_size or target))
        return prompt, negative

    def record(self, job: PlannedImage) -> dict:
        """The manifest's / sdbatch chunk's entry: the settings given, as lists."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}


DEFAULT = SizeConditioning()


def _pair(value: list[int] | None, key: str, minimum: int) -> Pair | None:
    if value is None:
        return None
    if len(value) != 2 or any(not isinstance(v, int) or v < minimum for v in value):
        what = "[top, left] of integers >= 0" if minimum == 0 else "[height, width] of positive integers"
        raise ConfigError(f"sdxl.{key} must be {what}, got {list(value)}")
    return (value[0], value[1])


@dataclass(frozen=True, slots=True)
class SdxlConfig:
    """sdxl.*: the size conditioning of every image (SDXL models only); a line's --ow ... override it."""

    LINE: ClassVar[type[SdxlLine]] = SdxlLine

    original_size: list[int] | None = None  # [height, width]; null = the image's size
    crop: list[int] | None = None  # [top, left]; null = [0, 0]
    target_size: list[int] | None = None  # [height, width]; null = the image's size
    negative_original_size: list[int] | None = None  # null = original_size
    negative_crop: list[int] | None = None  # null = crop
    negative_target_size: list[int] | None = None  # null = target_size

    def check(self, spec: RunSpec) -> None:
        """Each key is a pair of the right kind (keys named in the message)."""
        self.settings()

    def settings(self) -> SizeConditioning:
        sizes = {f.name: _pair(getattr(self, f.name), f.name, 0 if "crop" in f.name else 1) for f in fields(self)}
        return SizeConditioning(**{**sizes, "crop": sizes["crop"] or (0, 0)})

    def for_image(self, given: SdxlLine | None, job: PlannedImage) -> SizeConditioning | None:
        """The run's settings with the line's over them; None when they are all the defaults."""
        run = self.settings()
        given = given or SdxlLine()
        original = _merge(run.original_size, given.original_height, given.original_width, job)
        negative = _merge(run.negative_original_size, given.negative_original_height,
                          given.negative_original_width, job)
        crop = (given_or(given.crop_top, run.crop[0]), given_or(given.crop_left, run.crop[1]))
        image = SizeConditioning(original, crop, run.target_size, negative, run.negative_crop,
                                 run.negative_target_size)
        return None if image == DEFAULT else image


def _merge(size: Pair | None, height: int | None, width: int | None, job: PlannedImage) -> Pair | None:
    """A size with a line's height/width over it; a missing half is the image's own."""
    if height is None and width is None:
        return size
    base = size or (job.height, job.width)
    return (given_or(height, base[0]), given_or(width, base[1]))

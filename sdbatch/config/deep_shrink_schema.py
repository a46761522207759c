"""Deep Shrink's schema: the deep_shrink.* run config, a line's --ds* overrides, their checks and per-image settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from sdbatch.config.feature_schema import PlannedImage, given_or
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec


@dataclass(frozen=True, slots=True)
class DeepShrink:
    """Deep Shrink overrides from --dsd1 --dst1 --dsd2 --dst2 --dsr; None = not given on the line.

    Any of them turns Deep Shrink on for the prompt. `depth_1=None` with other fields set keeps the
    reference's rule "without --dsd1, depth 1 is the run's depth (or the default 3)": `DeepShrinkConfig.for_image`
    resolves it. An image's resolved settings are a DeepShrink too, with every field but depth_2 set.
    """

    depth_1: int | None = None  # down-block index 0..3 (SD 1.x/2.x UNets have 4 down blocks)
    timesteps_1: int | None = None  # depth 1 applies while t >= this
    depth_2: int | None = None
    timesteps_2: int | None = None  # depth 2 applies while timesteps_2 <= t < timesteps_1
    ratio: float | None = None  # downscale factor in (0, 1]


@dataclass(frozen=True, slots=True)
class DeepShrinkConfig:
    """Deep Shrink (the reference's --ds_*): a UNet down block sees a downscaled input while t is high."""

    LINE: ClassVar[type[DeepShrink]] = DeepShrink  # the line's overrides (--dsd1 ...)

    depth_1: int | None = None  # down block 0..3 to shrink; null = off (a prompt's --dsd1/--dst1/--dsr turn it on)
    timesteps_1: int = 650  # depth_1 is shrunk while t >= this
    depth_2: int | None = None  # a second block, shrunk while timesteps_2 <= t < timesteps_1
    timesteps_2: int = 650
    ratio: float = 0.5  # input scale of the shrunk block, 0 < ratio <= 1 (bicubic)

    def check(self, spec: RunSpec) -> None:
        """The run-level checks of deep_shrink.* (keys named in every message)."""
        for key in ("depth_1", "depth_2"):
            depth = getattr(self, key)
            if depth is not None and not 0 <= depth <= 3:
                raise ConfigError(f"deep_shrink.{key} must be a down-block index from 0 to 3, got {depth}")
        for key in ("timesteps_1", "timesteps_2"):
            if not 0 <= getattr(self, key) <= 1000:
                raise ConfigError(f"deep_shrink.{key} must be a timestep from 0 to 1000, got {getattr(self, key)}")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"deep_shrink.ratio must be in (0, 1], got {self.ratio}")

    def for_image(self, given: DeepShrink | None, job: PlannedImage) -> DeepShrink | None:
        """The image's Deep Shrink settings: the line's --dsd1 --dst1 --dsd2 --dst2 --dsr over deep_shrink.*.

        Off unless deep_shrink.depth_1 is set or the line gives any of them; a line without --dsd1 shrinks the
        run's depth_1, or block 3 (the reference's rule).
        """
        if given is None and self.depth_1 is None:
            return None
        given = given or DeepShrink()
        return DeepShrink(depth_1=given_or(given.depth_1, given_or(self.depth_1, 3)),
                          timesteps_1=given_or(given.timesteps_1, self.timesteps_1),
                          depth_2=given_or(given.depth_2, self.depth_2),
                          timesteps_2=given_or(given.timesteps_2, self.timesteps_2),
                          ratio=given_or(given.ratio, self.ratio))

"""The opt-in accelerators' settings (perf.tome_ratio, perf.deepcache.*): their checks and their record.

Both change pixels, so an image records them (A1111's "Token merging ratio" key in the infotext, and a
"DeepCache" key of ours, since A1111 has none); both are off by default and run-wide (one setting per run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import PerfConfig, RunSpec

# A1111's "Token merging ratio" slider stops at 0.9: above it nearly every token of the self-attention is merged
# away and the images fall apart (tomesd's own bound is < 1, where nothing is left to attend to).
TOME_MAX = 0.9


@dataclass(frozen=True, slots=True)
class DeepCacheConfig:
    """DeepCache (Ma et al. 2023): reuse the UNet's deep features between full steps."""

    # a full UNet call every `interval` steps of a pass (the first step is one); 1 = off
    interval: int = 1
    # the skip branch kept fresh on the steps between, numbered as DeepCache does: block = branch // 3 and
    # layer = branch % 3 of the shallowest down/up blocks; 0 (DeepCache's default for SD 1.5) recomputes only
    # conv_in and the last layer of the last up block, higher branches keep more of the UNet fresh
    branch: int = 0


def check(perf: PerfConfig, spec: RunSpec) -> None:
    """The run-level checks of perf.tome_ratio and perf.deepcache.* (keys named in every message)."""
    ratio = perf.tome_ratio
    if not 0 <= ratio <= TOME_MAX:  # NaN fails this too
        raise ConfigError(f"perf.tome_ratio must be from 0 (off) to {TOME_MAX} (A1111's bound), got {ratio}")
    if ratio and spec.network.regional:
        raise ConfigError("perf.tome_ratio cannot be combined with network.regional: the regional networks scale "
                          "each self-attention token by its region, and token merging averages tokens across "
                          "regions; set perf.tome_ratio=0 or network.regional=false")
    cache = perf.deepcache
    if cache.interval < 1:
        raise ConfigError(f"perf.deepcache.interval must be >= 1 (1 = off), got {cache.interval}")
    if cache.branch < 0:
        raise ConfigError(f"perf.deepcache.branch must be >= 0 (0 = DeepCache's default), got {cache.branch}")
    if perf.compile and (ratio or cache.interval > 1):
        key = "perf.tome_ratio" if ratio else "perf.deepcache.interval"
        raise ConfigError(f"{key} cannot be combined with perf.compile yet: the compiled UNet graph is not "
                          f"checked to see the accelerator's hooks come and go; set perf.compile=false")
    if cache.interval > 1 and spec.deep_shrink.depth_1 is not None:
        raise ConfigError(deepcache_with_deep_shrink())


def deepcache_with_deep_shrink() -> str:
    """Why DeepCache and Deep Shrink are refused together (run config or a prompt's --ds* options)."""
    return ("perf.deepcache.interval > 1 cannot be combined with Deep Shrink: the cached deep features would "
            "come from another input size; set perf.deepcache.interval=1 or turn Deep Shrink off")


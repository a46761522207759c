"""DeepCache (perf.deepcache.*; Ma, Fang and Wang 2023): reuse the UNet's deep features between full steps.

Adjacent denoising steps change the UNet's deep (low-resolution) features little. Every `interval`-th step of a
pass, starting with the first, runs the whole UNet and keeps the output of every module below the chosen skip
branch; the steps between run only the shallow path above it: conv_in, the shallow down layers of the branch, the
shallow up layers that read their skip connections, and the output head, with the kept outputs standing in for
the rest. The branch is numbered as DeepCache numbers it (block = branch // 3 from the shallow end, layer =
branch % 3 within it); 0, its default for SD 1.5, keeps only conv_in and the last up layer fresh.

We write our own rather than use the DeepCache package, which swaps UNet forwards for its own copies of diffusers'
code. Here UNet2DConditionModel.forward itself runs every call, so the time embedding, the attention mask and
ControlNet's residuals stay diffusers' own; on the steps between, the skipped modules' forwards are replaced, for
that call only, by their kept outputs. The cache belongs to one batch pass (Highres. fix's second stage is a new
pass) and holds every row of the call, so each image and each CFG part reuses its own features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sdbatch.config.accelerators_schema import deepcache_with_deep_shrink
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature
from sdbatch.engine.core.model_fn import Conditioning, ModelFn, ModelWrapper
from sdbatch.errors import ConfigError, ModelError

LAYERS = 3  # DeepCache's branch numbering: three layers per block


def skipped_modules(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """The outermost modules a step between full steps does not run, for DeepCache's skip branch `branch`.

    DeepCache's rule: with block b = branch // 3 and layer l = branch % 3, a down module of block i, layer j is
    skipped when (i, j) ≥ (b, l); an up module counted from the output end (block i, layer j, both reversed) when
    (i, j) > (b, l); the mid block always.
    """
    count = len(unet.down_blocks)
    if not 0 <= branch < LAYERS * count:
        raise ModelError(f"perf.deepcache.branch={branch}: this model's UNet has {count} blocks, so branches 0 to "
                         f"{LAYERS * count - 1}")
    block, layer = divmod(branch, LAYERS)
    skipped: list[torch.nn.Module] = [unet.mid_block]
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            skipped.append(down)
        elif i == block:
            skipped += [m for j, m in _layers(down) if j >= layer]
            skipped += list(down.downsamplers or [])  # DeepCache's layer len(resnets) of the block
    for i, up in enumerate(reversed(unet.up_blocks)):
        if i > block:
            skipped.append(up)
        elif i == block:
            count_up = len(up.resnets)
            skipped += [m for j, m in _layers(up) if count_up - 1 - j > layer]
    return skipped


def _layers(block: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer, module) for the block's resnets and attentions: resnet j and attention j are both layer j."""
    return [*enumerate(block.resnets), *enumerate(getattr(block, "attentions", None) or [])]


@dataclass
class Cache:
    """One pass's kept outputs: each skipped module's output at the last full step, and that step's input shape."""

    modules: list[torch.nn.Module]
    interval: int
    outputs: dict[int, Any] = field(default_factory=dict)  # id(module) → its output
    shape: tuple[int, ...] | None = None
    first_step: int | None = None

    def is_full(self, x: torch.Tensor, step: int) -> bool:
        """A full step: every interval-th step of the pass from its first, or when the rows or sizes changed
        (Gradual Latent grows the latents in the middle of a pass)."""
        if self.first_step is None:
            self.first_step = step
        return (step - self.first_step) % self.interval == 0 or tuple(x.shape) != self.shape

    @contextmanager
    def recording(self, x: torch.Tensor) -> Iterator[None]:
        """Inside the block, every skipped module's output is kept (forward hooks, removed after the call)."""
        self.outputs.clear()
        self.shape = None  # until the call completes, nothing may be reused

        def keep(module, args, output):
            self.outputs[id(module)] = output

        handles = [m.register_forward_hook(keep) for m in self.modules]
        try:
            yield
            self.shape = tuple(x.shape)
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def reusing(self) -> Iterator[None]:
        """Inside the block, every skipped module returns its kept output without running."""
        for module in self.modules:
            module.forward = _kept(self.outputs[id(module)])
        try:
            yield
        finally:
            for module in self.modules:
                del module.forward  # back to the class's forward


def _kept(output: Any):
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output

    return forward


def with_deepcache(unet: torch.nn.Module, interval: int, branch: int) -> ModelWrapper:
    """The UNet call with DeepCache for one batch pass (a fresh cache per pass)."""
    cache = Cache(skipped_modules(unet, branch), interval)

    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            if cache.is_full(x, cond.step):
                with cache.recording(x):
                    return inner(x, t, cond)
            with cache.reusing():
                return inner(x, t, cond)

        return model

    return wrap


class DeepCache(Feature):
    name = "deepcache"
    order = 4  # innermost UNet wrapper (it decides how the UNet itself runs)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings = ctx.run.perf.deepcache if ctx.run is not None else None
        if settings is None or settings.interval == 1:
            return None
        if ctx.key.features.get("deep_shrink") is not None:  # a prompt's --ds* options turned it on
            raise ConfigError(deepcache_with_deep_shrink())
        return BatchHooks(unet=with_deepcache(ctx.engine.bundle.unet, settings.interval, settings.branch))


FEATURE = DeepCache()

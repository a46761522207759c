"""The feature contract: how a feature says what it needs from the engine.

A feature is one module in `sdbatch.engine.features` with a module-level ``FEATURE``, an instance of a
`Feature` subclass. The engine finds every such module itself (`all_features`), asks each feature for its hooks
and assembles them; no feature is wired by hand. The hook kinds, and when the engine asks for them:

- once per run, inside `Engine.session`: `Feature.patch` → a `Patch` on the models (LoRA, XTI), undone exactly
  when the session ends, whatever happened;
- once per batch pass (a denoising loop and its decode), `Feature.batch_hooks` → `BatchHooks`:
  ``encode``: a wrapper around the batch's text encoding (LoRA's per-image multipliers, XTI's per-block text);
  ``start``: a start-latent provider or modifier, applied in feature order (txt2img, img2img, inpainting provide
  the start; Gradual Latent shrinks it);
  ``unet``: a UNet-call wrapper, innermost first in feature order (Deep Shrink, the 9-channel inpainting input,
  CFG, then guided sampling outermost);
  ``scheduler``: a wrapper around the batch's scheduler (Gradual Latent);
  ``after_step``: a hook on the latents after every scheduler step (inpainting's blend);
- once per batch, `Feature.around_pass` → a wrapper around the whole pass (denoise + decode) of the batch: the
  post-decode steps (paste the original, Highres. fix's second stage, which also runs the first stage).

Every hook is optional; a feature whose settings are not in the batch returns None. Per-row data for UNet calls
travels in the row contract (`sdbatch.engine.core.rows`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from PIL import Image

from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.conditioning import BatchText
from sdbatch.engine.core.denoise_loop import AfterStep
from sdbatch.engine.core.model_fn import Conditioning, ModelFn
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.jobs import ImageJob

if TYPE_CHECKING:
    from sdbatch.engine.core.engine import Engine


@dataclass(frozen=True)
class Start:
    """Where a batch's denoising begins: its timesteps and the latents at the first one's noise level."""

    timesteps: torch.Tensor
    latents: torch.Tensor


@dataclass(frozen=True)
class StageImage:
    """An image a pass made on the way to the final one (Highres. fix's first stage), with its own job."""

    job: ImageJob
    image: Image.Image
    extra: Mapping[str, Any] = field(default_factory=dict)  # added to its recorded parameters, e.g. {"stage": 1}
    save: bool = False  # whether the run writes it


@dataclass(frozen=True)
class Decoded:
    """A finished pass: the final latents and their images, in the order of the batch's jobs, and the images
    made on the way."""

    latents: torch.Tensor
    images: list[Image.Image]
    stages: tuple[StageImage, ...] = ()


class Patch(Protocol):
    """A change to the models that a run makes and undoes: restore() puts every module back exactly."""

    def restore(self) -> None: ...


Encode = Callable[[], Conditioning]  # encodes the batch's prompts (with whatever the wrappers set up)
EncodeWrapper = Callable[[Encode], Conditioning]
StartStep = Callable[["Start | None"], Start]  # the start so far (None before any provider) → the start
StartFn = Callable[[Any, list[torch.Generator]], tuple[torch.Tensor, torch.Tensor]]  # (scheduler, gens) → start


class RunPass(Protocol):
    """Denoise and decode one batch; `start` replaces the start-latent providers (Highres. fix's stage 2)."""

    def __call__(self, batch: Batch, start: StartFn | None = None) -> Decoded: ...


PassWrapper = Callable[[Batch, RunPass], Decoded]


@dataclass(frozen=True)
class BatchHooks:
    """What one feature adds to one batch pass; every field is optional."""

    encode: EncodeWrapper | None = None
    start: StartStep | None = None
    unet: Callable[[ModelFn], ModelFn] | None = None
    scheduler: Callable[[Any], Any] | None = None
    after_step: AfterStep | None = None


@dataclass
class BatchContext:
    """What batch hooks see: the engine and its models, the pass's batch, scheduler and per-image generators."""

    engine: Engine
    batch: Batch
    scheduler: Any  # a fresh diffusers scheduler, after set_timesteps(key.steps)
    generators: list[torch.Generator]
    run: RunSpec | None  # the session's run settings; None when a batch runs outside a session
    text: BatchText  # the batch's texts and their encoding (encode hooks wrap text.encode)
    start_given: bool = False  # the caller gives the start latents (Highres. fix's stage 2): no start steps run
    patches: Mapping[str, Patch] = field(default_factory=lambda: MappingProxyType({}))  # the session's, by feature

    @property
    def key(self) -> BatchKey:
        return self.batch.key

    @property
    def jobs(self) -> tuple[ImageJob, ...]:
        return self.batch.jobs


class Feature:
    """A feature's declarations; override the hooks it needs. `order` places its start step and UNet wrapper:
    lower runs first (start) and sits closer to the UNet (wrappers)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50

    def patch(self, engine: Engine, run: RunSpec) -> Patch | None:
        """The run's change to the models, or None."""
        return None

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        """This feature's hooks for one batch pass, or None when the batch does not use it."""
        return None

    def around_pass(self, engine: Engine, key: BatchKey, run: RunSpec | None) -> PassWrapper | None:
        """A wrapper around the batch's whole pass (post-decode steps), or None."""
        return None


@cache
def all_features() -> tuple[Feature, ...]:
    """Every feature module's FEATURE, in order (the modules of sdbatch.engine.features, found by name)."""
    from sdbatch.engine import features as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if isinstance(getattr(module, "FEATURE", None), Feature):
            found.append(module.FEATURE)
    return tuple(sorted(found, key=lambda f: (f.order, f.name)))

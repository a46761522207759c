"""ControlNet-LLLite (guidance=lllite): kohya's LLLite files on the SDXL UNet's attention projections.

Each LLLite module changes the input of one attention Linear (attn1 q/k/v, attn2 q):
``Linear(x + up(mid([cond, down(x)])) · multiplier)``, as kohya's LLLiteModule.forward computes it. We patch with
forward pre-hooks (installed for the session, removed by restore(): the weights are never touched, so the UNet
is exactly as before) that act only while a UNet call of an LLLite batch is running and its unit is active;
outside that, and at multiplier 0, the Linear sees its input unchanged. With several files the last one's
module sees the input first, as kohya's forward-chaining apply_to() does.

The cond image is each image's guide image at the generation size in [-1, 1]; its embedding (conditioning1)
is made once per batch and, at every call, gathered per row (each CFG row takes its own image's: kohya
repeats it for the uncond/cond halves) and flattened to tokens (b, c, h, w → b, h·w, c). If the latents are
smaller than the generation size (Gradual Latent, Deep Shrink) the map is resized to the tokens the module sees.
A unit is switched off once its ratio < step / steps (the reference's rule).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdbatch.config.lllite_schema import NAME, LLLiteSettings
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature
from sdbatch.engine.core.model_fn import Conditioning, ModelFn
from sdbatch.engine.core.rows import Rows, current
from sdbatch.engine.features.attention_couple import COUPLE
from sdbatch.engine.features.controlnet import batch_hints
from sdbatch.engine.guide.hints import hint_tensor
from sdbatch.engine.models.lllite_files import LLLiteFile, LLLiteModule, load_lllite, targets
from sdbatch.errors import ModelError
from sdbatch.plan.jobs import ControlNetRef

Maps = list[dict[str, torch.Tensor]]  # per file: module name → (images, C, h, w) conditioning map


@dataclass
class _Call:
    """What the hooks need during one UNet call: each file's multiplier (0 = off), maps and the call's rows."""

    weights: Sequence[float]
    maps: Maps
    rows: torch.Tensor  # each row's image index
    # Attention Couple calls the cross-attention with its own rows (the prompt rows once per part): then the
    # hooks read the rows of the module's call (`rows.current()`), not the UNet call's
    coupled: bool = False
    _tokens: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def tokens(self, index: int, name: str, count: int) -> torch.Tensor:
        """(rows, count, C): the module's conditioning of each row's image as `count` tokens."""
        inner = current() if self.coupled else None
        images = None if inner is None else inner.image
        key = (index, name, count, images)
        if key not in self._tokens:
            rows = self.rows if images is None else torch.tensor(images, device=self.rows.device)
            self._tokens[key] = _as_tokens(self.maps[index][name], count).index_select(0, rows)
        return self._tokens[key]


def _as_tokens(cond_map: torch.Tensor, count: int) -> torch.Tensor:
    """(images, C, h, w) → (images, count, C); resized (bilinear) when the module sees a smaller grid."""
    height, width = cond_map.shape[-2:]
    if height * width != count:
        new_h = max(1, round(height * math.sqrt(count / (height * width))))
        if count % new_h:
            raise ModelError(f"ControlNet-LLLite: a module sees {count} tokens, which no grid of the "
                             f"{height}x{width} conditioning map's shape gives; use another size")
        cond_map = F.interpolate(cond_map, size=(new_h, count // new_h), mode="bilinear", align_corners=False)
    return cond_map.flatten(2).transpose(1, 2)


class LLLitePatch:
    """The run's LLLite files hooked onto the UNet's Linears (inert outside `acting`)."""

    def __init__(self, unet: torch.nn.Module, files: Sequence[LLLiteFile]) -> None:
        param = next(unet.parameters())
        self.files = tuple(files)
        self._modules: list[dict[str, LLLiteModule]] = []
        found = []
        for i, lllite in enumerate(self.files):
            found.append(targets(lllite, unet, f"guidance.models[{i}]"))
            # a copy on the UNet's device and dtype: the cached file stays fp32 on the CPU
            self._modules.append({n: copy.deepcopy(m).to(param.device, param.dtype) for n, m in lllite.modules.items()})
        self._call: _Call | None = None
        self._handles = [target.register_forward_pre_hook(self._hook(i, name))
                         for i in reversed(range(len(found))) for name, target in found[i].items()]

    @property
    def controlnet_refs(self) -> tuple[ControlNetRef, ...]:
        """The records name LLLite files like ControlNet models (A1111's ControlNet extension loads both)."""
        return tuple(ControlNetRef(f.name, f.path, f.hash) for f in self.files)

    @torch.no_grad()
    def embed(self, cond_images: Sequence[torch.Tensor]) -> Maps:
        """Each file's conditioning maps for its (images, 3, H, W) cond images in [-1, 1]."""
        maps = []
        for modules, images in zip(self._modules, cond_images, strict=True):
            first = next(iter(modules.values())).up[0].weight
            images = images.to(first.device, first.dtype)
            maps.append({name: module.embed(images) for name, module in modules.items()})
        return maps

    @contextlib.contextmanager
    def acting(self, weights: Sequence[float], maps: Maps, rows: Rows) -> Iterator[None]:
        """The hooks add the files (at these multipliers) for the calls inside this block."""
        device = next(iter(maps[0].values())).device
        self._call = _Call(weights, maps, torch.tensor(rows.image, device=device), coupled=COUPLE in rows.per_call)
        try:
            yield
        finally:
            self._call = None

    def restore(self) -> None:
        """Remove the hooks: the UNet computes exactly as before (no weight was changed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int, name: str):
        module = self._modules[index][name]

        def hook(target: torch.nn.Module, args: tuple) -> tuple | None:
            call = self._call
            if call is None or call.weights[index] == 0 or not args:  # diffusers calls q/k/v with x positionally
                return None
            x = args[0]
            cond = call.tokens(index, name, x.shape[1]).to(module.up[0].weight.dtype)
            change = module.delta(x.to(cond.dtype), cond) * call.weights[index]
            return (x + change.to(x.dtype), *args[1:])

        return hook


def cond_images(ctx: BatchContext, settings: LLLiteSettings) -> list[torch.Tensor]:
    """Each file's cond images of the batch, (images, 3, H, W) in [-1, 1] at the pass's size."""
    device = ctx.engine.placement.device
    return [hint_tensor(batch_hints(ctx.jobs, i, unit, ctx.key.width, ctx.key.height), device, torch.float32) * 2 - 1
            for i, unit in enumerate(settings.units)]


def with_lllite(patch: LLLitePatch, settings: LLLiteSettings, maps: Maps) -> ModelFn:
    """The UNet-call wrapper: the active units' multipliers set for the call."""

    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            weights = [unit.weight if unit.active(cond.step, cond.steps) else 0.0 for unit in settings.units]
            if not any(weights):
                return inner(x, t, cond)
            with patch.acting(weights, maps, cond.rows_for(x)):
                return inner(x, t, cond)

        return model

    return wrap


class LLLite(Feature):
    name = NAME
    order = 25  # a UNet wrapper inside CFG (100); it only sets the hooks' state for the call

    def patch(self, engine, run: RunSpec) -> LLLitePatch | None:
        if run.guidance.name != NAME:
            return None
        bundle = engine.bundle
        if getattr(bundle, "text_encoder_2", None) is None:
            raise ModelError(f"guidance=lllite: ControlNet-LLLite files are for SDXL and {run.guidance.models[0]} "
                             "cannot patch this SD1/SD2 model; use an SDXL model or guidance=controlnet")
        files = [load_lllite(path, f"guidance.models[{i}]") for i, path in enumerate(run.guidance.models)]
        return LLLitePatch(bundle.unet, files)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings = ctx.key.features.get("guidance")
        patch = ctx.patches.get(self.name)
        if not isinstance(settings, LLLiteSettings) or patch is None:
            return None
        return BatchHooks(unet=with_lllite(patch, settings, patch.embed(cond_images(ctx, settings))))


FEATURE = LLLite()

"""ControlNet (guidance=controlnet): each model's residuals, from the image's hint, added to the UNet's skips.

A UNet-call wrapper inside CFG: it sees the stacked CFG rows and the plain 4-channel latents (outside the 9-channel
inpainting input), runs every active ControlNet on them (on SDXL with each row's pooled text and size values, as
the UNet gets them) and hands the summed residuals to the UNet call as
diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`. Which models act at a call follows
diffusers' rule (`ControlUnit.active`): `sum` adds every active model's residuals as diffusers' multi-ControlNet
and A1111 do; `mean` averages them element-wise, per residual tensor (gen_img's SDXL ControlNet meant to average,
but its `torch.mean(torch.stack(...))` has no dim and collapses every residual to one scalar); `alternate` lets
model `step % count` act alone, the reference tool's SD1/SD2 behaviour.

Hints are per image (each image's guide images, preprocessed at the pass's size), gathered per row. The
ControlNet call is split by each row's own text length, because diffusers' ControlNetModel takes no attention
mask: a short prompt never attends to the padding a longer one in the batch brings (batch invariance). Guess mode
runs the ControlNets on the prompt rows alone; the unconditional rows get no control (diffusers' guess_mode).
With Gradual Latent the hint is resized to the smaller latents; with Deep Shrink the ControlNet's matching down
block is shrunk like the UNet's, so its residuals fit the shrunk skips.

The models load at the session's start (`patch`), before LoRA merges into the UNet: a "difference" ControlNet is
built on the pristine base weights; later runs find them in the base model's cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sdbatch.config.guidance_schema import ControlNetSettings, ControlUnit
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature
from sdbatch.engine.core.model_fn import CHUNK_TOKENS, SIZE_VALUES, Conditioning, ModelFn
from sdbatch.engine.core.rows import PROMPT, TEXT_CHUNKS, TEXT_TOKENS, Rows
from sdbatch.engine.features.deep_shrink import active_depth, shrunk_input
from sdbatch.engine.guide.hints import hint_image, hint_tensor
from sdbatch.engine.models.controlnet_files import LoadedControlNet, load_controlnet
from sdbatch.plan.jobs import ControlNetRef, ImageJob

Residuals = tuple[list[torch.Tensor], torch.Tensor]  # (down-block residuals, mid-block residual)


@dataclass(frozen=True)
class LoadedControlNets:
    """The run's ControlNets (a session patch that changes no module: restore has nothing to undo)."""

    nets: tuple[LoadedControlNet, ...]

    @property
    def controlnet_refs(self) -> tuple[ControlNetRef, ...]:
        return tuple(ControlNetRef(n.name, n.file, n.hash) for n in self.nets)

    def restore(self) -> None:
        return None


@dataclass(frozen=True)
class Unit:
    """One model at work in a batch pass: its settings, its loaded model and its hints (images, 3, H, W)."""

    settings: ControlUnit
    net: torch.nn.Module
    hints: torch.Tensor
    dtype: torch.dtype  # the net's (diffusers' .dtype walks every module: read once per pass, not per call)


def load_units(bundle, settings: ControlNetSettings) -> list[LoadedControlNet]:
    """Each unit's model (cached with the base model; the session loaded them already)."""
    return [load_controlnet(unit.model, bundle, f"guidance.models[{i}]") for i, unit in enumerate(settings.units)]


def batch_hints(jobs: Sequence[ImageJob], index: int, unit: ControlUnit, width: int, height: int) -> list:
    """Model `index`'s hint images of the batch's jobs, at the pass's size."""
    return [hint_image(job.guide_images[index], unit.preprocess, width, height, "guidance.guide_image")
            for job in jobs]


def with_controlnet(units: list[Unit], settings: ControlNetSettings, deep_shrink) -> ModelFn:
    """The UNet-call wrapper: the active units' residuals, summed (or averaged), passed to the inner call."""

    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            acting = _acting(units, settings.combine, cond.step, cond.steps)
            if not acting:
                return inner(x, t, cond)
            depth = active_depth(deep_shrink, cond.host_timestep(t)) if deep_shrink is not None else None
            shrink = (depth, deep_shrink.ratio) if depth is not None and deep_shrink.ratio != 1 else None
            rows = cond.rows_for(x)
            call = Call(rows, _row_groups(rows, cond.embeddings.shape[1], settings.guess_mode), shrink)
            total = None
            for unit in acting:
                res = _residuals(unit, x, t, cond, call, settings.guess_mode)
                total = res if total is None else _add(total, res)
            if settings.combine == "mean" and len(acting) > 1:
                total = [d / len(acting) for d in total[0]], total[1] / len(acting)
            extra = {"down_block_additional_residuals": total[0], "mid_block_additional_residual": total[1]}
            return inner(x, t, replace(cond, unet_kwargs={**cond.unet_kwargs, **extra}))

        return model

    return wrap


def _acting(units: list[Unit], combine: str, step: int, steps: int) -> list[Unit]:
    """The units that act at this call: every active one (sum), or unit step % count if active (alternate);
    weight 0 acts as no ControlNet at all."""
    if combine == "alternate":
        units = [units[step % len(units)]]
    return [u for u in units if u.settings.weight != 0 and u.settings.active(step, steps)]


def _add(a: Residuals, b: Residuals) -> Residuals:
    return [x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1]


@dataclass(frozen=True)
class Call:
    """What every model of one UNet call shares: its rows, their groups by text length, Deep Shrink's block."""

    rows: Rows
    groups: list[tuple[torch.Tensor | None, int]]  # (row indices, None = all rows in order; text tokens)
    shrink: tuple[int, float] | None  # (down block, ratio) while Deep Shrink acts


def _residuals(unit: Unit, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, call: Call,
               guess: bool) -> Residuals:
    """One model's residuals for every row of the call; rows it does not see (guess mode) get zeros."""
    hints = _hint_rows(unit.hints, call.rows, x).to(unit.dtype)
    x, emb, shrink = x.to(unit.dtype), cond.embeddings.to(unit.dtype), call.shrink
    added = cond.added.to(x.device, unit.dtype) if cond.added is not None else None
    parts = []
    for index, tokens in call.groups:
        rows_x, rows_emb, rows_hint = (x, emb, hints) if index is None else (x[index], emb[index], hints[index])
        with shrunk_input(unit.net.down_blocks[shrink[0]], shrink[1]) if shrink else contextlib.nullcontext():
            down, mid = unit.net(rows_x, t, encoder_hidden_states=rows_emb[:, :tokens], controlnet_cond=rows_hint,
                                 conditioning_scale=unit.settings.weight, guess_mode=guess, return_dict=False,
                                 **_added_kwargs(added, index))
        if index is None:
            return list(down), mid
        parts.append((index, list(down), mid))
    return _scatter(parts, len(call.rows))


def _added_kwargs(added: torch.Tensor | None, index: torch.Tensor | None) -> dict:
    """SDXL's added conditioning (pooled text, size values) of the call's rows, as the UNet gets it; {} on SD1/SD2."""
    if added is None:
        return {}
    rows = added if index is None else added[index]
    return {"added_cond_kwargs": {"text_embeds": rows[:, :-SIZE_VALUES], "time_ids": rows[:, -SIZE_VALUES:]}}


def _row_groups(rows: Rows, length: int, guess: bool) -> list[tuple[torch.Tensor | None, int]]:
    """(row indices, text tokens) per own text length, None for all rows in order; guess mode keeps the prompt
    rows only."""
    chunks = rows.per_row(TEXT_CHUNKS)
    packed = rows.per_call.get(TEXT_TOKENS, length) < length  # AND parts one after another: all of them, padded
    own = [length] * len(rows) if chunks is None or packed else [int(c) * CHUNK_TOKENS for c in chunks.tolist()]
    by_length: dict[int, list[int]] = {}
    for r, tokens in enumerate(own):
        if not guess or rows.part[r] == PROMPT:
            by_length.setdefault(min(tokens, length), []).append(r)
    if len(by_length) == 1 and len(next(iter(by_length.values()))) == len(rows):
        return [(None, next(iter(by_length)))]
    return [(torch.tensor(index), tokens) for tokens, index in by_length.items()]


def _hint_rows(hints: torch.Tensor, rows: Rows, x: torch.Tensor) -> torch.Tensor:
    """The hint of each row's image, resized (bicubic) when the latents are smaller than the hints (Gradual
    Latent): a ControlNet reduces its hint 8× to the latent size."""
    per_row = hints.index_select(0, torch.tensor(rows.image, device=hints.device))
    size = (x.shape[-2] * 8, x.shape[-1] * 8)
    if per_row.shape[-2:] != size:
        per_row = F.interpolate(per_row.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return per_row


def _scatter(parts: list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]], count: int) -> Residuals:
    """Residuals of all `count` rows from the groups' results (zeros where no group ran)."""
    first_down, first_mid = parts[0][1], parts[0][2]
    down = [d.new_zeros((count, *d.shape[1:])) for d in first_down]
    mid = first_mid.new_zeros((count, *first_mid.shape[1:]))
    for index, part_down, part_mid in parts:
        for full, part in zip(down, part_down, strict=True):
            full[index.to(full.device)] = part
        mid[index.to(mid.device)] = part_mid
    return down, mid


class ControlNet(Feature):
    name = "guidance"  # the per-image settings' name (the guidance group); guidance=controlnet
    order = 20  # outside the 9-channel inpainting input (10) and Deep Shrink (5), inside CFG (100)

    def patch(self, engine, run: RunSpec) -> LoadedControlNets | None:
        if run.guidance.name != "controlnet":
            return None
        nets = [load_controlnet(path, engine.bundle, f"guidance.models[{i}]")
                for i, path in enumerate(run.guidance.models)]
        return LoadedControlNets(tuple(nets))

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings = ctx.key.features.get(self.name)
        if not isinstance(settings, ControlNetSettings):  # none, or guidance=lllite's settings
            return None
        device = ctx.engine.placement.device
        units = [Unit(unit, loaded.model,
                      hint_tensor(batch_hints(ctx.jobs, i, unit, ctx.key.width, ctx.key.height), device, torch.float32),
                      loaded.model.dtype)
                 for i, (unit, loaded) in enumerate(zip(settings.units, load_units(ctx.engine.bundle, settings),
                                                        strict=True))]
        return BatchHooks(unet=with_controlnet(units, settings, ctx.key.features.get("deep_shrink")))


FEATURE = ControlNet()

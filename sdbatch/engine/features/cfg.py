"""Classifier-free guidance, with gcem156's negative scale: the UNet-call wrapper around every
per-row one (only guided sampling, which moves the guided prediction, sits outside it).

Conditional and unconditional halves go through one UNet call, with per-image scales, so images with different
scales share a batch. The call's rows are the images once per CFG part (`Rows.stacked`), which is what the
module patches read their per-row data from.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature
from sdbatch.engine.core.model_fn import Conditioning, ModelFn
from sdbatch.engine.core.rows import NEGATIVE, PROMPT, UNCOND


def with_cfg(inner: ModelFn) -> ModelFn:
    """Classifier-free guidance: unconditional and conditional halves in one call, per-image scales.

    Images whose scale is ≤ 1 use the conditional prediction alone (as diffusers and the reference do).
    A batch where every scale is ≤ 1 comes without negative embeddings and skips the unconditional half
    (decided once per batch on the host, so no step waits on the GPU for it).

    With a negative scale (cond.uncond set) the call has three parts: the negative prompt, the prompt and the
    real unconditional "" prompt, combined as uncond + s·(text − uncond) − ns·(negative − uncond).
    """

    prepared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (scales as a (B,1,1,1) factor, scale > 1)

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        scales = cond.cfg_scales
        if cond.negative is None or scales is None:
            return inner(x, t, cond)
        parts = [cond.negative, cond.embeddings] + ([cond.uncond] if cond.uncond is not None else [])
        names = (NEGATIVE, PROMPT, UNCOND)[: len(parts)]
        added = None if cond.added is None else torch.cat(
            [cond.negative_added, cond.added, cond.uncond_added][: len(parts)])  # SDXL's, part by part as the text
        stacked = replace(cond, embeddings=torch.cat(parts), added=added, rows=cond.rows_for(x).stacked(names))
        preds = inner(torch.cat([x] * len(parts)), t, stacked).chunk(len(parts))
        negative, text = preds[0], preds[1]
        where = (text.device, text.dtype, id(scales))  # made once per pass, not once per step
        if where not in prepared:
            factor = scales.to(device=text.device, dtype=text.dtype).view(-1, 1, 1, 1)
            prepared[where] = factor, factor > 1
        s, guided_rows = prepared[where]
        if cond.uncond is None:
            guided = negative + s * (text - negative)
        else:
            uncond = preds[2]
            guided = uncond + s * (text - uncond) - cond.negative_scale * (negative - uncond)
        return torch.where(guided_rows, guided, text)

    return model


class ClassifierFreeGuidance(Feature):
    name = "cfg"
    order = 100  # outside every per-row wrapper: they see the stacked CFG rows (guided sampling, 110, sits outside)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks:
        return BatchHooks(unet=with_cfg)


FEATURE = ClassifierFreeGuidance()

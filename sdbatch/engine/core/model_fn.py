"""The model call inside each denoising step, built as wrappers that all keep one signature.

A model function maps (x, t, cond) → the UNet's prediction (eps or v) for the batch x. The sampling
loop only ever calls one; classifier-free guidance — and later ControlNet residuals, regional prompts,
Deep Shrink — are wrappers around it, so the loop never changes when a feature is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Conditioning:
    """What a batch is conditioned on; wrappers read their own fields and pass the rest on."""

    embeddings: torch.Tensor  # (B, 77·k, D) prompt embeddings
    negative: torch.Tensor | None = None  # (B, 77·k, D) negative-prompt embeddings; None = no CFG
    cfg_scales: torch.Tensor | None = None  # (B,) per-image guidance scale
    # sampler.negative_scale: the real unconditional ("" prompt) embeddings and the negative prompt's own scale
    uncond: torch.Tensor | None = None  # (B, 77·k, D)
    negative_scale: float | None = None
    unet_kwargs: dict = field(default_factory=dict)  # extra UNet arguments a wrapper adds (residuals, ...)
    inpaint: torch.Tensor | None = None  # (B, 5, h, w) mask + masked-image latents for 9-channel UNets
    deep_shrink: Any = None  # the batch's Deep Shrink settings (sdbatch.prompts.syntax.DeepShrink), None = off


ModelFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def unet_model(unet: torch.nn.Module) -> ModelFn:
    """The innermost model function: one UNet forward pass."""
    dtype = unet.dtype  # read once: diffusers' .dtype walks every module (~1 ms per call)

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        emb = cond.embeddings.to(dtype)
        return unet(x.to(dtype), t, encoder_hidden_states=emb, return_dict=False, **cond.unet_kwargs)[0]

    return model


def with_cfg(inner: ModelFn) -> ModelFn:
    """Classifier-free guidance: unconditional and conditional halves in one call, per-image scales.

    Images whose scale is ≤ 1 use the conditional prediction alone (as diffusers and the reference do).
    A batch where every scale is ≤ 1 comes without negative embeddings and skips the unconditional half
    (decided once per batch on the host, so no step waits on the GPU for it).

    With a negative scale (cond.uncond set) the call has three parts: the negative prompt, the prompt and the
    real unconditional "" prompt, combined as uncond + s·(text − uncond) − ns·(negative − uncond).
    """

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        scales = cond.cfg_scales
        if cond.negative is None or scales is None:
            return inner(x, t, cond)
        parts = [cond.negative, cond.embeddings] + ([cond.uncond] if cond.uncond is not None else [])
        preds = inner(torch.cat([x] * len(parts)), t, replace(cond, embeddings=torch.cat(parts))).chunk(len(parts))
        negative, text = preds[0], preds[1]
        s = scales.to(device=text.device, dtype=text.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        if cond.uncond is None:
            guided = negative + s * (text - negative)
        else:
            uncond = preds[2]
            guided = uncond + s * (text - uncond) - cond.negative_scale * (negative - uncond)
        return torch.where(s > 1, guided, text)

    return model

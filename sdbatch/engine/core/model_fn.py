"""The model call inside each denoising step: one signature, (x, t, cond) → the UNet's prediction.

A model function maps (x, t, cond) → the prediction (eps or v) for the batch x. The sampling loop only ever calls
one; features wrap it (classifier-free guidance, Deep Shrink, the inpainting input, ...: see
`sdbatch.engine.core.contract`), so the loop never changes when a feature is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdbatch.engine.core.rows import Rows, calling


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
    rows: Rows | None = None  # the row contract of the UNet call; None = one row per image, no per-row data

    def rows_for(self, x: torch.Tensor) -> Rows:
        """The call's rows: `rows`, or one plain row per image of x."""
        return self.rows if self.rows is not None else Rows.of_images(x.shape[0])


ModelFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
ModelWrapper = Callable[[ModelFn], ModelFn]


def unet_model(unet: torch.nn.Module) -> ModelFn:
    """The innermost model function: one UNet forward pass, its rows published to the module patches."""
    dtype = unet.dtype  # read once: diffusers' .dtype walks every module (~1 ms per call)

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        emb = cond.embeddings.to(dtype)
        with calling(cond.rows_for(x)):
            return unet(x.to(dtype), t, encoder_hidden_states=emb, return_dict=False, **cond.unet_kwargs)[0]

    return model

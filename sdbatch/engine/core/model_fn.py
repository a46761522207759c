"""The model call inside each denoising step: one signature, (x, t, cond) → the UNet's prediction.

A model function maps (x, t, cond) → the prediction (eps or v) for the batch x. The sampling loop only ever calls
one; features wrap it (classifier-free guidance, Deep Shrink, the inpainting input, ...: see
`sdbatch.engine.core.contract`), so the loop never changes when a feature is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdbatch.engine.core.rows import TEXT_CHUNKS, TEXT_TOKENS, Rows, calling

CHUNK_TOKENS = 77  # one encoded chunk: BOS + 75 tokens + EOS
SIZE_VALUES = 6  # SDXL's add_time_ids: original size, crop top-left, target size


@dataclass(frozen=True)
class Conditioning:
    """What a batch is conditioned on; wrappers read their own fields and pass the rest on."""

    embeddings: torch.Tensor  # (B, 77·k, D) prompt embeddings
    negative: torch.Tensor | None = None  # (B, 77·k, D) negative-prompt embeddings; None = no CFG
    cfg_scales: torch.Tensor | None = None  # (B,) per-image guidance scale
    # sampler.negative_scale: the real unconditional ("" prompt) embeddings and the negative prompt's own scale
    uncond: torch.Tensor | None = None  # (B, 77·k, D)
    negative_scale: float | None = None
    # SDXL's added conditioning of each CFG part, (B, P + 6): the pooled text embedding, then the six size values
    # (add_time_ids); None for SD1/SD2. They follow their part's embeddings through every wrapper.
    added: torch.Tensor | None = None
    negative_added: torch.Tensor | None = None
    uncond_added: torch.Tensor | None = None
    unet_kwargs: dict = field(default_factory=dict)  # extra UNet arguments a wrapper adds (residuals, ...)
    rows: Rows | None = None  # the row contract of the UNet call; None = one row per image, no per-row data
    step: int = 0  # which call of the pass this is (the loop's index into its timesteps) ...
    steps: int = 1  # ... of how many (ControlNet's start/end and alternation count in these)
    # the call's timestep as a host number, read once per pass: float(t) of a GPU tensor would make every step
    # wait for the GPU (a host sync) before the next step's kernels are queued
    timestep: float | None = None

    def host_timestep(self, t: torch.Tensor) -> float:
        """The call's timestep as a Python number: `timestep` when the loop gave it, else read from t (a sync)."""
        return self.timestep if self.timestep is not None else float(t.flatten()[0])

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
        rows = cond.rows_for(x)
        mask = padding_mask(rows, emb.shape[1], emb.device)
        extra = cond.unet_kwargs if mask is None else {**cond.unet_kwargs, "encoder_attention_mask": mask}
        if cond.added is not None:
            added = cond.added.to(emb.device, dtype)
            extra = {**extra, "added_cond_kwargs": {"text_embeds": added[:, :-SIZE_VALUES],
                                                    "time_ids": added[:, -SIZE_VALUES:]}}
        with calling(rows):
            return unet(x.to(dtype), t, encoder_hidden_states=emb, return_dict=False, **extra)[0]

    return model


def padding_mask(rows: Rows, length: int, device: torch.device) -> torch.Tensor | None:
    """(rows, length) 1 where a row's text is its own, 0 on the padding after it; None when nothing is padded.

    The text may hold several encodings one after the other (XTI's per-block ones), each TEXT_TOKENS long.
    """
    chunks = rows.per_row(TEXT_CHUNKS)
    if chunks is None:
        return None
    position = torch.arange(length, device=device) % rows.per_call[TEXT_TOKENS]
    return (position[None, :] < chunks.to(device)[:, None] * CHUNK_TOKENS).to(torch.float32)

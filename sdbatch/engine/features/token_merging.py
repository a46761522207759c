"""Token merging (perf.tome_ratio; ToMe for Stable Diffusion, Bolya & Hoffman 2023; A1111's "Token merging ratio").

The self-attention (attn1) of each transformer block at the latent's own resolution sees a shorter sequence:
the image tokens are split into destinations (the top-left token of every 2×2 cell) and sources (the rest); the
`ratio`·N sources most similar to a destination (cosine similarity of the block's input tokens) are averaged into
it, and attention's output is copied back to every merged token. tomesd's defaults, which A1111 uses: merge the
self-attention only, only at the full resolution (max_downsample 1), sx = sy = 2, and destinations not drawn
at random (A1111 passes use_rand=False).

We write our own rather than use the `tomesd` package: tomesd swaps the class of every transformer block and
keeps its state on the UNet, so undoing it at the end of a run is its own code path, not ours; and its random
destinations draw from one generator for the whole batch, which would make an image depend on its batch.
Ours is three forward hooks per block, removed exactly when the run ends, and each row of a UNet call (an
image's CFG part) is merged on its own tokens alone, so a batch gives the images made one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock

from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import Feature

log = logging.getLogger(__name__)

CELL = 2  # sx = sy = 2: one destination token per 2×2 cell of the latent

Merge = Callable[[torch.Tensor], torch.Tensor]


@cache
def _split(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, destinations): token indices of an h×w grid, in raster order; a destination is the top-left
    token of every whole 2×2 cell (a last odd row or column holds sources only, as in tomesd)."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    dst = (rows % CELL == 0) & (cols % CELL == 0) & (rows < height // CELL * CELL) & (cols < width // CELL * CELL)
    flat = dst.flatten()
    return flat.logical_not().nonzero().flatten().to(device), flat.nonzero().flatten().to(device)


def matching(metric: torch.Tensor, height: int, width: int, ratio: float) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens (B, N, C) of an h×w grid: bipartite soft matching, every row on its own.

    Each source token is paired with its most similar destination; the r = ratio·N best-matched sources (at
    most all of them) are averaged into their destinations by merge, and get their destination's value back
    from unmerge.
    """
    batch, tokens, _ = metric.shape
    src, dst = _split(height, width, metric.device)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src] @ unit[:, dst].transpose(-1, -2)  # (B, sources, destinations)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)  # stable: ties break the same way every time
        r = min(int(tokens * ratio), src.numel())
        merged, kept = order[:, :r], order[:, r:]
        into = partner.gather(1, merged)  # each merged source's destination, by destination index
    merged_pos, kept_pos = src[merged], src[kept]  # (B, r), (B, N_src - r): positions in the full sequence

    def merge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        sources = x[:, src]
        moving = sources.gather(1, merged[..., None].expand(-1, -1, channels))
        targets = x[:, dst].scatter_reduce(1, into[..., None].expand(-1, -1, channels), moving, reduce="mean")
        return torch.cat([sources.gather(1, kept[..., None].expand(-1, -1, channels)), targets], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        channels, n_kept = y.shape[-1], kept.shape[1]
        kept_values, targets = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(batch, tokens, channels)
        out[:, dst] = targets
        out.scatter_(1, kept_pos[..., None].expand(-1, -1, channels), kept_values)
        out.scatter_(1, merged_pos[..., None].expand(-1, -1, channels),
                     targets.gather(1, into[..., None].expand(-1, -1, channels)))
        return out

    return merge, unmerge


@dataclass
class _State:
    """What the hooks of one run share: the latent size of the UNet call in progress, a block's merge pair."""

    ratio: float
    size: tuple[int, int] = (0, 0)
    pair: tuple[Merge, Merge] | None = None
    merged: int = 0  # self-attention calls merged in the run
    calls: int = 0  # UNet calls in the run


@dataclass
class TokenMerging:
    """The run's patch: forward hooks on the UNet, every transformer block and its attn1; restore() removes them."""

    state: _State
    handles: list[Any] = field(default_factory=list)

    def restore(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        if self.state.calls and not self.state.merged:  # a model without attention at full resolution
            log.warning("token merging merged nothing in this run: this model's UNet has no self-attention at the "
                        "latent's full resolution <perf.tome_ratio=%g>", self.state.ratio)


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def apply(unet: torch.nn.Module, ratio: float) -> TokenMerging:
    """Hook token merging into `unet`'s self-attention at full resolution; the patch's restore() undoes it."""
    state = _State(ratio)
    patch = TokenMerging(state)

    def note_size(module, args, kwargs):
        state.size = tuple(_first(args, kwargs, "sample").shape[-2:])
        state.calls += 1

    def plan_block(module, args, kwargs):
        tokens = _first(args, kwargs, "hidden_states")
        height, width = state.size
        full = tokens.dim() == 3 and tokens.shape[1] == height * width  # the latent's own resolution only
        state.pair = matching(tokens, height, width, state.ratio) if full else None
        state.merged += full

    def merge_input(module, args, kwargs):
        if state.pair is None:
            return None
        if args:
            return (state.pair[0](args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state.pair[0](kwargs["hidden_states"])}

    def unmerge_output(module, args, kwargs, output):
        pair, state.pair = state.pair, None  # one attn1 per block: the pair is spent
        return output if pair is None else pair[1](output)

    try:
        patch.handles.append(unet.register_forward_pre_hook(note_size, with_kwargs=True))
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                patch.handles += [block.register_forward_pre_hook(plan_block, with_kwargs=True),
                                  block.attn1.register_forward_pre_hook(merge_input, with_kwargs=True),
                                  block.attn1.register_forward_hook(unmerge_output, with_kwargs=True)]
    except BaseException:
        patch.restore()
        raise
    return patch


class TokenMergingFeature(Feature):
    name = "token_merging"

    def patch(self, engine: Any, run: RunSpec) -> TokenMerging | None:
        ratio = run.perf.tome_ratio
        return apply(engine.bundle.unet, ratio) if ratio > 0 else None


FEATURE = TokenMergingFeature()

"""Deep Shrink (kohya): while t is high, one UNet down block gets its input downscaled, so a large image is
composed at the scale the model was trained on; the up blocks scale back to each skip connection's size.

It is a UNet-call wrapper like CFG: for the calls where it is active, a pre-hook on the chosen down block and
resizing forwards on the up blocks are put in place, and taken out again right after the call (also when the
call fails).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature
from sdbatch.engine.core.model_fn import Conditioning, ModelFn, ModelWrapper
from sdbatch.errors import ModelError


def active_depth(settings: Any, t: float) -> int | None:
    """The down block to shrink at timestep t: depth_1 while t ≥ timesteps_1, depth_2 while
    timesteps_2 ≤ t < timesteps_1 (the reference's rule), else None."""
    if t >= settings.timesteps_1:
        return settings.depth_1
    if settings.depth_2 is not None and t >= settings.timesteps_2:
        return settings.depth_2
    return None


def with_deep_shrink(unet: torch.nn.Module, settings: Any) -> ModelWrapper:
    """The UNet call with Deep Shrink at the batch's settings (jobs share them: they are part of the batch key)."""

    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            depth = active_depth(settings, cond.host_timestep(t))
            if depth is None or settings.ratio == 1:
                return inner(x, t, cond)
            with shrunk(unet, depth, settings.ratio):
                return inner(x, t, cond)

        return model

    return wrap


@contextmanager
def shrunk(unet: torch.nn.Module, depth: int, ratio: float) -> Iterator[None]:
    """Inside the block, down block `depth` sees its input scaled by `ratio` (bicubic) and every up block
    resizes its hidden states to the size of the skip connection it concatenates."""
    if not 0 <= depth < len(unet.down_blocks):
        raise ModelError(f"Deep Shrink depth {depth}: this model's UNet has {len(unet.down_blocks)} down blocks "
                         f"(0 to {len(unet.down_blocks) - 1}) <deep_shrink.depth_1/depth_2, --dsd1/--dsd2>")
    for block in unet.up_blocks:
        block.forward = types.MethodType(_up_block_forward, block)
    try:
        with shrunk_input(unet.down_blocks[depth], ratio):
            yield
    finally:
        for block in unet.up_blocks:
            del block.forward  # back to the class's forward


@contextmanager
def shrunk_input(block: torch.nn.Module, ratio: float) -> Iterator[None]:
    """Inside the block, `block` sees its input scaled by `ratio` (bicubic): Deep Shrink's down block, and the
    same block of a ControlNet, whose residuals must match the shrunk skip connections."""

    def shrink_input(module, args, kwargs):
        key = "hidden_states" if "hidden_states" in kwargs else None
        sample = kwargs[key] if key else args[0]
        small = _interpolate(sample, scale_factor=ratio)
        return (args, {**kwargs, key: small}) if key else ((small, *args[1:]), kwargs)

    handle = block.register_forward_pre_hook(shrink_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _up_block_forward(block, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                      temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                      cross_attention_kwargs: dict | None = None, upsample_size: Any = None,
                      attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                      **_: Any) -> torch.Tensor:
    """diffusers' (CrossAttn)UpBlock2D.forward for inference, plus the resize of the hidden states to each
    skip connection's size (skips from before the shrunk block are larger than the shrunk path)."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions, strict=True):
        skip, res_hidden_states_tuple = res_hidden_states_tuple[-1], res_hidden_states_tuple[:-1]
        if skip.shape[-2:] != hidden_states.shape[-2:]:
            hidden_states = _interpolate(hidden_states, size=skip.shape[-2:])
        hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
        if attn is not None:
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                 encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
    for upsampler in block.upsamplers or []:
        hidden_states = upsampler(hidden_states, upsample_size)
    return hidden_states


def _interpolate(x: torch.Tensor, **size: Any) -> torch.Tensor:
    """Bicubic resize as the reference does it (align_corners=False; bf16 through fp32, which bicubic needs)."""
    work = x.float() if x.dtype == torch.bfloat16 else x
    return F.interpolate(work, mode="bicubic", align_corners=False, **size).to(x.dtype)


class DeepShrink(Feature):
    name = "deep_shrink"
    order = 5  # innermost UNet wrapper: it reshapes the UNet itself

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings = ctx.key.features.get(self.name)
        return None if settings is None else BatchHooks(unet=with_deep_shrink(ctx.engine.bundle.unet, settings))


FEATURE = DeepShrink()

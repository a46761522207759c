"""Extended Textual Inversion (XTI): every cross-attention block of the UNet gets its own text conditioning.

An XTI embedding holds one set of vectors per cross-attention block of SD's UNet (:data:`XTI_LAYERS`: IN01
IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11, ldm numbering). The prompt is encoded once per block with that
block's vectors (:meth:`TextEncoder.encode_batch` with ``block``), and each block's ``Transformer2DModel``
receives its own encoding as ``encoder_hidden_states`` (gen_img_inventory.md §7.5; the reference's
``XTI_hijack.py`` routes the same way but is dead code with current diffusers).

How the 16 encodings travel without touching the sampling loop: :func:`conditioning` concatenates them
along the token axis, so ``Conditioning.embeddings`` is ``(B, 16·T, D)`` and classifier-free guidance
batches them like any embeddings, and it records ``T`` in the call's row contract (``per_call``). Forward
pre-hooks on the 16 blocks (:func:`install`, a run's patch) cut out their own ``T`` tokens. A call whose rows
carry no token count passes through them untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Encode, Feature
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.rows import current as current_rows
from sdbatch.engine.text.embeddings import XTI_KEY, XTI_LAYERS
from sdbatch.errors import ModelError

TOKENS = "xti_tokens"  # row-contract call data: tokens per block in the packed embeddings


def cross_attention_blocks(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention transformer blocks by ldm name (IN01, ..., MID, OUT03, ...).

    Diffusers' down block ``L`` attention ``j`` is ldm input block ``3L + j + 1`` and up block ``L`` attention
    ``j`` is output block ``3L + j``: the numbering of SD's two-layers-per-block UNet.
    """
    blocks: dict[str, torch.nn.Module] = {}
    for level, down in enumerate(unet.down_blocks):
        for j, attn in enumerate(getattr(down, "attentions", None) or []):
            blocks[f"IN{3 * level + j + 1:02d}"] = attn
    for attn in getattr(unet.mid_block, "attentions", None) or []:
        blocks["MID"] = attn
    for level, up in enumerate(unet.up_blocks):
        for j, attn in enumerate(getattr(up, "attentions", None) or []):
            blocks[f"OUT{3 * level + j:02d}"] = attn
    return blocks


class RoutingHooks:
    """The routing pre-hooks on a UNet's 16 cross-attention blocks; restore() removes them."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = handles

    def restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def install(unet: torch.nn.Module) -> RoutingHooks:
    """Add the routing hooks to the UNet's 16 cross-attention blocks (inert for calls without XTI)."""
    blocks = cross_attention_blocks(unet)
    layers = getattr(unet.config, "layers_per_block", None)
    if layers != 2 or sorted(blocks) != sorted(XTI_LAYERS):
        raise ModelError(f"{XTI_KEY}: XTI needs SD's UNet layout (2 layers per block, 16 cross-attention blocks "
                         f"{XTI_LAYERS[0]}..{XTI_LAYERS[-1]}); this model has {layers} layers per block and "
                         f"{len(blocks)} cross-attention blocks")
    return RoutingHooks([blocks[name].register_forward_pre_hook(_router(index), with_kwargs=True)
                         for index, name in enumerate(XTI_LAYERS)])


def _router(index: int):
    """A forward pre-hook giving block ``index`` its slice of the packed encoder states."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        rows = current_rows()
        tokens = rows.per_call.get(TOKENS) if rows is not None else None
        if tokens is None:
            return None
        states = kwargs["encoder_hidden_states"]
        if states.shape[1] != len(XTI_LAYERS) * tokens:  # already cut (a second set of hooks on the same UNet)
            return None
        cut = slice(index * tokens, (index + 1) * tokens)
        routed = {**kwargs, "encoder_hidden_states": states[:, cut].contiguous()}
        if kwargs.get("encoder_attention_mask") is not None:  # the padding mask covers all 16 encodings
            routed["encoder_attention_mask"] = kwargs["encoder_attention_mask"][..., cut]
        return args, routed

    return hook


def conditioning(cond: Conditioning, blocks: Sequence[tuple[torch.Tensor | None, ...]]) -> Conditioning:
    """``cond`` carrying per-block encodings: ``blocks[b]`` is (embeddings, negative[, uncond]) encoded with
    block b's vectors, in XTI_LAYERS order."""
    if len(blocks) != len(XTI_LAYERS):
        raise ValueError(f"XTI needs {len(XTI_LAYERS)} block encodings, got {len(blocks)}")
    tokens = blocks[0][0].shape[1]

    def packed(part: int, current: torch.Tensor | None) -> torch.Tensor | None:
        if current is None:
            return None
        return torch.cat([block[part] for block in blocks], dim=1)  # (B, 16·T, D)

    uncond = packed(2, cond.uncond) if len(blocks[0]) > 2 else cond.uncond
    rows = cond.rows_for(cond.embeddings).with_call_data(**{TOKENS: tokens})
    return dataclasses.replace(cond, embeddings=packed(0, cond.embeddings), negative=packed(1, cond.negative),
                               uncond=uncond, rows=rows)


class ExtendedTextualInversion(Feature):
    """model.xti_embeddings: the routing hooks for the run, and per-block text for batches whose prompts use XTI."""

    name = "xti"

    def patch(self, engine, run: RunSpec) -> RoutingHooks | None:
        return install(engine.bundle.unet) if run.model.xti_embeddings else None

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        if "xti" not in ctx.patches:
            return None
        text = ctx.text

        def encode(inner: Encode) -> Conditioning:
            cond = inner()
            if not text.text.uses_xti(text.all_texts()):
                return cond
            per_block = [text.encode(block=b) for b in range(len(XTI_LAYERS))]
            return conditioning(cond, [(c.embeddings, c.negative, c.uncond) for c in per_block])

        return BatchHooks(encode=encode)


FEATURE = ExtendedTextualInversion()

"""Extended Textual Inversion (XTI): every cross-attention block of the UNet gets its own text conditioning.

An XTI embedding holds one set of vectors per cross-attention block of SD's UNet (:data:`XTI_LAYERS`: IN01
IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11, ldm numbering). The prompt is encoded once per block with that
block's vectors (:meth:`TextEncoder.encode_batch` with ``block``), and each block's ``Transformer2DModel``
receives its own encoding as ``encoder_hidden_states`` (gen_img_inventory.md §7.5; the reference's
``XTI_hijack.py`` routes the same way but is dead code with current diffusers).

How the 16 encodings travel without touching the sampling loop: :func:`conditioning` concatenates them
along the token axis, so ``Conditioning.embeddings`` is ``(B, 16·T, D)`` and classifier-free guidance
batches them like any embeddings, and it records ``T`` in ``unet_kwargs["cross_attention_kwargs"]``. Forward
pre-hooks on the 16 blocks (:func:`install`) cut out their own ``T`` tokens and remove the marker, so the
attention processors (SDPA, xformers, eager) never see it. Without the marker the hooks do nothing.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import torch

from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.text.embeddings import XTI_KEY, XTI_LAYERS
from sdbatch.errors import ModelError

TOKENS = "sdbatch_xti_tokens"  # cross_attention_kwargs key: tokens per block in the packed embeddings
_HOOKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


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


def install(unet: torch.nn.Module) -> None:
    """Add the routing hooks to the UNet's 16 cross-attention blocks (once per UNet; inert without XTI)."""
    if unet in _HOOKED:
        return
    blocks = cross_attention_blocks(unet)
    layers = getattr(unet.config, "layers_per_block", None)
    if layers != 2 or sorted(blocks) != sorted(XTI_LAYERS):
        raise ModelError(f"{XTI_KEY}: XTI needs SD's UNet layout (2 layers per block, 16 cross-attention blocks "
                         f"{XTI_LAYERS[0]}..{XTI_LAYERS[-1]}); this model has {layers} layers per block and "
                         f"{len(blocks)} cross-attention blocks")
    for index, name in enumerate(XTI_LAYERS):
        blocks[name].register_forward_pre_hook(_router(index), with_kwargs=True)
    _HOOKED.add(unet)


def _router(index: int):
    """A forward pre-hook giving block ``index`` its slice of the packed encoder states."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        extra = kwargs.get("cross_attention_kwargs")
        if not extra or TOKENS not in extra:
            return None
        tokens = extra[TOKENS]
        states = kwargs["encoder_hidden_states"]
        rest = {k: v for k, v in extra.items() if k != TOKENS}
        mine = states[:, index * tokens : (index + 1) * tokens].contiguous()
        return args, {**kwargs, "encoder_hidden_states": mine, "cross_attention_kwargs": rest or None}

    return hook


def conditioning(cond: Conditioning, blocks: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> Conditioning:
    """``cond`` carrying per-block encodings: ``blocks[b]`` is encode_batch(..., block=b), in XTI_LAYERS order."""
    if len(blocks) != len(XTI_LAYERS):
        raise ValueError(f"XTI needs {len(XTI_LAYERS)} block encodings, got {len(blocks)}")
    tokens = blocks[0][0].shape[1]
    embeddings = torch.cat([pos for pos, _ in blocks], dim=1)  # (B, 16·T, D)
    negative = None if cond.negative is None else torch.cat([neg for _, neg in blocks], dim=1)
    extra = {**(cond.unet_kwargs.get("cross_attention_kwargs") or {}), TOKENS: tokens}
    return dataclasses.replace(cond, embeddings=embeddings, negative=negative,
                               unet_kwargs={**cond.unet_kwargs, "cross_attention_kwargs": extra})

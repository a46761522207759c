"""The built-in tiny ControlNet `builtin:tiny` for `model=tiny` and `model=tiny_xl`, and seeded random
ControlNets for any UNet.

A fresh ControlNet (``ControlNetModel.from_unet``) has zero convolutions at its outputs, so it changes
nothing; these get small random ones instead, so a ControlNet run visibly differs from a plain one. Built
from the tiny model's UNet on first use, kept in the sdbatch cache: the SD1 one in lllyasviel's original file
layout, the SDXL one as a diffusers-layout single file (the layout SDXL ControlNets are published in).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from sdbatch.engine.models.checkpoint import cache_root
from sdbatch.engine.models.export import save_controlnet
from sdbatch.engine.models.tiny import (
    TINY_SEED,
    TINY_VERSION,
    build_tiny_components,
    is_current,
    save_atomically,
    tiny_checkpoint_path,
)
from sdbatch.errors import ModelError

if TYPE_CHECKING:
    from sdbatch.engine.models.loading import ModelBundle

TINY_CONTROLNET = "builtin:tiny"
TINY_CONTROLNET_FILE_NAME = "tiny-controlnet-v1.safetensors"
TINY_XL_CONTROLNET_FILE_NAME = "tiny-controlnet-xl-v1.safetensors"
TINY_MODELS = {"sd1": "model=tiny", "sdxl": "model=tiny_xl"}
# Bump the first part when these weights change; the tiny model's version follows, as its UNet is copied.
TINY_CONTROLNET_VERSION = f"1+tiny{TINY_VERSION}"
# The hint encoder must downscale images 8x to the latent size: three stride-2 steps, so four widths.
TINY_HINT_CHANNELS = (16, 32, 48, 64)
OUTPUT_STD = 0.05  # zero convolutions' random weights: small, but enough to change the images


@torch.no_grad()
def random_controlnet(
    unet: UNet2DConditionModel, seed: int, hint_channels: tuple[int, ...] = TINY_HINT_CHANNELS
) -> ControlNetModel:
    """A ControlNet copied from ``unet`` whose output convolutions are seeded random, not zero."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
        outputs = (*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out)
        for module in outputs:
            for param in module.parameters():
                param.normal_(0.0, OUTPUT_STD)
    return cn.eval()


def is_tiny_model(bundle: ModelBundle) -> bool:
    """Whether the bundle is a built-in tiny model (model=tiny or tiny_xl) of the current cache folder."""
    return (bundle.family in TINY_MODELS
            and Path(bundle.source).resolve() == tiny_checkpoint_path(bundle.family).resolve())


def ensure_tiny_controlnet(bundle: ModelBundle) -> Path:
    """Path of the tiny ControlNet in the sdbatch cache, built and saved first if missing or outdated.

    Built from the tiny model's own seeded UNet, not the bundle's (which may be fp16 or on a GPU), so
    the file is the same wherever it is built. Stored in fp16 like the tiny model.
    """
    if not is_tiny_model(bundle):
        raise ModelError(f"{TINY_CONTROLNET} is the tiny ControlNet of {' and '.join(TINY_MODELS.values())}, not "
                         f"of {bundle.model_name}; give a ControlNet file or folder")
    xl = bundle.family == "sdxl"
    path = cache_root() / (TINY_XL_CONTROLNET_FILE_NAME if xl else TINY_CONTROLNET_FILE_NAME)
    if path.is_file() and is_current(path, TINY_CONTROLNET_VERSION):
        return path
    unet = build_tiny_components(bundle.family, TINY_SEED)[0]
    cn = random_controlnet(unet, TINY_SEED).half()
    metadata = {"sdbatch_tiny_version": TINY_CONTROLNET_VERSION}
    if xl:
        state = {k: v.contiguous() for k, v in cn.state_dict().items()}
        return save_atomically(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=metadata))
    return save_atomically(path, lambda tmp: save_controlnet(cn, tmp, metadata=metadata))

"""Tiny seeded ControlNets for the tiny test models, written in every format sdbatch loads."""

from __future__ import annotations

from pathlib import Path

from diffusers import ControlNetModel, UNet2DConditionModel

from sdbatch.engine.models.export import save_controlnet
from sdbatch.engine.models.tiny_controlnet import random_controlnet


def tiny_controlnet(unet: UNet2DConditionModel, seed: int) -> ControlNetModel:
    """A ControlNet copied from ``unet`` with seeded random (non-zero) output convolutions, so it acts."""
    return random_controlnet(unet, seed)


def write_all_formats(cn: ControlNetModel, base_unet: UNet2DConditionModel, folder: Path) -> dict[str, Path]:
    """``cn`` as an original .safetensors, an original .pth (``{"state_dict": ...}``), a difference file
    against ``base_unet``, and a diffusers folder, all in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cn.save_pretrained(folder / "cn-diffusers")
    return {
        "original": save_controlnet(cn, folder / "cn.safetensors"),
        "original_pth": save_controlnet(cn, folder / "cn.pth"),
        "difference": save_controlnet(cn, folder / "cn-difference.safetensors", base_unet),
        "diffusers": folder / "cn-diffusers",
    }

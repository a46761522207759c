"""Random kohya-format LoRA/LoCon files for the tiny test models (sdbatch's own demo-LoRA builder)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdbatch.engine.models.tiny_lora import random_lora


def make_lora(path: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, **kwargs) -> Path:
    """A kohya LoRA file at path (.safetensors) for these models (attention, ff, proj, one LoCon conv, CLIP)."""
    save_file(random_lora(unet, text_encoder, **kwargs), str(path))
    return path

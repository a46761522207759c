"""A tiny random CLIPVisionModelWithProjection saved as a folder, for CLIP-Vision conditioning's tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection


def write_clip_vision(folder: Path, projection_dim: int, seed: int = 0) -> Path:
    """A random image encoder (224² input, 32-pixel patches: 50 tokens) projecting to `projection_dim`, saved
    without a preprocessor_config.json (CLIP's defaults apply, as for a folder that lacks one)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=projection_dim)
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # a random projection gives embeddings of about unit size; SDXL's pooled text is ~10×
        model.visual_projection.weight.mul_(8)
    model.save_pretrained(folder)
    return folder


def write_text_model(folder: Path) -> Path:
    """A CLIPTextModelWithProjection folder: a transformers model folder that is not an image encoder."""
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=100, projection_dim=32)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder

"""Tiny random guide models for guided sampling's tests: a transformers CLIPModel (folder and single file) and a
narrow VGG16 in torchvision's state-dict layout (features.N.weight/bias), saved as a plain .pth state dict."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

VGG16_WIDTHS = (8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M")  # torchvision's, narrow


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A random CLIPModel with the real vocabulary (sdbatch's tokenizer fits it) and 32×32 images."""
    torch.manual_seed(seed)
    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
             "hidden_act": "gelu"}  # laion's activation: what a single file without its config.json is read as
    config = CLIPConfig(text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=32)
    return CLIPModel(config).eval()


def write_clip(folder: Path) -> tuple[Path, Path]:
    """(a CLIPModel folder, a single .safetensors file with no config beside it) holding the same weights."""
    model = tiny_clip()
    model.save_pretrained(folder / "clip")
    (folder / "single").mkdir(parents=True, exist_ok=True)
    single = folder / "single" / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single)
    return folder / "clip", single


def write_vgg16(path: Path, seed: int = 0) -> Path:
    """torchvision's vgg16().features layout (13 convolutions at its indexes) with narrow widths, as a .pth."""
    generator = torch.Generator().manual_seed(seed)
    state, channels, index = {}, 3, 0
    for width in VGG16_WIDTHS:
        if width == "M":
            index += 1
            continue
        scale = (2 / (channels * 9)) ** 0.5  # He initialisation: features neither vanish nor explode
        state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3, generator=generator) * scale
        state[f"features.{index}.bias"] = torch.zeros(width)
        channels, index = width, index + 2
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision's file has a classifier: it is ignored
    torch.save(state, path)
    return path

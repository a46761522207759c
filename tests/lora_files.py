"""Random kohya-format LoRA/LoCon files for the tiny test models (names from the live modules)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# UNet layers a typical LoRA trains (attention, feed-forward, proj), plus one 3×3 resnet conv (LoCon)
UNET_PARTS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "proj_in")
LOCON_CONV = "down_blocks.0.resnets.0.conv1"
TEXT_PARTS = ("self_attn.q_proj", "mlp.fc1")


def _targets(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    found = {}
    for path, module in unet.named_modules():
        if path.endswith(UNET_PARTS) or path == LOCON_CONV:
            found["lora_unet_" + path.replace(".", "_")] = module
    for path, module in (text_encoder.named_modules() if text_encoder is not None else []):
        if path.endswith(TEXT_PARTS):
            path = path.removeprefix("text_model.")
            found["lora_te_text_model_" + path.replace(".", "_")] = module
    return found


def lora_state_dict(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *, rank: int = 4,
                    alpha: float = 2.0, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Seeded random lora_down/lora_up/alpha tensors for each target layer of these models."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in _targets(unet, text_encoder).items():
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size
            down_shape, up_shape = (rank, module.in_channels, *k), (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        out[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen) * scale
        out[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * scale
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def make_lora(path: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, **kwargs) -> Path:
    """A kohya LoRA file at path (.safetensors) for these models."""
    save_file(lora_state_dict(unet, text_encoder, **kwargs), str(path))
    return path

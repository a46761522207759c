"""The built-in demo LoRA `builtin:tiny-lora` for `model=tiny`, and random kohya LoRA weights for any model.

Random weights, like the tiny model's: it shows what a LoRA run does (files, multipliers, sweeps, metadata)
without a download. Built from the tiny model's module names on first use and kept in the sdbatch cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdbatch.engine.models.checkpoint import cache_root
from sdbatch.engine.models.tiny import TINY_SEED, build_tiny_components, is_current, save_atomically

TINY_LORA_SOURCE = "builtin:tiny-lora"
TINY_LORA_FILE_NAME = "tiny-lora-sd1.safetensors"
TINY_LORA_VERSION = "1"  # bump when the tiny model's layout or these weights change

# UNet layers a typical LoRA trains (attention, feed-forward, proj), plus one 3×3 resnet conv (LoCon)
UNET_PARTS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "proj_in")
LOCON_CONV = "down_blocks.0.resnets.0.conv1"
TEXT_PARTS = ("self_attn.q_proj", "mlp.fc1")


def lora_path(path: str) -> str:
    """A network.loras path as a file: builtin:tiny-lora is built on first use; other paths are kept."""
    return str(ensure_tiny_lora()) if path == TINY_LORA_SOURCE else path


def ensure_tiny_lora() -> Path:
    """Path of the demo LoRA in the sdbatch cache, built and saved first if missing or from an older version."""
    path = cache_root() / TINY_LORA_FILE_NAME
    if path.is_file() and is_current(path, TINY_LORA_VERSION):
        return path
    unet, _, text_encoder = build_tiny_components("sd1", TINY_SEED)
    tensors = random_lora(unet, text_encoder, seed=TINY_SEED)
    return save_atomically(path, lambda tmp: save_file(tensors, tmp, {"sdbatch_tiny_version": TINY_LORA_VERSION}))


def random_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *, rank: int = 4, alpha: float = 2.0,
                seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Seeded random kohya lora_down/lora_up/alpha tensors for the usual target layers of these models."""
    return random_factors(_targets(unet, text_encoder), rank=rank, alpha=alpha, seed=seed, scale=scale)


def random_factors(modules: dict[str, torch.nn.Module], *, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                   scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Seeded random kohya lora_down/lora_up/alpha tensors for these modules (kohya name → Linear or Conv2d)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        if isinstance(module, torch.nn.Conv2d):
            down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        out[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen) * scale
        out[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * scale
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _targets(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    """kohya name → module of the layers random_lora covers."""
    found = {}
    for path, module in unet.named_modules():
        if path.endswith(UNET_PARTS) or path == LOCON_CONV:
            found["lora_unet_" + path.replace(".", "_")] = module
    for path, module in text_encoder.named_modules() if text_encoder is not None else ():
        if path.endswith(TEXT_PARTS):
            found["lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")] = module
    return found

"""Per-image randomness: one CPU torch.Generator per image seed, initial latents drawn from it."""

from __future__ import annotations

import torch


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, so an image is the same alone, in any batch, on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def initial_noise(gens: list[torch.Generator], channels: int, height: int, width: int) -> torch.Tensor:
    """Start latents drawn in fp32 on the CPU from each image's own generator."""
    draws = [torch.randn((1, channels, height, width), generator=g, dtype=torch.float32) for g in gens]
    return torch.cat(draws)  # (B, C, H/8, W/8)


def to_device(latents: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CPU latents on `device` in `dtype`. To a GPU they go from pinned memory without blocking, so the host goes
    on queueing work while the copy runs (a copy from pageable memory makes the host wait for it)."""
    if device.type == "cuda":
        return latents.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return latents.to(device=device, dtype=dtype)

"""Latents → images with the VAE, in chunks of perf.vae_batch_size, rounded like diffusers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, chunk: int = 0, slices: int | None = None,
           ) -> list[Image.Image]:
    """Decode (B, 4, h, w) latents to RGB images; chunk 0 decodes the whole batch at once.

    `slices` (perf.vae_slices) decodes each chunk in that many horizontal bands (the same pixels, less memory).
    """
    chunk = chunk or latents.shape[0]
    images: list[Image.Image] = []
    for part in latents.split(chunk):
        z = part.to(vae.dtype) / vae.config.scaling_factor
        if slices:
            from sdbatch.engine.vae.slicing import decode_sliced

            pixels = decode_sliced(vae, z, slices)
        else:
            pixels = vae.decode(z, return_dict=False)[0]  # (b, 3, H, W) in [-1, 1]
        images.extend(to_pil(pixels))
    return images


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors → 8-bit PIL images, rounding exactly as diffusers' image processor does."""
    arr = (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]

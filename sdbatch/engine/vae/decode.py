"""Latents → images with the VAE, in chunks of perf.vae_batch_size, rounded like diffusers.

Half-precision safety: in fp16/bf16 a decode can overflow to NaN/inf (diffusers and the reference then write a
black image). Each image whose pixels are not finite, while its latents are, is decoded again in fp32: the VAE is
cast to fp32 for that decode and back afterwards, which is exact (every fp16/bf16 value is an fp32 value), so
the cached model is bit-identical afterwards. One warning per call names the images; the caller learns which
ones through `fell_back` (the manifest's "vae_fallback": "fp32").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, chunk: int = 0, slices: int | None = None,
           tiling: bool = False, names: Sequence[str] | None = None, fell_back: list[int] | None = None,
           ) -> list[Image.Image]:
    """Decode (B, 4, h, w) latents to RGB images; chunk 0 decodes the whole batch at once.

    `slices` (perf.vae_slices) decodes each chunk in that many horizontal bands (the same pixels, less memory);
    `tiling` (perf.vae_tiling) in overlapping tiles blended at the seams (less memory still, slightly different
    pixels). A half-precision decode with NaN/inf pixels is redone in fp32 for those images only: their indices
    are appended to `fell_back`, and `names` (the images' file names) label them in the one warning.
    """
    chunk = chunk or latents.shape[0]
    images: list[Image.Image] = []
    redone: list[int] = []
    lost: list[int] = []  # latents already NaN/inf: an fp32 decode cannot help
    for first, part in zip(range(0, latents.shape[0], chunk), latents.split(chunk), strict=True):
        pixels = _decode(vae, part, slices, tiling)
        bad = _not_finite(pixels) if vae.dtype in HALF else []
        finite_latents = [i for i in bad if bool(torch.isfinite(part[i]).all())]
        lost += [first + i for i in bad if i not in finite_latents]
        # what stays NaN is black, as in diffusers, but without relying on an undefined NaN → uint8 cast
        part_images = to_pil(torch.nan_to_num(pixels, nan=-1.0) if bad else pixels)
        if finite_latents:
            with in_fp32(vae):  # one image at a time: fp32 activations take twice the memory
                for i in finite_latents:
                    part_images[i] = to_pil(_decode(vae, part[i : i + 1].float(), slices, tiling))[0]
            redone += [first + i for i in finite_latents]
        images.extend(part_images)
    label = (lambda i: names[i]) if names is not None else (lambda i: f"image {i + 1}")
    if redone:
        log.warning("VAE decode in %s gave NaN/inf pixels for %s (%d of %d); decoded again in fp32, recorded as "
                    "vae_fallback in the manifest. model.no_half_vae=true keeps the VAE in fp32",
                    str(vae.dtype).removeprefix("torch."), ", ".join(map(label, redone)), len(redone),
                    latents.shape[0])
    if lost:
        log.warning("the latents of %s are NaN/inf before decoding (the UNet overflowed); the image is black. "
                    "Try model.precision=fp32", ", ".join(map(label, lost)))
    if fell_back is not None:
        fell_back.extend(redone)
    return images


def _decode(vae: torch.nn.Module, latents: torch.Tensor, slices: int | None, tiling: bool) -> torch.Tensor:
    """(b, 3, H, W) pixels in [-1, 1], in the VAE's dtype."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    if tiling:
        from sdbatch.engine.vae.tiling import decode_tiled

        return decode_tiled(vae, z)
    if slices:
        from sdbatch.engine.vae.slicing import decode_sliced

        return decode_sliced(vae, z, slices)
    return vae.decode(z, return_dict=False)[0]


def _not_finite(pixels: torch.Tensor) -> list[int]:
    """Indices of the images with a NaN or inf pixel."""
    return torch.nonzero(~torch.isfinite(pixels).flatten(1).all(dim=1)).flatten().tolist()


@contextmanager
def in_fp32(vae: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The VAE cast to fp32 for the block, then back to its dtype: exact, since fp16 and bf16 values are fp32
    values, so its weights are bit-identical afterwards (whatever happened inside).

    torch's Module.to, not diffusers' override, which warns about fp32 modules on every dtype cast (0.42)."""
    dtype = vae.dtype
    try:
        yield torch.nn.Module.to(vae, torch.float32)
    finally:
        torch.nn.Module.to(vae, dtype)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors → 8-bit PIL images, rounding exactly as diffusers' image processor does."""
    arr = (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]

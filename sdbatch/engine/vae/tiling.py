"""Tiled VAE decode (perf.vae_tiling): diffusers' own `AutoencoderKL.tiled_decode`, switched on for one call.

The latents are cut into overlapping square tiles (`tile_latent_min_size`, 64 latents = 512 pixels for SD's VAE
config; tiles start every 75% of a tile, so neighbours share a quarter), each tile is decoded alone, and the
overlaps are blended linearly in pixel space (`blend_v`/`blend_h`). The accelerator only holds one tile's
activations, so the size of an image is no longer bound by the VAE's memory. The pixels differ slightly from a
whole decode: GroupNorm and the mid block's attention see one tile instead of the image (measured in README.md,
"Performance"). Images no larger than one tile decode exactly as without tiling.

The shared, cached VAE is only changed for the call: `use_tiling` and the tile sizes are put back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SETTINGS = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


@torch.no_grad()
def decode_tiled(vae: torch.nn.Module, z: torch.Tensor, tile: int | None = None,
                 overlap: float | None = None) -> torch.Tensor:
    """What ``vae.decode(z)`` gives with diffusers' tiling on (z already divided by scaling_factor): (B, 3, H, W).

    ``tile`` is the tile side in latents (default: the VAE's, from its config's sample_size), ``overlap`` the
    shared fraction of a tile (default: diffusers' 0.25).
    """
    if not hasattr(vae, "tiled_decode"):
        raise TypeError(f"perf.vae_tiling needs an AutoencoderKL, got {type(vae).__name__}")
    with tiling(vae, tile, overlap):
        return vae.decode(z, return_dict=False)[0]


@contextmanager
def tiling(vae: torch.nn.Module, tile: int | None = None, overlap: float | None = None) -> Iterator[None]:
    """Tiled decoding on `vae` for the block (optionally with another tile size and overlap), then as before."""
    saved = {name: getattr(vae, name) for name in _SETTINGS}
    try:
        vae.use_tiling = True
        if tile is not None:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * factor
        if overlap is not None:
            vae.tile_overlap_factor = overlap
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)

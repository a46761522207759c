"""Region masks for Attention Couple: a colour image → one weight map per AND part, at the image's size.

Two readings, as in the reference tool: by channel (default; part i < 3 is channel i, R G B, its grey levels are
soft weights) or by colour code (regions.max_color_codes=N: part i < N is the pixels exactly of colour i + 1,
1 red, 2 green, 3 yellow, 4 blue, 5 magenta, 6 cyan, 7 white). A part beyond the mask's regions, or whose region
is empty, covers the whole image: the reference meant this and gave such parts nothing. Plain numpy and Pillow,
so planning and the outputs read masks without torch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdbatch.errors import ConfigError

KEY = "regions.mask"
MAX_CODES = 7


def region_weights(path: str | None, parts: int, width: int, height: int, codes: int | None) -> np.ndarray:
    """(parts, height, width) float32 weights in [0, 1]; no mask = every part covers the whole image."""
    if path is None:
        return np.ones((parts, height, width), dtype=np.float32)
    stat = Path(path).stat()
    return _cached(str(Path(path).resolve()), stat.st_mtime_ns, parts, width, height, codes).copy()


@functools.lru_cache(maxsize=32)
def _cached(path: str, mtime: int, parts: int, width: int, height: int, codes: int | None) -> np.ndarray:
    pixels = _read(path, width, height, codes)
    maps = [_region(pixels, i, codes) for i in range(parts)]
    return np.stack([m if m.max() > 0 else np.ones_like(m) for m in maps]).astype(np.float32)


def _read(path: str, width: int, height: int, codes: int | None) -> np.ndarray:
    """The mask as (height, width, 3) uint8 at the image size: bilinear for soft channels, nearest for codes
    (blending would make colours that are no code)."""
    try:
        with Image.open(path) as image:
            resample = Image.Resampling.NEAREST if codes else Image.Resampling.BILINEAR
            return np.asarray(image.convert("RGB").resize((width, height), resample))
    except (OSError, UnidentifiedImageError, ValueError) as ex:
        raise ConfigError(f"{KEY} {path} is not a readable image: {ex}") from None


def _region(pixels: np.ndarray, part: int, codes: int | None) -> np.ndarray:
    if codes:
        if part >= codes:
            return np.ones(pixels.shape[:2], dtype=np.float32)
        colour = np.array([(part + 1) >> bit & 1 for bit in range(3)], dtype=np.uint8) * 255
        return np.all(pixels == colour, axis=-1).astype(np.float32)
    if part >= 3:
        return np.ones(pixels.shape[:2], dtype=np.float32)
    return pixels[..., part].astype(np.float32) / 255.0


def region_shares(path: str | None, weights: list[float], width: int, height: int, codes: int | None) -> list[float]:
    """Each part's share of the image: the mean over pixels of its normalised blend weight (what the UNet uses,
    at full size)."""
    maps = region_weights(path, len(weights), width, height, codes) * np.array(weights, dtype=np.float32)[:, None,
                                                                                                            None]
    total = maps.sum(axis=0, keepdims=True)
    blend = np.where(total > 1e-6, maps / np.maximum(total, 1e-6), 1.0 / len(weights))
    return [round(float(share), 4) for share in blend.mean(axis=(1, 2))]

"""Guide image → ControlNet hint: open, resize to the generation size, preprocess; then the hint tensor.

The order is resize → preprocess, so that canny runs at the generation size and its edges stay crisp one-pixel
lines (resizing an edge map afterwards would blur and alias them). The resize is LANCZOS, the reference tool's and
diffusers' control-image resize, so a `none` hint is what the pipeline itself would have fed the ControlNet.
Canny uses OpenCV as the reference tool meant to (it handed cv2 a PIL image and transposed the 2-D result, so it
crashed). OpenCV is the optional [controlnet] extra and is imported only when a canny hint is made.
Hints are cached by (file, mtime, size, preprocessing, width, height): every batch and every Highres. fix stage
asks for them again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from sdbatch.config.guidance_schema import EXTRA, Preprocess
from sdbatch.config.plugins import load_callable
from sdbatch.errors import ConfigError

_CACHE_SIZE = 16  # hints: a few models × a few guide images × the Highres. fix stage sizes
_cache: OrderedDict[tuple, Image.Image] = OrderedDict()


def hint_image(path: str, prep: Preprocess, width: int, height: int, key: str) -> Image.Image:
    """The hint for one guide image at width×height: RGB, EXIF-oriented, LANCZOS-resized, then preprocessed.

    Served from a small LRU cache; ConfigError naming `key` and the file when it is missing or unreadable.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        found = "is a folder, not an image" if resolved.is_dir() else "does not exist"
        raise ConfigError(f"{key} {path} {found}; give an image file")
    stat = resolved.stat()
    cache_key = (str(resolved), stat.st_mtime_ns, stat.st_size, prep, width, height)
    if cache_key in _cache:
        _cache.move_to_end(cache_key)
        return _cache[cache_key].copy()  # a copy: callers may draw on theirs without touching the cache
    image = _open_rgb(resolved, path, key).resize((width, height), Image.Resampling.LANCZOS)
    _cache[cache_key] = hint = preprocess(image, prep, key)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return hint.copy()


def _open_rgb(resolved: Path, path: str, key: str) -> Image.Image:
    """The image file as RGB with its EXIF orientation applied (as photos are shown); ConfigError if unreadable."""
    try:
        with Image.open(resolved) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # convert() reads it all: truncation fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as ex:
        raise ConfigError(f"{key} {path} is not a readable image: {ex}") from None


def preprocess(image: Image.Image, prep: Preprocess, key: str) -> Image.Image:
    """`image` (already at the generation size) made into a hint by `prep`: RGB, same size."""
    image = image.convert("RGB")
    if prep.kind == "canny":
        return _canny(image, prep, key)
    if prep.kind == "invert":
        return ImageOps.invert(image)  # 255 - x per channel: flips scribble/lineart polarity
    if prep.kind == "plugin":
        return _plugin(image, prep, key)
    return image


def _canny(image: Image.Image, prep: Preprocess, key: str) -> Image.Image:
    """cv2.Canny on the grey image: white (255) one-pixel edges on black (0), as 3 equal RGB channels."""
    try:
        import cv2
    except ImportError:
        raise ConfigError(f"{key}={prep.name}: canny needs OpenCV; {EXTRA}") from None
    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)  # (H, W) uint8
    edges = cv2.Canny(grey, prep.low, prep.high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1), "RGB")  # (H, W, 3)


def _plugin(image: Image.Image, prep: Preprocess, key: str) -> Image.Image:
    """The user's `module:function` on a copy of the image; its result as RGB at the input size."""
    function = load_callable(prep.plugin or "", key, "my_pkg.edges:run")
    try:
        result = function(image.copy())
    except Exception as ex:  # any failure of user code is a config problem: name the key and plug-in
        raise ConfigError(f"{key}={prep.plugin!r} failed on the guide image: {type(ex).__name__}: {ex}") from None
    if not isinstance(result, Image.Image):
        raise ConfigError(f"{key}={prep.plugin!r} returned {type(result).__name__}, not a PIL image")
    result = result.convert("RGB")
    if result.size != image.size:
        result = result.resize(image.size, Image.Resampling.LANCZOS)
    return result


def hint_tensor(images: Sequence[Image.Image], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: what diffusers' ControlNet pipelines feed the ControlNet for these hints.

    As StableDiffusionControlNetPipeline.prepare_image with its control_image_processor; the images are already
    at the generation size (a multiple of 8), so the processor's resize leaves them as they are.
    """
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    width, height = images[0].size
    pixels = processor.preprocess(list(images), height=height, width=width).to(dtype=torch.float32)
    return pixels.to(device=device, dtype=dtype)  # (B, 3, H, W)

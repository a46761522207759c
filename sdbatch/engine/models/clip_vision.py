"""CLIP-Vision conditioning's image encoder: a local transformers CLIPVisionModelWithProjection folder.

transformers has the model and its preprocessing (CLIPImageProcessor: shortest side to 224 bicubic, centre crop,
OpenAI mean/std, or what the folder's preprocessor_config.json says), which is what the reference runs, so we use
them as they are; our code only loads offline, caches per process and checks the projection width. The PIL
variant of the processor is used because torchvision is not a dependency.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sdbatch.config.clip_vision_schema import DOWNLOAD
from sdbatch.engine.models.file_info import short_hash
from sdbatch.errors import ModelError

log = logging.getLogger(__name__)

MAX_CACHED = 1  # a run uses one image encoder
_cache: OrderedDict[tuple, ClipVisionModel] = OrderedDict()


@dataclass(frozen=True, eq=False)
class ClipVisionModel:
    """A loaded image encoder with its processor, its projection width, folder name and hash."""

    module: torch.nn.Module  # CLIPVisionModelWithProjection, fp32, eval, no gradients
    processor: object  # transformers' CLIPImageProcessorPil
    width: int  # projection_dim: the width of image_embeds
    name: str
    folder: str
    hash: str

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, width) image_embeds of RGB images (not normalised: the reference uses them as they come)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        param = next(self.module.parameters())
        return self.module(pixel_values=pixels.to(param.device, param.dtype)).image_embeds.float()


def load_clip_vision(path: str, device: torch.device, key: str) -> ClipVisionModel:
    """The image encoder in folder `path` on `device` (fp32), from the process cache or loaded; ModelError
    naming `key` and the folder when it is not a CLIPVisionModelWithProjection."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ModelError(f"{key}: no such folder {path}; {DOWNLOAD}")
    config = folder / "config.json"
    stamp = config.stat().st_mtime_ns if config.is_file() else 0
    cache_key = (str(folder), stamp, str(device))
    if cache_key not in _cache:
        while len(_cache) >= MAX_CACHED:
            _cache.popitem(last=False)
        _cache[cache_key] = _load(folder, device, key)
        log.info("Loaded the CLIP-Vision model %s <%s>", folder.name, key)
    _cache.move_to_end(cache_key)
    return _cache[cache_key]


def _projection(folder: Path) -> dict[str, int]:
    """A whole CLIPModel folder (laion's CLIP-ViT-bigG-14 as downloaded) keeps projection_dim at its top level and
    transformers would read the vision tower's default (512) instead: pass it on, as the reference does (1280)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # from_pretrained says what is wrong
    top = config.get("projection_dim") if "vision_config" in config else None
    return {"projection_dim": int(top)} if isinstance(top, int) else {}


def _load(folder: Path, device: torch.device, key: str) -> ClipVisionModel:
    from transformers import CLIPImageProcessorPil

    module = _vision_module(folder, key)
    module.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    has_config = (folder / "preprocessor_config.json").is_file()
    # without a preprocessor_config.json: CLIP's defaults (224, bicubic, centre crop, OpenAI mean/std)
    processor = (CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True) if has_config
                 else CLIPImageProcessorPil())
    return ClipVisionModel(module, processor, int(module.config.projection_dim), folder.name, str(folder),
                           short_hash(folder, "clip_vision"))


def _vision_module(folder: Path, key: str) -> torch.nn.Module:
    """The folder's CLIPVisionModelWithProjection; ModelError when it cannot load or lacks weights (transformers
    would start them at random: every embedding would be noise)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    # transformers' progress bar and load report (a whole CLIPModel's text tower is "unexpected") would break
    # the one-line errors on stderr: quiet while loading, and say what matters ourselves
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        module, info = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True,
                                                                     output_loading_info=True, **_projection(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as ex:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ModelError(f"{key}: cannot load {folder} as a CLIPVisionModelWithProjection ({first}); "
                         f"{DOWNLOAD}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = [name for name in info.get("missing_keys", ()) if "position_ids" not in name]
    if missing:
        raise ModelError(f"{key}: {folder} is not a CLIPVisionModelWithProjection ({len(missing)} weights missing, "
                         f"e.g. {sorted(missing)[0]}); {DOWNLOAD}")
    return module

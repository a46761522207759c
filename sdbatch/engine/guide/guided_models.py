"""Guided sampling's guide models: a CLIPModel (text and image embeddings) and VGG16's convolutional features.

CLIP is transformers' CLIPModel, read from a local folder or one weights file: nothing is downloaded. VGG16 is
our own short definition (torchvision's `vgg16().features` layout: the same module indexes and state-dict keys),
because torchvision is not a dependency; its widths are read from the state dict, so torchvision's
vgg16-397923af.pth and the suite's narrow random copy load through the same path (torch.load weights_only).
Both load once per process and device, cached like the base models, with gradients off on their weights: the
guided step only needs the gradient with respect to the image.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdbatch.config.guided_schema import CLIP_DOWNLOAD, VGG16_DOWNLOAD
from sdbatch.engine.models.checkpoint import read_state_dict
from sdbatch.engine.models.file_info import short_hash
from sdbatch.engine.text.tokenizer import ClipTokenizer
from sdbatch.errors import ModelError, SdbatchError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (the reference's, and laion's)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's VGG16 weights were trained on these
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's vgg16 features: 13 3×3 convolutions, each followed by a ReLU, max pools after blocks 1-5
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOLS = (4, 9, 16, 23, 30)
MAX_CACHED = 2  # guide models kept per process (one of each kind, typically)
_cache: OrderedDict[tuple, GuideModel] = OrderedDict()


@dataclass(frozen=True, eq=False)
class GuideModel:
    """A loaded guide model: the module, how images are normalised for it, its file's name and hash."""

    kind: str  # clip | vgg16
    module: nn.Module
    tokenizer: object | None  # CLIP: a transformers CLIPTokenizer (the folder's own) or sdbatch's ClipTokenizer
    image_size: int | None  # CLIP's input size; None for VGG16 (any size)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # file stem or folder name
    file: str  # resolved path
    hash: str  # short sha256 of the file (a folder: of its weights file)


def load_guide_model(kind: str, path: str, device: torch.device, key: str) -> GuideModel:
    """The guide model at `path` on `device` (fp32), from the process cache or loaded; ModelError naming `key`."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ModelError(f"{key}: no such file or folder {path}; "
                         f"{VGG16_DOWNLOAD if kind == 'vgg16' else CLIP_DOWNLOAD}")
    stat = resolved.stat()
    cache_key = (kind, str(resolved), stat.st_mtime_ns, stat.st_size, str(device))
    if cache_key not in _cache:
        while len(_cache) >= MAX_CACHED:
            _cache.popitem(last=False)
        loaded = _load_vgg16(resolved, key) if kind == "vgg16" else _load_clip(resolved, key)
        loaded.module.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        _cache[cache_key] = loaded
        log.info("Loaded the guide model %s <%s>", resolved.name, key)
    _cache.move_to_end(cache_key)
    return _cache[cache_key]


def normalize(model: GuideModel, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] → the model's normalised input."""
    mean = torch.tensor(model.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------- CLIP


def _load_clip(path: Path, key: str) -> GuideModel:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    try:
        if path.is_dir():
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            folder = path
        else:
            folder = path.parent
            state = read_state_dict(path)
            config = _clip_config(folder, state, CLIPConfig)
            model = CLIPModel(config)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if [k for k in missing if "position_ids" not in k] or unexpected:
                raise ModelError(f"{len(missing)} missing and {len(unexpected)} unexpected tensors")
    except KeyError as ex:
        raise ModelError(f"{key}: {path} is not a CLIPModel (no tensor {ex}); {CLIP_DOWNLOAD}") from None
    except (OSError, ValueError, RuntimeError, SdbatchError) as ex:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ModelError(f"{key}: cannot load {path} as a transformers CLIPModel ({first}); {CLIP_DOWNLOAD}") from None
    has_tokenizer = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True) if has_tokenizer else ClipTokenizer()
    mean, std = _clip_mean_std(folder)
    return GuideModel("clip", model, tokenizer, model.config.vision_config.image_size, mean, std,
                      path.stem if path.is_file() else path.name, str(path), short_hash(path, "guide"))


def _clip_config(folder: Path, state: dict[str, torch.Tensor], config_cls):
    """The config beside a single weights file (config.json), else one read from the tensors' shapes (CLIP's
    usual 64-dimensional attention heads and laion's gelu: the shapes cannot tell either)."""
    if (folder / "config.json").is_file():
        return config_cls.from_pretrained(folder, local_files_only=True)
    log.warning("%s has no config.json beside it: the CLIP config is read from the weights' shapes (64-dimensional "
                "heads, gelu); put the model's config.json beside the file if it differs", folder)
    text, vision = "text_model.", "vision_model."
    vocab, text_width = state[f"{text}embeddings.token_embedding.weight"].shape
    vision_width, _, patch, _ = state[f"{vision}embeddings.patch_embedding.weight"].shape
    positions = state[f"{vision}embeddings.position_embedding.weight"].shape[0]
    side = round((positions - 1) ** 0.5) * patch
    return config_cls(
        text_config=_tower(state, text, text_width, vocab_size=vocab,
                           max_position_embeddings=state[f"{text}embeddings.position_embedding.weight"].shape[0]),
        vision_config=_tower(state, vision, vision_width, image_size=side, patch_size=patch),
        projection_dim=state["text_projection.weight"].shape[0])


def _tower(state: dict[str, torch.Tensor], prefix: str, width: int, **extra) -> dict:
    layers = {int(m[1]) for k in state if (m := re.match(rf"{prefix}encoder\.layers\.(\d+)\.", k))}
    return {"hidden_size": width, "num_hidden_layers": len(layers), "num_attention_heads": max(1, width // 64),
            "intermediate_size": state[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0], "hidden_act": "gelu",
            **extra}


def _clip_mean_std(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The folder's preprocessor_config.json image_mean/image_std, else OpenAI's (the reference's)."""
    config = folder / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        return tuple(data.get("image_mean", OPENAI_MEAN)), tuple(data.get("image_std", OPENAI_STD))
    return OPENAI_MEAN, OPENAI_STD


def clip_text_embedding(model: GuideModel, text: str, device: torch.device) -> torch.Tensor:
    """(D,) unit-length CLIP text embedding of `text`, trimmed to 77 tokens."""
    tokenizer = model.tokenizer
    if isinstance(tokenizer, ClipTokenizer):
        ids = [tokenizer.bos_id, *tokenizer.encode(text)[: tokenizer.model_max_length - 2], tokenizer.eos_id]
    else:
        ids = tokenizer(text, truncation=True, max_length=77)["input_ids"]
    with torch.no_grad():
        features = model.module.get_text_features(input_ids=torch.tensor([ids], device=device))
    return F.normalize(_tensor(features).float(), dim=-1)[0]


def clip_image_embeddings(model: GuideModel, images: torch.Tensor) -> torch.Tensor:
    """(N, D) unit-length CLIP embeddings of (N, 3, H, W) images in [0, 1], resized to the model's input size."""
    size = model.image_size
    pixels = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    features = model.module.get_image_features(pixel_values=normalize(model, pixels))
    return F.normalize(_tensor(features).float(), dim=-1)


def _tensor(features) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as pooler_output of an output object; 4.x a tensor."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


# ---------------------------------------------------------------- VGG16


def _load_vgg16(path: Path, key: str) -> GuideModel:
    if path.is_dir():
        raise ModelError(f"{key}: {path} is a folder; {VGG16_DOWNLOAD}")
    state = read_state_dict(path)  # torch files with weights_only=True
    try:
        module = vgg16_features(state)
    except KeyError as ex:
        raise ModelError(f"{key}: {path} is not a VGG16 state dict (no tensor {ex}); {VGG16_DOWNLOAD}") from None
    except (RuntimeError, ValueError) as ex:
        raise ModelError(f"{key}: {path} is not a VGG16 state dict ({str(ex).splitlines()[0]}); "
                         f"{VGG16_DOWNLOAD}") from None
    return GuideModel("vgg16", module, None, None, IMAGENET_MEAN, IMAGENET_STD, path.stem, str(path),
                      short_hash(path, "guide"))


def vgg16_features(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """torchvision's vgg16().features with the widths of `state` (`features.N.weight/bias`), weights loaded."""
    layers: list[nn.Module] = []
    for index in range(VGG16_POOLS[-1] + 1):
        if index in VGG16_CONVS:
            weight = state[f"features.{index}.weight"]
            if weight.ndim != 4 or weight.shape[-2:] != (3, 3):
                raise ValueError(f"features.{index}.weight has shape {tuple(weight.shape)}, not a 3×3 convolution")
            layers.append(nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1))
        elif index in VGG16_POOLS:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.append(nn.ReLU(inplace=False))  # not in place: the guided step backpropagates through it
    module = nn.Sequential(*layers)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    missing, unexpected = module.load_state_dict(features, strict=False)
    if missing or unexpected:
        raise ValueError(f"missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]} features tensors")
    return module


def vgg16_layer_features(model: GuideModel, images: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of features module `layer` for (N, 3, H, W) images in [0, 1], read at a quarter of their size
    (the reference's scale: VGG16's receptive fields suit it, and it costs a sixteenth)."""
    small = F.interpolate(images, size=(max(1, images.shape[-2] // 4), max(1, images.shape[-1] // 4)),
                          mode="bilinear", align_corners=False, antialias=True)
    return model.module[: layer + 1](normalize(model, small))

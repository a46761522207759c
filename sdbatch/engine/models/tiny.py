"""Build tiny, seeded SD1/SD2/SDXL-layout models for tests and the built-in `model=tiny` / `model=tiny_xl` demos."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdbatch.engine.models.checkpoint import cache_root
from sdbatch.engine.models.export import save_single_file

TINY_FILE_NAME = "tiny-sd1.safetensors"
TINY_XL_FILE_NAME = "tiny-sdxl.safetensors"
# Bump when the tiny architecture or its weights change, so a cached file from an older sdbatch is rebuilt.
TINY_VERSION = "3"
TINY_SEED = 0

# Real SD layouts at small widths. GroupNorm stays at SD's 32 groups because a single-file checkpoint does
# not record the group count: the converter must assume 32, so every width is a multiple of 32.
_UNET: dict[str, dict[str, Any]] = {
    # Attention only on the lower level: at 512 px the top level has 4096 tokens, and self-attention
    # there would make the demo ~10x slower for no benefit. Shapes, not names, tell the loader this.
    "sd1": {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,  # SD1 convention: 8 heads per attention
    },
    "sd2": {
        "block_out_channels": (64, 128),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": (1, 2),  # SD2 convention: 64 channels per head
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    # SDXL: attention only on the lower levels, two transformer blocks there (as SDXL's 2 and 10), 64 channels per
    # head, and the "text_time" added embedding (pooled text + 6 size values, each in addition_time_embed_dim
    # sinusoids: SDXL's 256; 8 here, read back from the shapes by the loader).
    "sdxl": {
        "block_out_channels": (64, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (1, 2),
        "transformer_layers_per_block": (1, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
    },
}
# Four VAE levels keep SD's 8x latent downscale, which the noise shape (H/8, W/8) relies on.
_VAE: dict[str, Any] = {
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
    "sample_size": 64,
}
SDXL_VAE_SCALING = 0.13025  # the SDXL VAE's latent scale (not in its weights)
# The vocabulary and positions stay CLIP's real ones so the real tokenizer drives the tiny model.
_TEXT: dict[str, dict[str, Any]] = {
    "sd1": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "hidden_act": "quick_gelu"},
    "sd2": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "hidden_act": "gelu"},
    # SDXL's two encoders: CLIP-L's layout, and OpenCLIP bigG's (gelu, a pooled projection narrower than its
    # width here, so a transposed or mis-split projection cannot load)
    "sdxl": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3, "hidden_act": "quick_gelu"},
    "sdxl_2": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "hidden_act": "gelu",
               "projection_dim": 32},
}


def _unet_config(family: str, text_width: int, overrides: dict[str, Any], pooled: int = 0) -> dict[str, Any]:
    config = {"layers_per_block": 1, "sample_size": 8, "cross_attention_dim": text_width, **_UNET[family]}
    if pooled:  # SDXL's added embedding: pooled text, then 6 size values in addition_time_embed_dim each
        config["projection_class_embeddings_input_dim"] = pooled + 6 * config["addition_time_embed_dim"]
    return {**config, **overrides}


def _text_config(family: str, overrides: dict[str, Any]) -> CLIPTextConfig:
    config = {"vocab_size": 49408, "max_position_embeddings": 77, **_TEXT[family], **overrides}
    config.setdefault("num_attention_heads", max(1, config["hidden_size"] // 64))  # 64 channels per head
    return CLIPTextConfig(**config)


NORM_SPREAD = 0.1  # norms' scales and shifts: 1 ± 0.1 and 0 ± 0.1, so normalisation and biases really act


def _jitter(*modules: torch.nn.Module) -> None:
    """Make every tensor distinct and every norm act: default init leaves norms at 1/0 (an identity), which
    would hide swapped keys and make the text encoder's output mean (what emb_normalize_mode=original divides
    by) about zero. Norm parameters get a wider spread than the rest, still close to their defaults."""
    for module in modules:
        for sub in module.modules():
            spread = NORM_SPREAD if isinstance(sub, torch.nn.LayerNorm | torch.nn.GroupNorm) else 0.02
            for param in sub.parameters(recurse=False):
                param.add_(torch.randn_like(param) * spread)


@torch.no_grad()
def build_tiny_components(
    family: str = "sd1",
    seed: int = 0,
    *,
    unet: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    text_2: dict[str, Any] | None = None,
) -> tuple:
    """Tiny random modules of ``family``; the same seed always gives the same weights.

    "sd1" / "sd2": ``(unet, vae, text_encoder)``; "sdxl": ``(unet, vae, text_encoder, text_encoder_2)``, the
    second a CLIPTextModelWithProjection (OpenCLIP bigG's layout) whose pooled projection feeds the UNet's added
    "text_time" embedding. ``unet``, ``vae`` and ``text`` override entries of the diffusers / transformers configs
    (``text``: the first text encoder's, ``text_2``: SDXL's second one's).
    """
    if family not in _UNET:
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")
    text_config = _text_config(family, text or {})
    second = _text_config("sdxl_2", text_2 or {}) if family == "sdxl" else None
    width = text_config.hidden_size + (second.hidden_size if second else 0)  # SDXL concatenates both encoders
    vae_config = {**_VAE, **({"scaling_factor": SDXL_VAE_SCALING} if second else {}), **(vae or {})}
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        encoders = (text_encoder, CLIPTextModelWithProjection(second)) if second else (text_encoder,)
        unet_model = UNet2DConditionModel(**_unet_config(family, width, unet or {},
                                                         second.projection_dim if second else 0))
        vae_model = AutoencoderKL(**vae_config)
        _jitter(unet_model, vae_model, *encoders)
    return unet_model.eval(), vae_model.eval(), *(e.eval() for e in encoders)


def tiny_checkpoint_path(family: str = "sd1") -> Path:
    """The demo checkpoint of ``family`` (sd1 | sdxl): tiny-sd1.safetensors or tiny-sdxl.safetensors in
    ``$SDBATCH_CACHE``, else in ``~/.cache/sdbatch``."""
    return cache_root() / (TINY_XL_FILE_NAME if family == "sdxl" else TINY_FILE_NAME)


def is_current(path: Path, version: str = TINY_VERSION) -> bool:
    """Whether path is a built-in file of this version (built by this sdbatch, not an older one)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("sdbatch_tiny_version") == version
    except Exception:  # unreadable or partial file: rebuild it
        return False


def ensure_tiny_checkpoint(family: str = "sd1") -> Path:
    """Path of the demo checkpoint of ``family`` (sd1 | sdxl), building and saving it first if it is missing or
    from an older version."""
    path = tiny_checkpoint_path(family)
    if path.is_file() and is_current(path):
        return path
    # Stored in fp16 like most published checkpoints: half the size, and the loader's upcast path gets used.
    unet, vae, text_encoder, *second = (m.half() for m in build_tiny_components(family, TINY_SEED))
    return save_atomically(path, lambda tmp: save_single_file(tmp, unet, vae, text_encoder, family,
                                                              metadata={"sdbatch_tiny_version": TINY_VERSION},
                                                              text_encoder_2=second[0] if second else None))


def save_atomically(path: Path, write: Callable[[str], object]) -> Path:
    """`write(tmp)` a file next to path, then rename it there: a concurrent run never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tiny-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path

"""Load a model (single file, diffusers folder, cached hub id, builtin:tiny or :tiny_xl) once per process, offline."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import OrderedDict
from functools import cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from huggingface_hub import snapshot_download
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdbatch.engine.models.checkpoint import file_sha256_short, read_state_dict
from sdbatch.engine.models.convert import (
    SDXL_VAE_SCALING_FACTOR,
    VAE_SCALING_FACTOR,
    convert_checkpoint,
    convert_text_encoder,
    convert_vae_file,
)
from sdbatch.engine.models.tiny import ensure_tiny_checkpoint
from sdbatch.engine.text.tokenizer import PAD_TOKENS, ClipTokenizer
from sdbatch.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

TINY_SOURCE = "builtin:tiny"
TINY_XL_SOURCE = "builtin:tiny_xl"
# What from_pretrained reads without a variant comes first, so the hash names the weights in use.
_WEIGHT_PATTERNS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "*.safetensors",
    "*.bin",
)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelBundle:
    """Everything loaded for one model: modules on their device and dtype, plus names and hashes."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: ClipTokenizer
    family: str  # "sd1" | "sd2" | "sdxl"
    in_channels: int  # UNet input channels: 4, or 9 for inpainting models
    model_name: str  # file stem or folder name (A1111 "Model")
    model_hash: str  # 10 hex of the file's sha256; for a folder, of its UNet weights file
    vae_name: str | None = None  # separate VAE (model.vae) file or folder name; None = the model's own
    vae_hash: str | None = None
    source: str = ""  # the resolved file or folder
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's OpenCLIP bigG (pooled projection); else None
    # ControlNets loaded for this model (controlnet_files.load_controlnet), released with the bundle
    controlnets: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


# Loaded models stay on their device for reuse by later runs in this process (a multirun); the
# least recently used is dropped past this many, so a sweep over checkpoints does not fill the GPU.
MAX_CACHED_MODELS = 2
_bundles: OrderedDict[tuple, ModelBundle] = OrderedDict()
_loads = 0
_warned_xformers = False


def load_count() -> int:
    """How many times models were actually loaded (not served from the cache) in this process."""
    return _loads


def clear_model_cache() -> None:
    """Forget every cached bundle, so the next load_models call reads the files again."""
    _bundles.clear()


def load_models(
    source: str,
    *,
    vae: str | None = None,
    v2: str = "auto",
    device: torch.device,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
) -> ModelBundle:
    """The models of ``source`` (model.checkpoint) with an optional separate ``vae`` (model.vae), cached."""
    global _loads
    if v2 not in ("auto", "true", "false"):
        raise ConfigError(f"model.v2 must be auto, true or false, got {v2!r}")
    path = resolve_source(source)
    vae_path = _resolve_vae(vae) if vae else None
    key = (_stamp(path), vae_path and _stamp(vae_path), v2, str(torch.device(device)), dtype, vae_dtype)
    if key not in _bundles:
        while len(_bundles) >= MAX_CACHED_MODELS:
            _bundles.popitem(last=False)
        start = time.perf_counter()
        bundle = _load(path, vae_path, v2)
        _bundles[key] = _place(bundle, torch.device(device), dtype, vae_dtype)
        _loads += 1
        log.info(
            "Loaded %s (%s) in %.1fs <model.checkpoint=%s>",
            path.name,
            bundle.family,
            time.perf_counter() - start,
            source,
        )
    _bundles.move_to_end(key)
    return _bundles[key]


def is_cached(bundle: ModelBundle) -> bool:
    """Whether the model cache still holds this bundle (engines built on dropped bundles are dropped too)."""
    return any(b is bundle for b in _bundles.values())


def resolve_source(source: str) -> Path:
    """The file or folder that model.checkpoint names; builtin:tiny and builtin:tiny_xl are built on first use."""
    if source in (TINY_SOURCE, TINY_XL_SOURCE):
        return ensure_tiny_checkpoint("sdxl" if source == TINY_XL_SOURCE else "sd1")
    if source.startswith("builtin:"):
        raise ModelError(f"model.checkpoint {source!r} is unknown; the built-in models are {TINY_SOURCE} and "
                         f"{TINY_XL_SOURCE}")
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    cached = _hub_snapshot(source)
    if cached is None:
        raise ModelError(
            f"model.checkpoint '{source}' is not a file, a folder or a cached hub model; "
            "download it first or give a path"
        )
    return cached


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model that is already in the Hugging Face cache; never downloads."""
    if not _HUB_ID.fullmatch(repo_id):
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (
        OSError,
        ValueError,
    ):  # not cached (LocalEntryNotFoundError) or not a valid id (HFValidationError)
        return None


def _resolve_vae(vae: str) -> Path:
    path = Path(vae).expanduser()
    if not path.exists():
        raise ModelError(
            f"model.vae '{vae}' does not exist; give a VAE .safetensors/.ckpt file or a diffusers VAE folder"
        )
    return path.resolve()


def weights_file(folder: Path) -> Path:
    """The weights file of a diffusers component folder (safetensors first)."""
    for pattern in _WEIGHT_PATTERNS:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise ModelError(f"{folder} has no weights file (diffusion_pytorch_model.safetensors or .bin)")


def _stamp(path: Path) -> tuple:
    """Identity of a model on disk: a changed weights file (size or mtime) makes it a different model."""
    files = [path] if path.is_file() else sorted(f for p in ("*.safetensors", "*.bin") for f in path.rglob(p))
    return (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _load(path: Path, vae_path: Path | None, v2: str) -> ModelBundle:
    if path.is_dir():
        bundle = _load_folder(path, v2)
    else:
        state = read_state_dict(path)
        unet, vae, text_encoder, family = convert_checkpoint(state, path.name, v2=v2, with_vae=vae_path is None)
        second = convert_text_encoder(state, "sdxl_2", path.name) if family == "sdxl" else None
        bundle = _bundle(unet, vae, text_encoder, family, PAD_TOKENS[family], path, file_sha256_short(path), second)
    if vae_path is None:
        return bundle
    scaling = SDXL_VAE_SCALING_FACTOR if bundle.family == "sdxl" else VAE_SCALING_FACTOR
    vae, name, vae_hash = _load_vae(vae_path, scaling)
    return dataclasses.replace(bundle, vae=vae, vae_name=name, vae_hash=vae_hash)


def _bundle(unet, vae, text_encoder, family: str, pad: str, path: Path, model_hash: str,
            text_encoder_2: CLIPTextModelWithProjection | None = None) -> ModelBundle:
    return ModelBundle(
        text_encoder_2=text_encoder_2,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(pad),
        family=family,
        in_channels=unet.config.in_channels,
        model_name=_model_name(path),
        model_hash=model_hash,
        source=str(path),
    )


def _model_name(path: Path) -> str:
    """File stem, folder name, or the repo name of a hub cache snapshot (models--org--name/snapshots/HASH)."""
    if path.is_file():
        return path.stem
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


@cache
def _tokenizer(pad: str) -> ClipTokenizer:
    return ClipTokenizer(pad_token=pad)  # reading the BPE merges takes a moment; share one per pad token


def _load_folder(path: Path, v2: str) -> ModelBundle:
    """A diffusers folder: unet/, vae/, text_encoder/ (and tokenizer/ for the pad token)."""
    if not (path / "unet" / "config.json").is_file():
        missing = "unet/config.json" if (path / "model_index.json").is_file() else "model_index.json"
        raise ModelError(
            f"model.checkpoint {path} is a folder without {missing} (not a diffusers model)"
            f"{_model_files_in(path)}; give a .safetensors/.ckpt file or a diffusers folder"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
        second = (CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True)
                  if (path / "text_encoder_2").is_dir() else None)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the diffusers model: {_first_line(exc)}") from exc
    # SD2's OpenCLIP text encoder uses gelu; SD1's OpenAI CLIP uses quick_gelu; SDXL has a second one.
    family = "sdxl" if second is not None else "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    forced = {"true": "sd2", "false": "sd1"}.get(v2) if family != "sdxl" or v2 == "true" else None
    if forced not in (None, family):
        raise ModelError(f"model.v2={v2} but {path} is an {family.upper()} model; set model.v2=auto")
    pad = _folder_pad_token(path / "tokenizer") or PAD_TOKENS[family]
    return _bundle(unet, vae, text_encoder, family, pad, path, file_sha256_short(weights_file(path / "unet")), second)


def _model_files_in(folder: Path) -> str:
    """'; it holds model.safetensors' (model-like files right in `folder`), or '; it is empty', for messages."""
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError:
        return ""
    if not entries:
        return "; it is empty"
    models = [name for name in entries if Path(name).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin")]
    shown = models or entries
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    return f"; it holds {', '.join(shown[:3])}{more}"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _folder_pad_token(folder: Path) -> str | None:
    """The pad token written in a diffusers tokenizer/ folder, if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad  # AddedToken form: {"content": "!"}
        if isinstance(pad, str):
            return pad
    return None


def _load_vae(path: Path, scaling: float) -> tuple[AutoencoderKL, str, str]:
    """(vae, name, hash) from a VAE file (latent scale ``scaling``: the model family's), a diffusers VAE folder
    or a diffusers model folder with vae/ (their config says their scale)."""
    if path.is_file():
        return convert_vae_file(read_state_dict(path), path.name, scaling), path.name, file_sha256_short(path)
    folder = path if (path / "config.json").is_file() else path / "vae"
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.vae {path} is a folder without config.json or vae/config.json{_model_files_in(path)}; "
            "give a VAE file or a diffusers VAE folder"
        )
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.vae {folder}: cannot load the VAE: {_first_line(exc)}") from exc
    return vae, path.name, file_sha256_short(weights_file(folder))


def _place(
    bundle: ModelBundle, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype
) -> ModelBundle:
    """Move to the device and dtypes, inference mode: eval() and no gradients."""
    modules = [(bundle.unet, dtype), (bundle.text_encoder, dtype), (bundle.vae, vae_dtype)]
    for module, module_dtype in modules + ([(bundle.text_encoder_2, dtype)] if bundle.text_encoder_2 else []):
        # torch's own .to: diffusers' override warns about fp32-only modules even when it lists none
        torch.nn.Module.to(module, device=device, dtype=module_dtype).eval().requires_grad_(False)
    return bundle


_PROCESSORS = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor, "xformers": XFormersAttnProcessor}


def set_attention(bundle: ModelBundle, mode: str) -> None:
    """Use ``mode`` (perf.attention: sdpa | xformers | eager) for the UNet's and the VAE's attention."""
    global _warned_xformers
    if mode not in _PROCESSORS:
        raise ConfigError(f"perf.attention must be one of {', '.join(_PROCESSORS)}, got {mode!r}")
    if mode == "xformers" and not _xformers_available():
        if not _warned_xformers:
            log.warning("xformers is not installed; using SDPA <perf.attention=xformers>")
            _warned_xformers = True
        mode = "sdpa"
    for module in (bundle.unet, bundle.vae):
        module.set_attn_processor(_PROCESSORS[mode]())


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # missing, or built for another torch/CUDA: both mean "not usable"
        return False
    return True

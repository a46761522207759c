"""What a model file is, told from its tensor names: a checkpoint (and its family), LoRA, ControlNet, VAE or
embedding; with its key count, short hash and .safetensors metadata (`sdbatch-info FILE`).

A .safetensors file is read from its header only; a torch file is read with the safe reader (weights only).
The hash is the one images record for that kind (A1111's), so a file is found from an image's metadata.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from sdbatch.engine.features.lora_network import addnet_hash
from sdbatch.engine.models.checkpoint import SAFETENSORS_SUFFIX, file_sha256_short, read_state_dict
from sdbatch.engine.models.convert import CONTROLNET_PREFIX, UNET_PREFIX, VAE_PREFIX, detect_family
from sdbatch.engine.models.loading import weights_file
from sdbatch.engine.models.lora_meta import metadata_of, read_header
from sdbatch.errors import ModelError

_LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", "lora_unet_", "lora_te_")
_EMBEDDING_KEYS = ("emb_params", "string_to_param", "clip_l")
_VAE_KEYS = {"encoder.conv_in.weight", "decoder.conv_out.weight"}  # a VAE file without the checkpoint's prefix


@dataclass(frozen=True, slots=True)
class ModelFileInfo:
    """A model file as `sdbatch-info` shows it."""

    path: str
    kind: str  # checkpoint | lora | controlnet | vae | embedding (sdbatch.config.model_folders.KINDS) | unknown
    family: str  # checkpoints: "SD 1.x", "SD 2.x", "SDXL", "SDXL refiner (not supported)"; "" for the others
    keys: int  # tensors in the file
    hash: str  # the short hash images record for this kind
    metadata: dict[str, str] = field(default_factory=dict)  # .safetensors __metadata__


def model_file_info(path: str | Path) -> ModelFileInfo:
    """Kind, family, key count, hash and metadata of one model file; ModelError naming it if it is unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        keys, metadata = _keys_and_metadata(path)
    except OSError as ex:
        raise ModelError(f"cannot read {path}: {ex.strerror or ex}") from None
    kind = file_kind(keys)
    return ModelFileInfo(str(path), kind, _family(keys, path.name) if kind == "checkpoint" else "", len(keys),
                         short_hash(path, kind), metadata)


def short_hash(path: Path, kind: str) -> str:
    """The hash an image records for this model: a LoRA's of its tensor data (12 hex digits), an embedding's
    sha256 (12), any other file's sha256 (10, A1111's "Model hash"); a diffusers folder's of its weights file
    (a checkpoint's UNet weights), as loading records it. "-" for a folder without weights."""
    if path.is_dir():
        try:
            path = weights_file(path / "unet" if kind == "checkpoint" else path)
        except ModelError:
            return "-"
    if kind == "lora":
        return addnet_hash(path)
    return file_sha256_short(path, 12 if kind == "embedding" else 10)


def _keys_and_metadata(path: Path) -> tuple[list[str], dict[str, str]]:
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        header = read_header(path)
        return [k for k in header if k != "__metadata__"], metadata_of(header)
    return list(read_state_dict(path)), {}


def file_kind(keys: Collection[str]) -> str:
    """Which kind of model file (a KINDS name, or "unknown") holds tensors named `keys` (the conventions of the
    formats sdbatch loads)."""
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "checkpoint"
    if any(k.startswith(CONTROLNET_PREFIX) or k.startswith("controlnet_cond_embedding.") for k in keys) or (
            "input_hint_block.0.weight" in keys):
        return "controlnet"
    if any(mark in k for k in keys for mark in _LORA_MARKS):
        return "lora"
    if any(k.startswith(VAE_PREFIX) for k in keys) or _VAE_KEYS <= set(keys):
        return "vae"
    if any(k.split(".")[0] in _EMBEDDING_KEYS for k in keys) or 0 < len(keys) <= 2:
        return "embedding"
    return "unknown"


def _family(keys: list[str], name: str) -> str:
    try:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[detect_family(dict.fromkeys(keys), name)]
    except ModelError as ex:  # an SDXL refiner, or no text encoder keys: say what it is instead
        return "SDXL refiner (not supported)" if "SDXL" in str(ex) else "unknown (no text encoder keys)"

"""A LoRA file's training metadata (kohya's ``ss_*`` keys) from its .safetensors header, without its tensors.

Only the header is read: 8 bytes of little-endian length, then that many bytes of JSON whose ``__metadata__``
object holds string keys and values. No tensor is loaded and nothing is unpickled; torch files carry no such
header. The values come from whoever made the file: format them with care (sdbatch.cli.info does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdbatch.errors import ModelError

_MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too


@dataclass(frozen=True, slots=True)
class LoraMeta:
    """What a LoRA file says about its training."""

    path: str  # as given
    name: str  # file name, e.g. "style.safetensors"
    hash: str  # A1111's short hash of the tensor data (what images record under "Lora hashes")
    metadata: dict[str, str]  # the header's __metadata__; empty when the file has none


def read_lora_meta(path: str | Path) -> LoraMeta:
    """The metadata of the .safetensors file at ``path``; ModelError (naming the file) if it cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        found = "is a folder, not a LoRA file" if path.is_dir() else "not found"
        raise ModelError(f"LoRA file {path} {found}")
    # imported here, after the cheap checks: the hash lives with the LoRA loader, and both import torch
    from sdbatch.engine.features.lora_network import addnet_hash
    from sdbatch.engine.models.checkpoint import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: metadata is only stored in .safetensors files (this is a {suffix} file)")
    if suffix != SAFETENSORS_SUFFIX:
        raise ModelError(f"{path} is not a .safetensors file")
    try:
        metadata = metadata_of(read_header(path))
    except OSError as ex:
        raise ModelError(f"cannot read {path}: {ex.strerror or ex}") from None
    return LoraMeta(path=str(path), name=path.name, hash=addnet_hash(path), metadata=metadata)


def metadata_of(header: dict) -> dict[str, str]:
    """The `__metadata__` of a .safetensors header (`read_header`) as strings; empty when it has none."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        return {}
    # the format allows strings only; other writers' numbers or objects are kept as their JSON text
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def read_header(path: Path) -> dict:
    """A .safetensors file's JSON header: {tensor name: {dtype, shape, offsets}, "__metadata__": {...}}."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        length = int.from_bytes(length_bytes, "little")
        if len(length_bytes) < 8 or length > min(size - 8, _MAX_HEADER):
            raise ModelError(f"{path} is not a valid .safetensors file (its header length is wrong)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"{path} is not a valid .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a valid .safetensors file (its header is not a JSON object)")
    return header

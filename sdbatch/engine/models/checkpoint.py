"""Read a model file into a plain state dict without running code from it, and hash it like A1111."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from sdbatch.errors import ModelError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

_HASH_CHUNK = 1 << 20
_HASH_FILE = "hashes.json"
_hash_cache: dict[tuple[str, int, int], str] = {}
_np_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 renamed it


class _InertObject:
    """Stand-in for harmless classes pickled into old Lightning checkpoints; it has no behaviour at all."""


# Original SD1 .ckpt files carry Lightning's ModelCheckpoint class (as a dict key) and numpy scalars in their
# training metadata. weights_only=True rejects them; these aliases only build plain values and never run
# the original classes' code, so such a file still loads (A1111's safe unpickler allows the same names).
_LEGACY_SAFE_GLOBALS = [
    (_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (np.dtype, "numpy.dtype"),
    (_np_multiarray.scalar, "numpy.core.multiarray.scalar"),
    (_np_multiarray.scalar, "numpy._core.multiarray.scalar"),
    # Unpickling a dtype ends in a BUILD step, which weights_only allows only for listed classes.
    *{type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"},
]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or torch file, on the CPU; a nested ``state_dict`` is unwrapped."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a model file; give a .safetensors or .ckpt file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _tensors_only(path, _read_pickle(path))
    raise ModelError(
        f"{path} has an unknown extension {suffix!r}; use .safetensors, .ckpt, .pt, .pth or .bin"
    )


def read_object(path: Path, extra_safe: tuple[type, ...] = ()) -> object:
    """What a .safetensors file (a dict of tensors) or a torch file holds, read without running code from it.

    ``extra_safe`` allows more classes in a torch file, for formats that pickle a harmless torch container.
    """
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    return _read_pickle(path, extra_safe)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several unrelated types for a damaged header or body
        raise ModelError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from exc


def _read_pickle(path: Path, extra_safe: tuple[type, ...] = ()) -> object:
    try:
        with torch.serialization.safe_globals([*_LEGACY_SAFE_GLOBALS, *extra_safe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if reason.startswith("Unsupported operand"):  # a damaged pickle stream, not a forbidden callable
            raise ModelError(f"{path} is not a valid PyTorch checkpoint (truncated or corrupt?)") from exc
        raise ModelError(
            f"refusing to load {path}: it contains code, not just tensors ({_unsafe_globals(path, reason)}); "
            "convert it to .safetensors with a tool you trust"
        ) from exc
    except Exception as exc:  # zip and storage readers raise RuntimeError, EOFError, ValueError, ...
        raise ModelError(f"{path} is not a valid PyTorch checkpoint (truncated or corrupt?): {exc}") from exc


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights_only error that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # Skip torch's generic intro ("Weights only load failed...") and its advice lines around the reason.
    reasons = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the doc"))]
    return reasons[0] if reasons else ""


def _unsafe_globals(path: Path, reason: str) -> str:
    """Names of the callables the pickle would import, read without unpickling; for the error message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an old non-zip pickle cannot be scanned; torch's own reason names the callable
        names = []
    return ", ".join(sorted(names)[:5]) or reason[:120] or "unknown callables"


def _tensors_only(path: Path, obj: object) -> dict[str, torch.Tensor]:
    # Lightning checkpoints hold the weights under "state_dict" beside training metadata.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"{path} holds no tensors; is it a model file?")
    return tensors


def cache_root() -> Path:
    """sdbatch's own cache folder: ``$SDBATCH_CACHE``, else ``~/.cache/sdbatch`` (demo model, file hashes)."""
    return Path(os.environ.get("SDBATCH_CACHE") or Path.home() / ".cache" / "sdbatch")


def file_sha256_short(path: str | Path, length: int = 10) -> str:
    """First ``length`` hex digits of the whole file's sha256 (10: A1111 "Model hash"; 12: its "TI hashes").

    Hashing reads the whole file (~0.7 s per GB here), so results are kept per (path, size, mtime) in
    the process and in ``hashes.json`` under cache_root(), as A1111 keeps its cache.json. The whole digest
    is stored; an entry from an older sdbatch that kept only 10 digits still serves 10-digit requests.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _hash_cache.get(key, "")
    if len(digest) < length:
        digest = _known_digest(key)
        if len(digest) < length:
            digest = _sha256(path)
            _write_hash_file(key, digest)
        _hash_cache[key] = digest
    return digest[:length]


def _known_digest(key: tuple[str, int, int]) -> str:
    """The sha256 hashes.json holds for this (path, size, mtime), or "" (possibly only a prefix)."""
    known = _read_hash_file().get(key[0])
    if isinstance(known, dict) and (known.get("size"), known.get("mtime_ns")) == key[1:]:
        return str(known.get("sha256") or "")
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_hash_file() -> dict:
    try:
        data = json.loads((cache_root() / _HASH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_hash_file(key: tuple[str, int, int], digest: str) -> None:
    """Best effort: a read-only or shared cache only costs a re-hash next time."""
    data = _read_hash_file()
    data[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
    target = cache_root() / _HASH_FILE
    tmp = target.with_name(f".{_HASH_FILE}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)

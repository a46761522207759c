"""Read a model file into a plain state dict without running code from it, and hash it like A1111."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from sdbatch.errors import ModelError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

_HASH_CHUNK = 1 << 20
# a first hash of a larger file shows a bar (on a terminal): ~0.2 s here, seconds for a 2-7 GB checkpoint
HASH_BAR_BYTES = 256 << 20
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
        refused, clean = _refused_globals(path, str(exc), extra_safe)
        if refused:
            raise ModelError(
                f"refusing to load {path}: it contains code, not just tensors (it would call {refused}); "
                "convert it to .safetensors with a tool you trust"
            ) from exc
        if reason.startswith("Unsupported operand") and clean:  # a whole pickle, in opcodes torch does not read
            raise ModelError(f"{path} is a pickle torch.load(weights_only=True) cannot read ({reason}: an old "
                             "pickle protocol); convert it to .safetensors with a tool you trust") from exc
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


# torch's weights_only error names the refused global in one of these forms (2.4 to 2.13)
_REFUSED_IN_MESSAGE = (
    re.compile(r"GLOBAL ([\w.]+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL ([\w.]+) whose module"),
    re.compile(r"Unsupported global: GLOBAL ([\w.]+)"),
)
_OS_MODULES = {"posix": "os", "nt": "os"}  # os.system pickles as posix.system (nt.system on Windows)
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocols 0-2 write Python 2's names
_STRING_OPS = frozenset({"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})


def _refused_globals(path: Path, message: str, extra_safe: tuple[type, ...] = ()) -> tuple[str, bool]:
    """('posix.system (os.system)', whether the file's pickles all parsed) for a pickle weights_only refused.

    The callables are read from the pickle opcodes (never run): a protocol-0 pickle stops torch's reader
    before it reaches the global, and torch's message drops the module of builtins ('exec'). Falls back to
    the name in torch's message. Allowed names (tensors, containers, the Lightning aliases) are left out.
    """
    found, clean = _pickle_globals(path)
    found = [_PY2_MODULES.get(name.rpartition(".")[0], name.rpartition(".")[0]) + "." + name.rpartition(".")[2]
             for name in found]
    allowed = _allowed_globals(extra_safe)
    refused = [name for name in found if name not in allowed and not name.startswith("torch.")]
    if not refused:
        refused = [m.group(1) for pattern in _REFUSED_IN_MESSAGE if (m := pattern.search(message))][:1]
    shown = []
    for name in dict.fromkeys(refused):  # unique, in file order
        module, _, attr = name.rpartition(".")
        shown.append(f"{name} ({_OS_MODULES[module]}.{attr})" if module in _OS_MODULES else name)
    return ", ".join(shown[:5]), clean


def _allowed_globals(extra_safe: tuple[type, ...]) -> set[str]:
    names = {entry[1] for entry in _LEGACY_SAFE_GLOBALS if isinstance(entry, tuple)}
    names.update(f"{cls.__module__}.{cls.__qualname__}" for cls in (*_LEGACY_SAFE_GLOBALS, *extra_safe)
                 if isinstance(cls, type))
    try:
        from torch import _weights_only_unpickler

        names.update(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # a private API: without it only torch.* names count as allowed
        pass
    return names


def _pickle_globals(path: Path, limit: int = 8) -> tuple[list[str], bool]:
    """'module.name' of every global the file's pickles import, read with pickletools (nothing is executed),
    and whether every pickle read parsed to its end. A zip checkpoint's data.pkl files are read; a legacy or
    plain file is read as consecutive pickles (the legacy format's storages after them end the reading).
    Globals of a pickle that does not parse to its STOP are dropped: they may be garbage."""
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                clean = True
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        names, ok = _scan_pickle(io.BytesIO(archive.read(member)))
                        found += names if ok else []
                        clean = clean and ok
                return found, clean
        with open(path, "rb") as stream:
            for count in range(limit):
                if not stream.peek(1):
                    break
                names, ok = _scan_pickle(stream)
                if not ok:
                    return found, count > 0
                found += names
    except (OSError, zipfile.BadZipFile, RuntimeError):
        pass
    return found, True


def _scan_pickle(stream: io.IOBase) -> tuple[list[str], bool]:
    """Globals ('module.name') of the one pickle at the stream's position, and whether it parsed to STOP."""
    names: list[str] = []
    recent: list[object] = []  # what the last opcodes pushed (strings, else None), for STACK_GLOBAL
    memo: dict[int, object] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                names.append(".".join(str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                module, attr = (recent[-2:] if len(recent) >= 2 else [None, None])
                names.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
            if name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif opcode.stack_after:
                recent.append(None)
            if name == "STOP":
                return names, True
    except Exception:  # garbage or a truncated stream: pickletools raises ValueError, struct.error, ...
        return names, False
    return names, False


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
    size = path.stat().st_size
    # disable=None: tqdm shows the bar only on a terminal, where someone waits for it; leave=False: it goes
    bar = tqdm(total=size, desc=f"hashing {path.name}", unit="B", unit_scale=True, unit_divisor=1024,
               leave=False, disable=None if size > HASH_BAR_BYTES else True)
    with open(path, "rb") as f, bar:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _read_hash_file() -> dict:
    try:
        data = json.loads((cache_root() / _HASH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_hash_file(key: tuple[str, int, int], digest: str) -> None:
    """Best effort: a read-only or shared cache only costs a re-hash next time.

    Read, update and replace happen under hashes.json.lock, so processes hashing different models at once
    each add their entry instead of overwriting the other's; a lock held for 10 s skips the update.
    """
    from filelock import FileLock, Timeout

    target = cache_root() / _HASH_FILE
    tmp = target.with_name(f".{_HASH_FILE}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.with_name(f"{_HASH_FILE}.lock")), timeout=10):
            data = _read_hash_file()
            data[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            os.replace(tmp, target)
    except (OSError, Timeout):  # Timeout is an OSError in filelock >= 3.10; named for older ones
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only cache folder
            pass

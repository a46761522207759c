"""Textual Inversion: read embedding files safely and add their vectors to a text encoder as new tokens.

Formats read (the prompt token is always the file name without extension, as in A1111 and the reference):

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}``. Files from the original
  textual-inversion code hold a ``torch.nn.ParameterDict`` there; it is allowed, as A1111's safe unpickler does.
- kohya ``train_textual_inversion.py`` and A1111-trained ``.safetensors``: ``{"emb_params": (n, D)}``
  (kohya writes the same key into ``.pt``/``.ckpt`` files).
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: (D,) or (n, D)}``, one entry.

Extended Textual Inversion (XTI) files hold one ``(n, D)`` tensor per cross-attention block of the UNet,
under the 16 keys of :data:`XTI_LAYERS` (kohya ``train_textual_inversion_XTI.py``); see
:mod:`sdbatch.engine.features.xti`.

- SDXL (kohya, A1111): ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, kept as one (n, 768 + 1280) tensor whose
  parts go into SDXL's two text encoders (:func:`register_sdxl`); its width fits no SD1/SD2 model, nor theirs SDXL.

Torch files are read with ``weights_only=True`` (:func:`sdbatch.engine.models.checkpoint.read_object`): code in a
pickle is refused, never run. Embeddings stored inside images are refused with a clear error.

:func:`register` gives an embedding of ``n`` vectors ``n`` new token ids after the vocabulary, grows the
text encoder's input embeddings (``resize_token_embeddings``) and writes the vectors into those rows. Ids
are kept per text-encoder module and per (name, n): engines sharing a model share its ids, and a name
registered again (by a later run, maybe from another file) gets the same ids with its rows rewritten.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sdbatch.engine.models.checkpoint import file_sha256_short, read_object
from sdbatch.errors import ModelError

SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt", ".pth")
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".avif")
MAX_VECTORS = 75  # one prompt chunk: an embedding is never split across two chunks
HASH_DIGITS = 12  # A1111 "TI hashes": the first 12 hex digits of the file's sha256
KEY = "model.textual_inversion"
XTI_KEY = "model.xti_embeddings"
# SD's cross-attention blocks in ldm numbering (input_blocks / middle_block / output_blocks), file key order
XTI_LAYERS = ("IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
              "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")

# text-encoder module → {(lowercase name, is XTI, row count): token ids}; dropped with the module
_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, bool, int], tuple[int, ...]]] = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True, eq=False)
class Embedding:
    """One loaded embedding file."""

    name: str  # the prompt token: the file name without extension
    file: str  # the resolved path
    hash: str  # first 12 hex digits of the file's sha256 (A1111 "TI hashes")
    vectors: torch.Tensor  # (n, D) float32 on the CPU; (16, n, D) for XTI, one (n, D) per XTI_LAYERS entry
    xti: bool = False  # an Extended Textual Inversion file (model.xti_embeddings)


def load_embeddings(paths: Sequence[str], xti_paths: Sequence[str] = ()) -> list[Embedding]:
    """Load model.textual_inversion and model.xti_embeddings; two files with one name (any case) are an error."""
    embeddings = [*(load_embedding(p) for p in paths), *(load_embedding(p, xti=True) for p in xti_paths)]
    seen: dict[str, Embedding] = {}
    for emb in embeddings:
        other = seen.setdefault(emb.name.lower(), emb)
        if other is not emb:
            raise ModelError(f"{XTI_KEY if emb.xti else KEY}: {other.file} and {emb.file} give the same prompt "
                             f"token {emb.name!r} (names ignore case); rename one of the files")
    return embeddings


def load_embedding(path: str | Path, *, xti: bool = False) -> Embedding:
    """Read one embedding file (any supported format; an XTI file with ``xti``) and hash it."""
    key = XTI_KEY if xti else KEY
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ModelError(f"{key}: embedding file {path} {what}; check the path")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise ModelError(f"{key}: {path}: embeddings stored in images are not supported; "
                         "use the embedding's .pt or .safetensors file")
    if suffix not in SUFFIXES:
        raise ModelError(f"{key}: {path} has an unknown extension {suffix!r}; use .safetensors, .pt, .bin or .ckpt")
    data = read_object(path, (torch.nn.ParameterDict,))
    vectors = xti_vectors(path, data) if xti else embedding_vectors(path, data)
    return Embedding(path.stem, str(path.resolve()), file_sha256_short(path, HASH_DIGITS), vectors, xti)


def embedding_vectors(path: Path, data: object) -> torch.Tensor:
    """The (n, D) float32 vectors of a loaded embedding file, whichever format it is in."""
    if not isinstance(data, dict):
        raise ModelError(f"{KEY}: {path} holds a {type(data).__name__}, not a Textual Inversion embedding")
    if "clip_l" in data or "clip_g" in data:
        return _sdxl_vectors(path, data)
    if "string_to_param" in data:  # A1111; the original code pickled a ParameterDict here
        params = data["string_to_param"]
        data = dict(getattr(params, "_parameters", params)) if isinstance(params, dict | torch.nn.Module) else {}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if "emb_params" in tensors:
        tensor = tensors["emb_params"]
    elif len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    else:
        keys = ", ".join(map(str, list(data)[:8])) or "none"
        raise ModelError(f"{KEY}: {path} is not a Textual Inversion embedding: expected string_to_param, "
                         f"emb_params or a single {{token: tensor}} entry, found keys: {keys}")
    return _checked(path, tensor, KEY)


def _sdxl_vectors(path: Path, data: dict) -> torch.Tensor:
    """An SDXL embedding's clip_l and clip_g vectors side by side, (n, D_l + D_g)."""
    parts = [data.get(k) for k in ("clip_l", "clip_g")]
    if not all(isinstance(p, torch.Tensor) for p in parts):
        raise ModelError(f"{KEY}: {path} is an SDXL embedding without both clip_l and clip_g tensors")
    first, second = (_checked(path, p, KEY) for p in parts)
    if first.shape[0] != second.shape[0]:
        raise ModelError(f"{KEY}: {path}: clip_l has {first.shape[0]} vectors but clip_g {second.shape[0]}")
    return torch.cat([first, second], dim=1)


def xti_vectors(path: Path, data: object) -> torch.Tensor:
    """The (16, n, D) float32 vectors of a loaded XTI file, in XTI_LAYERS order."""
    keys = set(data) if isinstance(data, dict) else set()
    if keys != set(XTI_LAYERS):
        missing = [k for k in XTI_LAYERS if k not in keys]
        extra = sorted(map(str, keys - set(XTI_LAYERS)))[:5]
        found = (f"missing {', '.join(missing)}" if len(missing) < len(XTI_LAYERS)
                 else "none of them (a plain embedding belongs in model.textual_inversion)")
        found += f"; unexpected keys: {', '.join(extra)}" if extra else ""
        raise ModelError(f"{XTI_KEY}: {path} is not an XTI embedding: expected exactly the 16 keys "
                         f"{XTI_LAYERS[0]}..{XTI_LAYERS[-1]}, found {found}")
    layers = [_checked(path, data[k], XTI_KEY) if isinstance(data[k], torch.Tensor) else None for k in XTI_LAYERS]
    if any(t is None for t in layers) or len({t.shape for t in layers}) != 1:
        raise ModelError(f"{XTI_KEY}: {path}: the 16 layers must be tensors of one shape (vectors, width)")
    return torch.stack(layers)


def _checked(path: Path, tensor: torch.Tensor, key: str) -> torch.Tensor:
    """One embedding tensor as (n, D) float32 on the CPU, or a ModelError saying what is wrong with it."""
    tensor = tensor.detach()
    tensor = tensor[None] if tensor.ndim == 1 else tensor
    if tensor.ndim != 2 or not tensor.shape[0] or not tensor.is_floating_point():
        raise ModelError(f"{key}: {path}: the embedding tensor is {tensor.dtype} of shape {tuple(tensor.shape)}; "
                         "expected floats of shape (vectors, width)")
    if tensor.shape[0] > MAX_VECTORS:
        raise ModelError(f"{key}: {path} has {tensor.shape[0]} vectors; at most {MAX_VECTORS} fit in a prompt")
    return tensor.to(device="cpu", dtype=torch.float32)


def register(text_encoder: torch.nn.Module, embeddings: Sequence[Embedding]) -> list[tuple[int, ...]]:
    """Write the embeddings into the text encoder as new tokens; returns the token ids of each, in order.

    An XTI embedding gets 16·n ids: layer ``XTI_LAYERS[b]`` has ids ``[b·n, (b+1)·n)`` of its tuple.
    """
    width = text_encoder.get_input_embeddings().weight.shape[1]
    _check_widths(embeddings, width)
    table = _SLOTS.setdefault(text_encoder, {})
    size = text_encoder.get_input_embeddings().weight.shape[0]
    rows = [emb.vectors.reshape(-1, width) for emb in embeddings]
    keys = [(emb.name.lower(), emb.xti, len(r)) for emb, r in zip(embeddings, rows, strict=True)]
    for key in keys:
        if key not in table:
            table[key] = tuple(range(size, size + key[2]))
            size += key[2]
    _grow(text_encoder, size)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for r, key in zip(rows, keys, strict=True):
            weight[list(table[key])] = r.to(device=weight.device, dtype=weight.dtype)
    return [table[key] for key in keys]


def _check_widths(embeddings: Sequence[Embedding], width: int) -> None:
    for emb in embeddings:
        if emb.vectors.shape[-1] != width:
            raise ModelError(
                f"{XTI_KEY if emb.xti else KEY}: {emb.file} holds vectors of width {emb.vectors.shape[-1]}, but "
                f"this model's text encoder takes width {width}; an embedding only fits the model family it was "
                "trained on (SD1: 768, SD2: 1024, SDXL: clip_l + clip_g = 2048)")


def register_sdxl(first: torch.nn.Module, second: torch.nn.Module,
                  embeddings: Sequence[Embedding]) -> list[tuple[int, ...]]:
    """:func:`register` for SDXL: each embedding's clip_l part into ``first``, its clip_g part into ``second``.

    Both encoders read the same token ids, so both get the same names in the same order (and so the same ids).
    """
    width = first.get_input_embeddings().weight.shape[1]
    _check_widths(embeddings, width + second.get_input_embeddings().weight.shape[1])
    ids = register(first, [replace(e, vectors=e.vectors[..., :width]) for e in embeddings])
    if register(second, [replace(e, vectors=e.vectors[..., width:]) for e in embeddings]) != ids:
        raise RuntimeError("SDXL's two text encoders gave an embedding different token ids")
    return ids


def _grow(text_encoder: torch.nn.Module, size: int) -> None:
    """Give the input embeddings ``size`` rows; the random init of new rows leaves the global RNG alone."""
    weight = text_encoder.get_input_embeddings().weight
    if size <= weight.shape[0]:
        return
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        text_encoder.resize_token_embeddings(size, mean_resizing=False)

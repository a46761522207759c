"""Offline CLIP byte-level BPE tokenizer for SD1/SD2 prompts, plus Hugging Face tokenizer-file export.

The vocabulary is read from the bundled ``vocab/bpe_simple_vocab_16e6.txt.gz`` (never downloaded).
Special-token text typed in a prompt (``<|endoftext|>``) is tokenized as ordinary text, and the pad
token is only used for padding, so ``!`` as SD2's pad token never changes how ``!!!`` is split.
"""

from __future__ import annotations

import gzip
import html
import json
from functools import lru_cache
from pathlib import Path

import ftfy
import regex

VOCAB_PATH = Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# SD2's OpenCLIP tokenizer pads with "!" (id 0); SDXL's first (CLIP-L) tokenizer pads as SD1's, its second as SD2's
PAD_TOKENS = {"sd1": EOS_TOKEN, "sd2": "!", "sdxl": EOS_TOKEN}
MODEL_MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2
_MAX_CACHE = 100_000

# CLIP's split pattern without the two special-token alternatives: prompts cannot inject special ids.
_SPLIT_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_WS_RE = regex.compile(r"\s+")


def _byte_to_unicode() -> dict[int, str]:
    """Map each byte to a printable char: printable latin-1 bytes to themselves (first), the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean_text(text: str) -> str:
    """CLIP's text cleanup: ftfy, double html unescape, whitespace collapse, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WS_RE.sub(" ", text).strip().lower()


class _Bpe:
    """Shared vocabulary, merge ranks and BPE cache (one per process, see :func:`load_bpe`)."""

    def __init__(self, path: Path) -> None:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        self.merges: list[tuple[str, str]] = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        self.byte_encoder = _byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        merged = ["".join(m) for m in self.merges]
        tokens = [*chars, *(c + "</w>" for c in chars), *merged, BOS_TOKEN, EOS_TOKEN]
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.decoder: dict[int, str] = dict(enumerate(tokens))
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(self.merges)}
        self.cache: dict[str, list[int]] = {}

    def bpe(self, piece: str) -> list[int]:
        """Ids of one byte-encoded pre-token; the last symbol carries the ``</w>`` end-of-word mark."""
        hit = self.cache.get(piece)
        if hit is not None:
            return hit
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, _N_MERGES))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[sym] for sym in word]
        if len(self.cache) >= _MAX_CACHE:
            self.cache.clear()
        self.cache[piece] = ids
        return ids


@lru_cache(maxsize=1)
def load_bpe(path: Path = VOCAB_PATH) -> _Bpe:
    """Load (once per process) the bundled CLIP BPE vocabulary."""
    return _Bpe(path)


class ClipTokenizer:
    """CLIP tokenizer; ``pad_token`` is ``<|endoftext|>`` for SD1 and ``!`` for SD2."""

    def __init__(self, pad_token: str = EOS_TOKEN) -> None:
        self._bpe = load_bpe()
        if pad_token not in self._bpe.encoder:
            raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
        self.pad_token = pad_token

    @property
    def bos_id(self) -> int:
        return self._bpe.encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._bpe.encoder[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self._bpe.encoder[self.pad_token]

    @property
    def model_max_length(self) -> int:
        return MODEL_MAX_LENGTH

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        enc = self._bpe.byte_encoder
        ids: list[int] = []
        for piece in _SPLIT_RE.findall(clean_text(text)):
            ids.extend(self._bpe.bpe("".join(enc[b] for b in piece.encode("utf-8"))))
        return ids

    def pad(self, ids: list[int], length: int = MODEL_MAX_LENGTH) -> list[int]:
        """BOS + ids cut to ``length - 2`` + EOS, then pad ids up to ``length``."""
        if length < 2:
            raise ValueError(f"length must be at least 2, got {length}")
        out = [self.bos_id, *ids[: length - 2], self.eos_id]
        return out + [self.pad_id] * (length - len(out))

    def encode_padded(self, text: str, length: int = MODEL_MAX_LENGTH) -> tuple[list[int], bool]:
        """Padded ids of ``text`` and whether tokens were cut off to fit ``length``."""
        ids = self.encode(text)
        return self.pad(ids, length), len(ids) > length - 2

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (lowercased, cleaned); BOS/EOS are dropped unless ``skip_special`` is False."""
        special = {self.bos_id, self.eos_id}
        buf = bytearray()
        for i in ids:
            if skip_special and i in special:
                continue
            token = self._bpe.decoder[i]
            end = token.endswith("</w>")
            buf.extend(self._bpe.byte_decoder[c] for c in (token[:-4] if end else token))
            if end:
                buf.extend(b" ")
        return buf.decode("utf-8", errors="replace").strip()


def write_hf_tokenizer_files(directory: Path, pad_token: str) -> Path:
    """Write vocab.json, merges.txt and configs loadable by ``transformers.CLIPTokenizer`` offline."""
    bpe = load_bpe()
    if pad_token not in bpe.encoder:
        raise ValueError(f"pad token {pad_token!r} is not in the CLIP vocabulary")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(bpe.encoder, ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in bpe.merges)]) + "\n"
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        **specials,
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return directory

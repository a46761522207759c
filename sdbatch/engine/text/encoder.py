"""Text conditioning: weighted prompts → 75-token chunks of CLIP ids → text-encoder embeddings, cached.

A prompt is parsed for attention syntax (:mod:`sdbatch.prompts.weighting`), each weighted run is tokenized
on its own, and the tokens are cut into chunks of 75 (a ``BREAK`` ends a chunk early). Each chunk is
encoded as ``BOS + 75 + EOS`` (77 ids, CLIP padding after EOS) and the chunk embeddings are concatenated.
Token weights then scale the embeddings, with the reference's mean renormalisation (gen_img_inventory.md
§7.2-7.3). A one-chunk prompt without weights gives exactly the plain ``text_encoder(ids)`` output.

Each prompt is encoded with its own chunk count (the most its image's prompt and negative need, at most
``max_embeddings_multiples``), so its encoding does not depend on the other prompts of its batch; a batch gives
``(B, 77·n, D)`` with ``n`` the largest count, shorter rows padded with the empty prompt's chunk. The UNet masks
that padding (the row contract's ``text_chunks``), so an image is the same alone or beside longer prompts.

Textual Inversion (:meth:`TextEncoder.set_embeddings`): an active embedding's name in a prompt (matched as
:mod:`sdbatch.prompts.embedding_names` says) is replaced by the token ids of its vectors, which count
towards the 75-token budget. As in A1111, a multi-vector embedding that does not fit in the current chunk
starts the next one instead of being split (the reference splits it).

Extended Textual Inversion (XTI): an XTI name is tokenized to the ids of its first layer (IN01); passing
``block=b`` to :meth:`TextEncoder.encode_batch` swaps in the ids of layer ``XTI_LAYERS[b]``, so the 16
per-block encodings of :mod:`sdbatch.engine.features.xti` come from 16 calls. Texts without XTI names are the same
for every block and come from the cache after the first.

SDXL (``text_encoder_2``): the same chunks go through both encoders (CLIP-L with its ids, OpenCLIP bigG with the
padding after EOS as ``!``, as its tokenizer pads); each gives its penultimate hidden states without the final
norm, concatenated on the last axis (as diffusers' StableDiffusionXLPipeline and A1111). Weights renormalise each
encoder's part on its own (A1111 weights each embedder separately). The pooled embedding the UNet's added
conditioning takes is bigG's projection at EOS of the text's first chunk (A1111: ``zs[0].pooled``).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdbatch.engine.text.embeddings import XTI_LAYERS, Embedding, register, register_sdxl
from sdbatch.errors import ConfigError
from sdbatch.prompts.embedding_names import name_pattern, split_names
from sdbatch.prompts.weighting import is_break, parse_weights

log = logging.getLogger(__name__)

CHUNK = 75  # tokens per encoder pass; with BOS and EOS that is CLIP's 77 positions
NORMALIZE_MODES = ("original", "abs", "none")


@dataclass(frozen=True)
class EncodedBatch:
    """A batch's text: prompts and negatives (B, 77·n, D), padded to one chunk count n, and each row's own."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    chunks: tuple[int, ...]  # the chunks each row was encoded with; the rest of its 77·n tokens is padding
    pooled: torch.Tensor | None = None  # SDXL: (B, P) pooled embeddings of the prompts; None for SD1/SD2
    pooled_uncond: torch.Tensor | None = None  # SDXL: (B, P) of the negatives


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """A prompt's token ids cut into chunks of at most 75, and the weight of each id."""

    chunks: tuple[tuple[int, ...], ...]  # at least one chunk; a chunk may be empty (leading BREAK)
    weights: tuple[tuple[float, ...], ...]  # same shape as chunks


class TextEncoder:
    """Encodes prompts with one tokenizer and text encoder; remembers recent encodings.

    ``max_multiples`` and ``normalize`` are the defaults of :meth:`encode_batch` (config keys
    ``max_embeddings_multiples`` and ``emb_normalize_mode``); set them per run.

    Textual Inversion: :meth:`set_embeddings` chooses the active embeddings; every weighted run is tokenized
    by :meth:`_token_groups`, which splices in their ids, and every id tensor goes through :meth:`_hidden`.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, cache_size: int = 256,
                 text_encoder_2: torch.nn.Module | None = None, pad_id_2: int = 0) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2  # SDXL's OpenCLIP bigG (CLIPTextModelWithProjection), else None
        self.pad_id_2 = pad_id_2  # its tokenizer's pad id ("!")
        self.max_multiples = 1
        self.normalize = "original"
        # (text, embeddings, clip_skip, k, normalize, chunk count) → ((77·n, D) embedding, SDXL's pooled or None)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._token_cache: OrderedDict[tuple, PromptTokens] = OrderedDict()  # (text, k, embeddings) → tokens
        self._ti_ids: dict[str, tuple[int, ...]] = {}  # lowercase name → token ids of its vectors
        self._ti_names: dict[int, str] = {}  # token id → name (first id) or "" (the others), for messages
        self._ti_pattern: re.Pattern[str] | None = None  # finds the active names; None when there are none
        self._xti_maps: list[dict[int, int]] = []  # per XTI block: first-layer id → that block's id
        # Identity of the active embeddings (names, file hashes, ids), part of every cache key: a run with
        # other embeddings (or another file under a name) never reads encodings made with the old ones.
        self._ti_key: tuple = ()
        # Identity of the LoRA state of the text encoder (file hashes, multipliers), also part of every key.
        self.network_key: tuple = ()
        self._cache_size = cache_size
        self.encoded = 0  # prompts actually run through the text encoder (cache misses)

    def set_embeddings(self, embeddings: Sequence[Embedding]) -> None:
        """Make exactly these (X)TI embeddings active, writing them into the text encoder."""
        ids = (register(self.text_encoder, embeddings) if self.text_encoder_2 is None
               else register_sdxl(self.text_encoder, self.text_encoder_2, embeddings))
        self._ti_ids, self._ti_names = {}, {}
        self._xti_maps = [{} for _ in XTI_LAYERS] if any(emb.xti for emb in embeddings) else []
        for emb, all_ids in zip(embeddings, ids, strict=True):
            n = emb.vectors.shape[-2]  # vectors per layer
            first = all_ids[:n]
            self._ti_ids[emb.name.lower()] = first
            self._ti_names.update((t, emb.name if j == 0 else "") for j, t in enumerate(first))
            if emb.xti:
                for b, mapping in enumerate(self._xti_maps):
                    mapping.update(zip(first, all_ids[b * n : (b + 1) * n], strict=True))
        self._ti_pattern = name_pattern(emb.name for emb in embeddings)
        self._ti_key = tuple(sorted((e.name.lower(), e.hash, e.xti, i) for e, i in zip(embeddings, ids, strict=True)))

    def uses_xti(self, texts: list[str]) -> bool:
        """Whether any of ``texts`` holds an XTI name (at the current max_embeddings_multiples)."""
        return bool(self._xti_maps) and any(self._xti_block(self.tokenize(t, self.max_multiples), 1) for t in texts)

    def encode(self, prompts: list[str], clip_skip: int) -> torch.Tensor:
        """Embeddings for each prompt, (B, 77·n, D); clip_skip 1 = last layer, n = n-th layer from the end."""
        return self.encode_batch(prompts, None, clip_skip=clip_skip)[0]

    def encode_batch(
        self, prompts: list[str], negatives: list[str] | None, *, clip_skip: int, max_multiples: int | None = None,
        normalize: str | None = None, origins: list[str] | None = None, block: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) embeddings, both (B, 77·n, D) with the same n; uncond is None without negatives.

        See :meth:`encode_texts`, which also says how many chunks of each row are its own.
        """
        encoded = self.encode_texts(prompts, negatives, clip_skip=clip_skip, max_multiples=max_multiples,
                                    normalize=normalize, origins=origins, block=block)
        return encoded.cond, encoded.uncond

    def encode_texts(
        self, prompts: list[str], negatives: list[str] | None, *, clip_skip: int, max_multiples: int | None = None,
        normalize: str | None = None, origins: list[str] | None = None, block: int | None = None,
        groups: Sequence[int] | None = None,
    ) -> EncodedBatch:
        """The batch's prompts and negatives, each encoded at its own chunk count, padded to the largest.

        Row j's count is the most chunks any prompt or negative of its group needs (``groups[j]``; by default
        each prompt with its negative is a group: the texts of one image, which share one UNet call alone).
        ``max_multiples`` (k) caps it: longer prompts are cut to 75·k tokens with one warning each, naming
        ``origins[i]`` (e.g. ``prompts.txt:4``). ``normalize`` is original | abs | none. ``block`` (an index
        into XTI_LAYERS) encodes XTI names with that block's vectors; None (or 0) uses the first block's.
        """
        k = self.max_multiples if max_multiples is None else max_multiples
        mode = self.normalize if normalize is None else normalize
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"max_embeddings_multiples must be an integer >= 1, got {k!r}")
        if mode not in NORMALIZE_MODES:
            raise ConfigError(f"emb_normalize_mode must be one of {', '.join(NORMALIZE_MODES)}, got {mode!r}")
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        origins = origins or ["prompt"] * len(prompts)
        pos = [self.tokenize(p, k, o) for p, o in zip(prompts, origins, strict=True)]
        neg = [] if negatives is None else [
            self.tokenize(p, k, o, "negative prompt") for p, o in zip(negatives, origins, strict=True)]
        own = _group_chunks(pos, neg, list(groups) if groups is not None else list(range(len(prompts))))
        settings = (clip_skip, k, mode)
        cond, pooled = self._embed_padded(prompts, pos, own, settings, block)
        uncond, pooled_uncond = (self._embed_padded(negatives, neg, own, settings, block) if negatives is not None
                                 else (None, None))
        return EncodedBatch(cond, uncond, tuple(own), pooled, pooled_uncond)

    def _embed_padded(self, texts: list[str], tokens: list[PromptTokens], own: list[int], settings: tuple,
                      block: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 77·n, D) and SDXL's (B, P) pooled (else None): each text at its own chunk count, then padded to
        n = max(own) with empty chunks."""
        rows: list = [None] * len(texts)
        for count in sorted(set(own)):
            index = [j for j, c in enumerate(own) if c == count]
            embedded = self._embed([texts[j] for j in index], [tokens[j] for j in index], (*settings, count), block)
            for j, row in zip(index, embedded, strict=True):
                rows[j] = row
        n = max(own)
        if n > min(own):  # shorter rows: the empty prompt's chunk after their own (masked in the UNet)
            empty = self._embed([""], [self.tokenize("", settings[1])], (*settings, 1))[0][0]
            rows = [(torch.cat([row, empty.repeat(n - c, 1)]), pooled) if c < n else (row, pooled)
                    for (row, pooled), c in zip(rows, own, strict=True)]
        pooled = torch.stack([p for _, p in rows]) if self.text_encoder_2 is not None else None
        return torch.stack([row for row, _ in rows]), pooled

    def tokenize(self, text: str, k: int, origin: str = "prompt", what: str = "prompt") -> PromptTokens:
        """Weighted token chunks of ``text``, at most k chunks (cached; a truncation warns when computed)."""
        key = (text, k, self._ti_key)
        hit = self._token_cache.get(key)
        if hit is None:
            hit = self._chunk(text, k, origin, what)
        _remember(self._token_cache, key, hit, self._cache_size)
        return hit

    def _chunk(self, text: str, k: int, origin: str, what: str) -> PromptTokens:
        """Tokenize each weighted run, cut into chunks of 75 (BREAK ends one early), keep the first k."""
        chunks: list[list[int]] = [[]]
        weights: list[list[float]] = [[]]
        for run in parse_weights(text):
            if is_break(run):  # pad the current chunk (even an empty one) and start a new one
                chunks.append([])
                weights.append([])
                continue
            for group in self._token_groups(run[0]):
                if len(chunks[-1]) + len(group) > CHUNK:  # an embedding's vectors stay in one chunk
                    chunks.append([])
                    weights.append([])
                chunks[-1].extend(group)
                weights[-1].extend([run[1]] * len(group))
        if len(chunks) > 1 and not chunks[-1]:
            chunks.pop()  # a trailing BREAK adds no empty chunk (as A1111)
            weights.pop()
        dropped = [t for chunk in chunks[k:] for t in chunk]
        if dropped:
            log.warning("%s: %s %r is longer than %d tokens and was truncated; dropped: %r "
                        "<max_embeddings_multiples=%d>", origin, what, _short(text), CHUNK * k,
                        _short(self._decode(dropped)), k)
        return PromptTokens(tuple(map(tuple, chunks[:k])), tuple(map(tuple, weights[:k])))

    def _tokens(self, text: str) -> list[int]:
        """Token ids of one weighted run, without BOS/EOS; embedding names give their vectors' ids."""
        return [t for group in self._token_groups(text) for t in group]

    def _token_groups(self, text: str) -> list[tuple[int, ...]]:
        """Token ids of one weighted run in groups that stay in one chunk: one BPE token, or one embedding."""
        groups: list[tuple[int, ...]] = []
        for j, piece in enumerate(split_names(text, self._ti_pattern)):
            ids = self._ti_ids.get(piece.lower()) if j % 2 else None  # odd pieces: names as typed
            if ids is not None:
                groups.append(ids)
            elif piece:
                groups.extend((t,) for t in self.tokenizer.encode(piece))
        return groups

    def _decode(self, ids: list[int]) -> str:
        """Text of token ids for messages; an embedding's ids read as its name."""
        parts: list[str] = []
        plain: list[int] = []
        for t in [*ids, None]:
            if t is not None and t not in self._ti_names:
                plain.append(t)
                continue
            if plain:
                parts.append(self.tokenizer.decode(plain))
                plain = []
            if t is not None and self._ti_names[t]:
                parts.append(self._ti_names[t])
        return " ".join(parts)

    def _embed(self, texts: list[str], tokens: list[PromptTokens], settings: tuple, block: int | None = None,
               ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(77·n, D) and SDXL's pooled (P,) (else None) of each text; one text-encoder call for all the chunks of
        the cache misses."""
        clip_skip, _, mode, n = settings
        keys = [(text, self._ti_key, self.network_key, self._xti_block(tok, block), *settings)
                for text, tok in zip(texts, tokens, strict=True)]
        found = {key: self._cache[key] for key in keys if key in self._cache}
        missing = {key: tok for key, tok in zip(keys, tokens, strict=True) if key not in found}
        if missing:
            rows = [row for key, tok in missing.items() for row in self._chunk_ids(tok, n, key[3])]
            hidden, pooled = self._hidden(torch.tensor(rows, device=self.text_encoder.device), clip_skip)
            self.encoded += len(missing)
            for j, (key, tok) in enumerate(missing.items()):
                emb = hidden[j * n : (j + 1) * n].reshape(n * hidden.shape[1], hidden.shape[2])
                found[key] = (self._weighted(emb, _chunk_weights(tok, n), mode),
                              None if pooled is None else pooled[j * n])
        for key, emb in found.items():
            _remember(self._cache, key, emb, self._cache_size)
        return [found[key] for key in keys]

    def _weighted(self, emb: torch.Tensor, weights: list[float], mode: str) -> torch.Tensor:
        """Token weights on emb; SDXL's two encoders' parts each renormalised on their own (as A1111)."""
        if self.text_encoder_2 is None:
            return apply_weights(emb, weights, mode)
        first = self.text_encoder.config.hidden_size
        return torch.cat([apply_weights(emb[:, :first], weights, mode),
                          apply_weights(emb[:, first:], weights, mode)], dim=1)

    def _chunk_ids(self, tok: PromptTokens, n: int, block: int | None = None) -> list[list[int]]:
        """n rows of 77 ids: BOS + chunk + EOS + pad each; chunks the prompt does not need are empty.

        With an XTI ``block``, XTI names get that block's ids.
        """
        chunks = [*tok.chunks, *[()] * (n - len(tok.chunks))]
        if block is not None:
            chunks = [[self._xti_maps[block].get(t, t) for t in chunk] for chunk in chunks]
        return [self.tokenizer.pad(list(chunk), CHUNK + 2) for chunk in chunks]

    def _xti_block(self, tok: PromptTokens, block: int | None) -> int | None:
        """``block`` when it changes the ids of ``tok`` (an XTI name in it, block > 0), else None (cache key)."""
        if not block or not self._xti_maps:
            return None
        return block if any(t in self._xti_maps[0] for chunk in tok.chunks for t in chunk) else None

    @torch.no_grad()
    def _hidden(self, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder output for (N, 77) ids, (N, 77, D), and SDXL's pooled (N, P) (None for SD1/SD2); the one
        place the encoders run."""
        if self.text_encoder_2 is not None:
            return self._sdxl_hidden(ids, clip_skip)
        return self._layer(self.text_encoder, ids, clip_skip), None

    def _sdxl_hidden(self, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both SDXL encoders' hidden states of one layer, un-normed and concatenated, and bigG's pooled.

        SDXL was trained on the penultimate layer: clip_skip 1 and 2 both take it (A1111 ignores clip_skip on SDXL
        by default), 3 and more skip further (diffusers' clip_skip=n is our n + 2).
        """
        eos = (ids == self.tokenizer.eos_id).int().argmax(dim=1, keepdim=True)  # the first EOS of each row
        ids_2 = torch.where(torch.arange(ids.shape[1], device=ids.device)[None, :] > eos, self.pad_id_2, ids)
        out_1 = self.text_encoder(ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        layer = max(clip_skip, 2)
        layers = len(out_1.hidden_states) - 1
        if layer > min(layers, len(out_2.hidden_states) - 1):
            raise ConfigError(f"model.clip_skip={clip_skip} but the text encoders have only {layers} layers")
        hidden = torch.cat([out_1.hidden_states[-layer], out_2.hidden_states[-layer]], dim=-1)
        # pooled at the first EOS, as OpenCLIP: transformers' legacy rule (the largest id) would pick an embedding's
        # token, whose ids come after the vocabulary
        at_eos = out_2.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), eos[:, 0]]
        return hidden, self.text_encoder_2.text_projection(at_eos)

    def _layer(self, encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        """One CLIP encoder's (N, 77, D) output at clip_skip, the final layer norm applied (SD1/SD2)."""
        out = encoder(ids, output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            return out.last_hidden_state  # (N, 77, D), final layer norm applied
        layers = len(out.hidden_states) - 1
        if clip_skip > layers:
            raise ConfigError(f"model.clip_skip={clip_skip} but the text encoder has only {layers} layers")
        hidden = out.hidden_states[-clip_skip]  # hidden_states[-1] is the last layer's output
        # transformers 5 flattened CLIPTextModel (no .text_model); older releases nest it
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


def _group_chunks(pos: list[PromptTokens], neg: list[PromptTokens], groups: list[int]) -> list[int]:
    """Each row's chunk count: the most any prompt or negative of its group needs."""
    need: dict[int, int] = {}
    for j, group in enumerate(groups):
        counts = [len(pos[j].chunks)] + ([len(neg[j].chunks)] if neg else [])
        need[group] = max(need.get(group, 1), *counts)
    return [need[group] for group in groups]


def apply_weights(emb: torch.Tensor, weights: list[float], mode: str) -> torch.Tensor:
    """Scale each token's embedding (rows of ``emb``, (T, D)) by its weight, then renormalise (§7.3).

    ``original``: rescale so the mean of the whole tensor is what it was before weighting; ``abs``: the same
    with the mean of absolute values; ``none``: only scale. Means are taken in fp32 and cast back, as the
    reference does. All weights 1.0 return ``emb`` itself, so unweighted prompts stay exact.
    """
    if all(w == 1.0 for w in weights):
        return emb
    scaled = emb * torch.tensor(weights, dtype=emb.dtype, device=emb.device)[:, None]
    if mode == "none":
        return scaled
    stat = torch.abs if mode == "abs" else (lambda x: x)
    before = stat(emb).float().mean().to(emb.dtype)
    after = stat(scaled).float().mean().to(emb.dtype)
    # A zero mean after weighting (all weights ~0) has no meaningful rescale; the reference would give inf.
    return scaled * torch.where(after != 0, before / after, torch.ones_like(after))


def _chunk_weights(tok: PromptTokens, n: int) -> list[float]:
    """77·n weights matching _chunk_ids: 1.0 for BOS, EOS, padding and unused chunks."""
    out: list[float] = []
    for j in range(n):
        w = list(tok.weights[j]) if j < len(tok.weights) else []
        out += [1.0, *w, *[1.0] * (CHUNK + 1 - len(w))]
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)

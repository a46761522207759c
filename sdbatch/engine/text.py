"""Text conditioning: prompts → CLIP token ids → text-encoder embeddings, cached per (prompt, clip_skip)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from sdbatch.errors import ConfigError

log = logging.getLogger(__name__)


class TextEncoder:
    """Encodes prompts with one tokenizer and text encoder; remembers recent encodings."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.encoded = 0  # prompts actually run through the text encoder (cache misses)

    def encode(self, prompts: list[str], clip_skip: int) -> torch.Tensor:
        """Embeddings for each prompt, (B, 77, D); clip_skip 1 = last layer, n = n-th layer from the end."""
        missing = list(dict.fromkeys(p for p in prompts if (p, clip_skip) not in self._cache))
        if missing:
            for prompt, emb in zip(missing, self._run(missing, clip_skip), strict=True):
                self._remember((prompt, clip_skip), emb)
        return torch.stack([self._cache[(p, clip_skip)] for p in prompts])

    @torch.no_grad()
    def _run(self, prompts: list[str], clip_skip: int) -> torch.Tensor:
        ids = [self._token_ids(p) for p in prompts]
        device = self.text_encoder.device
        out = self.text_encoder(torch.tensor(ids, device=device), output_hidden_states=clip_skip > 1)
        self.encoded += len(prompts)
        if clip_skip == 1:
            return out.last_hidden_state  # (B, 77, D), final layer norm applied
        layers = len(out.hidden_states) - 1
        if clip_skip > layers:
            raise ConfigError(f"model.clip_skip={clip_skip} but the text encoder has only {layers} layers")
        hidden = out.hidden_states[-clip_skip]  # hidden_states[-1] is the last layer's output
        # transformers 5 flattened CLIPTextModel (no .text_model); older releases nest it
        return getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(hidden)

    def _token_ids(self, prompt: str) -> list[int]:
        ids, truncated = self.tokenizer.encode_padded(prompt)
        if truncated:
            kept = self.tokenizer.decode(ids)
            log.warning("prompt longer than 75 tokens was truncated to: %r <prompt>", kept)
        return ids

    def _remember(self, key: tuple[str, int], emb: torch.Tensor) -> None:
        self._cache[key] = emb
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

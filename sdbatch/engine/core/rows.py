"""The row contract: who each row of a UNet call is, and the per-row data every wrapper and patch reads.

A UNet call's batch is not the batch of images: classifier-free guidance stacks the images once per CFG part
(negative, prompt, real unconditional), and regional prompts will stack them once per region. `Rows` says, for
each row of the call, which image it belongs to, which CFG part and which region, and carries the data that is
per image (LoRA multipliers, and later regional masks and ControlNet hints) or per call (XTI's tokens per block).
Wrappers that change the rows (CFG) change the `Rows` with them; patches read it with `per_row` and never
assume an order of rows.

The rows of the call in progress are published with `calling()` by the innermost model function; module patches
(forward hooks deep inside the UNet, which see only tensors) read them with `current()`.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

PROMPT, NEGATIVE, UNCOND = "prompt", "negative", "uncond"  # the CFG parts
# per-image data: the 77-token chunks of the image's text that are its own (the rest pads it to the batch's);
# per-call data: the padded text length, in tokens, of one encoding (XTI packs several after each other)
TEXT_CHUNKS, TEXT_TOKENS = "text_chunks", "text_tokens"
# per-call data: regional networks (Attention Couple with network.regional), an object whose
# factor(network, output, module_name, rows) scales a network's output in a UNet module to its region
REGIONAL_NETWORKS = "regional_networks"

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Rows:
    """Row r of a UNet call is image `image[r]`, CFG part `part[r]`, region `region[r]`."""

    image: tuple[int, ...]
    part: tuple[str, ...]
    region: tuple[int, ...]
    per_image: Mapping[str, torch.Tensor] = field(default_factory=lambda: _EMPTY)  # name → (images, ...) tensor
    per_call: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # name → one value for the whole call
    # per_row results: every patched module of a call asks for the same rows (hundreds of times per step)
    _gathered: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of_images(cls, count: int) -> Rows:
        """One row per image, all of the prompt part, no regions: a call without CFG."""
        return cls(tuple(range(count)), (PROMPT,) * count, (0,) * count)

    def __len__(self) -> int:
        return len(self.image)

    @property
    def images(self) -> int:
        return max(self.image) + 1 if self.image else 0

    def stacked(self, parts: Sequence[str]) -> Rows:
        """These rows once per CFG part, part-major (all rows of parts[0], then parts[1], ...), as torch.cat."""
        n = len(parts)
        return dataclasses.replace(self, image=self.image * n, region=self.region * n,
                                   part=tuple(p for p in parts for _ in self.image))

    def with_image_data(self, **data: torch.Tensor) -> Rows:
        """Add per-image data: each tensor's first dimension is the image."""
        return dataclasses.replace(self, per_image=MappingProxyType({**self.per_image, **data}))

    def with_call_data(self, **data: Any) -> Rows:
        """Add data that holds for the whole call."""
        return dataclasses.replace(self, per_call=MappingProxyType({**self.per_call, **data}))

    def per_row(self, name: str) -> torch.Tensor | None:
        """The per-image data `name` for every row of the call: (rows, *data dims); None when absent."""
        data = self.per_image.get(name)
        if data is None:
            return None
        if name not in self._gathered:
            self._gathered[name] = data.index_select(0, torch.tensor(self.image, device=data.device))
        return self._gathered[name]


def row_factor(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(rows,) values as a factor for `like` (rows, ...): on its device and dtype, broadcast over the rest."""
    if values.shape[0] != like.shape[0]:
        raise ValueError(f"a UNet call of {like.shape[0]} rows, but its row contract describes {values.shape[0]}")
    return values.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


_CURRENT: contextvars.ContextVar[Rows | None] = contextvars.ContextVar("sdbatch_rows", default=None)


@contextmanager
def calling(rows: Rows | None) -> Iterator[None]:
    """Publish `rows` as the rows of the UNet call made inside the block."""
    token = _CURRENT.set(rows)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Rows | None:
    """The rows of the UNet call in progress; None outside one (or for a call made without a row contract)."""
    return _CURRENT.get()

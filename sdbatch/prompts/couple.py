"""Attention Couple's prompt syntax: `A AND B :0.8 AND C` → its parts, each with an optional A1111-style weight.

A part's weight is a trailing ` :NUMBER` (A1111's composable-diffusion syntax); a colon inside the part, as in
`(red:1.2)`, is prompt weighting and stays in the text. Parts are split at the word AND in capitals between
spaces, as A1111 and the reference tool do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdbatch.errors import PromptError

SEPARATOR = " AND "
_WEIGHT = re.compile(r"^(.*?)\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Part:
    """One sub-prompt of an Attention Couple prompt and its weight."""

    text: str
    weight: float = 1.0


def split_parts(prompt: str, origin: str = "prompt") -> tuple[Part, ...]:
    """The prompt's parts; an empty part is an error naming `origin`. A prompt without AND is one part, kept
    exactly as written (a trailing ` :1.5` is only a part weight between ANDs)."""
    if SEPARATOR not in prompt:
        return (Part(prompt),)
    parts = []
    for i, raw in enumerate(prompt.split(SEPARATOR)):
        match = _WEIGHT.match(raw)
        text, weight = (match[1], float(match[2])) if match else (raw, 1.0)
        if not text.strip():
            raise PromptError(f"{origin}: part {i + 1} of the AND prompt is empty: {prompt!r}; write a sub-prompt "
                              "on both sides of every AND")
        if not math.isfinite(weight) or weight < 0:
            raise PromptError(f"{origin}: part {i + 1} has weight {match[2] if match else weight}; "
                              "give a number >= 0 after ' :'")
        parts.append(Part(text.strip(), weight))
    return tuple(parts)


def part_count(prompt: str) -> int:
    """How many parts the prompt has (1 without AND)."""
    return prompt.count(SEPARATOR) + 1

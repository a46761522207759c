"""Where Textual Inversion names occur in prompt text (no torch here: outputs use it for metadata too).

An embedding is written in a prompt as its name (the file name without extension). It matches:

- as a whole word: not preceded or followed by a letter, digit or ``_``; so ``myembed,`` and
  ``(myembed:1.2)`` match, ``myembeds`` and ``my_myembed`` do not;
- case-insensitively: ``EasyNegative`` also matches ``easynegative``. A1111 finds embeddings by comparing
  CLIP token ids, and the CLIP tokenizer lowercases the prompt first, so it behaves the same way;
- inside each weighted run of the attention syntax, so ``(myembed:1.2)``, ``[myembed]`` and negative
  prompts work; a name split by brackets (``my(embed)``) is two words and does not match.

When names overlap (``neg`` and ``neg-v2``), the longest one that matches wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from sdbatch.prompts.weighting import is_break, parse_weights


def name_pattern(names: Iterable[str]) -> re.Pattern[str] | None:
    """A regex with one group that matches any of ``names`` as a whole word, any case; None for no names."""
    alternatives = sorted({n for n in names if n}, key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, alternatives)) + r")(?!\w)", re.IGNORECASE)


def split_names(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """``text`` cut at the names: even items are plain text (maybe empty), odd items names as typed."""
    return [text] if pattern is None else pattern.split(text)


def used_names(texts: Iterable[str], names: Sequence[str]) -> list[str]:
    """The ``names`` (as given, in their order) that occur in any weighted run of any of ``texts``."""
    pattern = name_pattern(names)
    if pattern is None:
        return []
    found: set[str] = set()
    for text in texts:
        for run in parse_weights(text or ""):
            if not is_break(run):
                found.update(m.lower() for m in pattern.findall(run[0]))
    return [name for name in names if name.lower() in found]

"""Prompt attention syntax (A1111 style): text → runs of (text, weight) and BREAK chunk markers.

Syntax, as the reference's ``parse_prompt_attention``:

- ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` multiplies it by 1.3.
  Nesting multiplies (``((x))`` → 1.21). Round and square brackets are matched separately, so ranges may
  overlap (``(a [b)`` closes the round bracket).
- Brackets still open at the end of the text apply up to the end; a stray ``)`` or ``]`` is literal text.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; any other backslash is dropped
  (``a\\b`` → ``ab``).
- Adjacent runs of equal weight are merged. An empty prompt gives ``[("", 1.0)]``.

Deliberate differences from the reference (documented in gen_img_inventory.md §7.1):

- ``BREAK`` is a marker only as a whole word: uppercase, with whitespace, bracket syntax or the start/end of
  the text on both sides. ``BREAKFAST`` and ``a,BREAK`` stay text (the reference splits any occurrence).
  The marker is the run ``("BREAK", -1.0)`` (:data:`BREAK`); brackets never change its weight.
- A weight that is not a positive finite number is not a weight: ``(x:1.2.3)`` (a crash in the reference),
  ``(x:-1)`` and ``(x:0)`` read as the text ``x:1.2.3`` etc. inside a plain ``(...)``, the way the reference
  reads ``(x:abc)``. So every weight is > 0, except the BREAK marker's.
- ``(x: 1.2)`` (a space before the number) is text, as in the reference (newer A1111 accepts the space).
- Final weights are clamped to the positive float range, so thousands of nested brackets cannot give 0 or inf.
"""

from __future__ import annotations

import math
import re
import sys

BREAK = ("BREAK", -1.0)  # the marker run: "pad the current 75-token chunk and start a new one"
BREAK_WEIGHT = BREAK[1]
ROUND = 1.1
SQUARE = 1 / 1.1

# The reference's weight syntax: ":" directly followed by a number and ")" (no spaces).
_WEIGHT_RE = re.compile(r":([+-]?[.\d]+)\)")
_BREAK_RE = re.compile(r"(?<!\S)BREAK(?!\S)")
_ESCAPABLE = "()[]\\"


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Runs of (text, weight) of ``text``; ``("BREAK", -1.0)`` runs mark chunk breaks (see the module doc)."""
    parser = _Parser()
    i = 0
    while i < len(text):
        i = parser.step(text, i)
    return parser.finish()


def strip_weights(text: str) -> str:
    """``text`` without the weighting syntax (brackets, weights, escapes); BREAK markers stay as the word.

    Meant for dedup and metadata: ``a (red:1.2) cat`` → ``a red cat``. Literal brackets written with
    escapes come out unescaped, so the result is not meant to be parsed again.
    """
    runs = parse_weights(text)
    out = ""
    for run, weight in runs:
        if weight == BREAK_WEIGHT:
            out = f"{out.rstrip()} BREAK " if out.strip() else "BREAK "
        else:
            out += run
    return out.rstrip() if runs[-1][1] == BREAK_WEIGHT else out


def is_break(run: tuple[str, float]) -> bool:
    """Whether ``run`` is the BREAK marker."""
    return run[1] == BREAK_WEIGHT


class _Parser:
    """Scanner state: finished runs, the pending plain text, and the start run of each open bracket."""

    def __init__(self) -> None:
        self.runs: list[list] = []  # [text, weight]; weight None marks BREAK until finish()
        self.pending: list[str] = []  # plain characters not yet turned into a run
        self.open: dict[str, list[int]] = {"(": [], "[": []}

    def step(self, text: str, i: int) -> int:
        """Consume the syntax element at ``text[i]``; returns the index after it."""
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in _ESCAPABLE:
                self.pending.append(nxt)
                return i + 2
            return i + 1  # a lone backslash is dropped, as in the reference
        if c in "([":
            self._flush()
            self.open[c].append(len(self.runs))
            return i + 1
        if c == ":" and self.open["("]:
            match = _WEIGHT_RE.match(text, i)
            weight = _positive_number(match.group(1)) if match else None
            if match and weight is not None:
                self._close("(", weight)
                return match.end()
        if (c == ")" and self.open["("]) or (c == "]" and self.open["["]):
            self._close("(" if c == ")" else "[", ROUND if c == ")" else SQUARE)
            return i + 1
        self.pending.append(c)
        return i + 1

    def finish(self) -> list[tuple[str, float]]:
        """Close what is still open (round brackets first, outermost first, as the reference) and merge."""
        self._flush()
        for kind, factor in (("(", ROUND), ("[", SQUARE)):
            for start in self.open[kind]:
                self._multiply(start, factor)
        merged: list[tuple[str, float]] = []
        for run, weight in self.runs:
            if weight is None:
                merged.append(BREAK)
            elif merged and merged[-1][1] == weight:
                merged[-1] = (merged[-1][0] + run, weight)
            else:
                merged.append((run, weight))
        return [(run, _clamp(w) if w != BREAK_WEIGHT else w) for run, w in merged] or [("", 1.0)]

    def _close(self, kind: str, factor: float) -> None:
        self._flush()
        self._multiply(self.open[kind].pop(), factor)

    def _multiply(self, start: int, factor: float) -> None:
        for run in self.runs[start:]:
            if run[1] is not None:  # BREAK markers keep their weight
                run[1] *= factor

    def _flush(self) -> None:
        """Turn the pending text into runs, splitting it at BREAK words (their surrounding spaces go)."""
        text = "".join(self.pending)
        self.pending.clear()
        parts = _BREAK_RE.split(text)
        for j, part in enumerate(parts):
            if j > 0:
                self.runs.append(["BREAK", None])
                part = part.lstrip()
            if j < len(parts) - 1:
                part = part.rstrip()
            if part:
                self.runs.append([part, 1.0])


def _positive_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None  # "1.2.3", ".", "+": the reference crashes here; we read it as text
    return value if 0 < value < math.inf else None


def _clamp(weight: float) -> float:
    # A product of very many factors can underflow to 0 or overflow to inf; keep it finite and positive.
    return min(max(weight, sys.float_info.min), sys.float_info.max)

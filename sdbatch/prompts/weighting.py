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
  The marker is the run ``("BREAK", -1.0)`` (:data:`BREAK`); brackets never change its weight, and no text
  run equals it (``(BRE:-1)(AK:-1)`` stays two runs), so :func:`is_break` tells them apart.
- A weight is what the reference's pattern ``:([+-]?[.\\d]+)\\)`` reads, signed numbers and zero included:
  ``(x:0)`` weights ``x`` by 0 and ``(x:-0.5)`` by -0.5, as A1111 and kohya do. Only a match that is no number,
  ``(x:1.2.3)`` (a crash in the reference) or ``(x:.)``, reads as the text ``x:1.2.3`` inside a plain
  ``(...)``, the way the reference reads ``(x:abc)``.
- ``(x: 1.2)`` (a space before the number) is text, as in the reference (newer A1111 accepts the space).
- Final weights are clamped to the finite float range, so thousands of nested brackets cannot give inf, and a
  product of nonzero factors never becomes 0; only a ``:0`` factor gives 0.
- Parsing is linear in the text, however deeply brackets nest (the reference is quadratic); the floats are
  the reference's bit for bit up to a generous amount of nesting (see ``_weights``).
"""

from __future__ import annotations

import itertools
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
# One-by-one (reference-exact) multiplications allowed per run and bracket, plus a fixed allowance, before
# _weights switches to its linear log-space path
WORK_PER_CHAR = 64
WORK_FREE = 1 << 16


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
    for run in runs:
        if is_break(run):
            out = f"{out.rstrip()} BREAK " if out.strip() else "BREAK "
        else:
            out += run[0]
    return out.rstrip() if is_break(runs[-1]) else out


def is_break(run: tuple[str, float]) -> bool:
    """Whether ``run`` is the BREAK marker (a text run may have the weight -1 too: ``(x:-1)``)."""
    return run[1] == BREAK_WEIGHT and run[0] == BREAK[0]


class _Parser:
    """Scanner state: the runs so far, the pending plain text, the open brackets and the closed ones.

    A bracket closed (or still open at the end) multiplies every run from its opening up to the runs that
    exist at that moment. Instead of multiplying at once (quadratic in nested brackets), each such range is
    recorded as an event (start, end, factor) in the order the reference multiplies, and ``finish`` applies
    them in one pass (see ``_weights``).
    """

    def __init__(self) -> None:
        self.texts: list[str] = []  # run texts ("BREAK" for the marker)
        self.breaks: list[bool] = []  # whether run i is the BREAK marker
        self.pending: list[str] = []  # plain characters not yet turned into a run
        self.open: dict[str, list[int]] = {"(": [], "[": []}
        self.events: list[tuple[int, int, float]] = []  # (first run, end run, factor), in multiplication order

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
            self.open[c].append(len(self.texts))
            return i + 1
        if c == ":" and self.open["("]:
            match = _WEIGHT_RE.match(text, i)
            weight = _number(match.group(1)) if match else None
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
        end = len(self.texts)
        for kind, factor in (("(", ROUND), ("[", SQUARE)):
            self.events.extend((start, end, factor) for start in self.open[kind])
        merged: list[tuple[list[str], float]] = []
        for text, is_break, weight in zip(self.texts, self.breaks, _weights(end, self.events), strict=True):
            if is_break:
                merged.append(([BREAK[0]], BREAK_WEIGHT))
            elif merged and merged[-1][1] == weight and not _is_marker(merged[-1]) and not (
                    weight == BREAK_WEIGHT and "".join(merged[-1][0]) + text == BREAK[0]):
                merged[-1][0].append(text)  # joined once below: merging stays linear
            else:
                merged.append(([text], weight))
        return [("".join(parts), weight) for parts, weight in merged] or [("", 1.0)]

    def _close(self, kind: str, factor: float) -> None:
        self._flush()
        self.events.append((self.open[kind].pop(), len(self.texts), factor))

    def _flush(self) -> None:
        """Turn the pending text into runs, splitting it at BREAK words (their surrounding spaces go)."""
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending.clear()
        parts = _BREAK_RE.split(text)
        for j, part in enumerate(parts):
            if j > 0:
                self.texts.append(BREAK[0])
                self.breaks.append(True)
                part = part.lstrip()
            if j < len(parts) - 1:
                part = part.rstrip()
            if part:
                self.texts.append(part)
                self.breaks.append(False)


def _is_marker(merged: tuple[list[str], float]) -> bool:
    return merged[1] == BREAK_WEIGHT and merged[0] == [BREAK[0]]


def _weights(count: int, events: list[tuple[int, int, float]]) -> list[float]:
    """The weight of each of ``count`` runs after the events (start, end, factor) multiplied runs[start:end].

    Exactly the reference's float results (each run's factors multiplied one by one, in event order) while
    that takes at most WORK_PER_CHAR multiplications per run and bracket (+ WORK_FREE); beyond it (only
    thousands of nested brackets get there) every run's product is summed in log space in one linear pass,
    equal to the one-by-one product within about 1e-12 relative. A product that would underflow to 0 or
    overflow to inf is clamped to the smallest or largest positive float (sign kept); a weight of 0 stays 0.
    """
    zeros = _covered(count, [(s, e) for s, e, f in events if f == 0])
    work = sum(e - s for s, e, _ in events)
    if work <= WORK_PER_CHAR * (count + len(events)) + WORK_FREE:
        weights = [1.0] * count
        for start, end, factor in events:
            weights[start:end] = [w * factor for w in weights[start:end]]
    else:
        weights = _log_weights(count, events)
    return [_clamp(w, zero) for w, zero in zip(weights, zeros, strict=True)]


def _covered(count: int, ranges: list[tuple[int, int]]) -> list[bool]:
    """Whether each of ``count`` positions lies in at least one [start, end) range (a difference array)."""
    delta = [0] * (count + 1)
    for start, end in ranges:
        delta[start] += 1
        delta[end] -= 1
    return [depth > 0 for depth in itertools.accumulate(delta[:count])]


def _log_weights(count: int, events: list[tuple[int, int, float]]) -> list[float]:
    """Products of the factors covering each run, as exp(sum of logs), with exact integer counts of the
    round and square factors and of the negative ones; zero factors are handled by the caller."""
    rounds, squares, negatives = [0] * (count + 1), [0] * (count + 1), [0] * (count + 1)
    logs = [0.0] * (count + 1)
    for start, end, factor in events:
        if factor == ROUND:
            counts = rounds
        elif factor == SQUARE:
            counts = squares
        else:
            if factor < 0:
                negatives[start] += 1
                negatives[end] -= 1
            if factor != 0:
                logs[start] += math.log(abs(factor))
                logs[end] -= math.log(abs(factor))
            continue
        counts[start] += 1
        counts[end] -= 1
    weights = []
    log_round, log_square = math.log(ROUND), math.log(SQUARE)
    acc = zip(*(itertools.accumulate(column[:count]) for column in (rounds, squares, negatives, logs)), strict=True)
    for n_round, n_square, n_negative, other in acc:
        total = n_round * log_round + n_square * log_square + other
        try:
            magnitude = math.exp(total)  # an underflow gives 0.0, which _clamp lifts to the smallest float
        except OverflowError:
            magnitude = math.inf  # _clamp makes it the largest float
        weights.append(-magnitude if n_negative % 2 else magnitude)
    return weights


def _number(text: str) -> float | None:
    """A weight as the reference reads it (signed, zero allowed); None when it is no number ("1.2.3")."""
    try:
        value = float(text)
    except ValueError:
        return None  # "1.2.3", ".", "+": the reference crashes here; we read it as text
    return math.copysign(min(abs(value), sys.float_info.max), value)  # 400 digits: the largest float


def _clamp(weight: float, zero: bool) -> float:
    """Keep a product of very many factors finite and, unless a factor was 0, away from 0 (sign kept)."""
    if zero:
        return weight if weight == 0 else 0.0  # 0 × a product that overflowed gives nan: it is still 0
    return math.copysign(min(max(abs(weight), sys.float_info.min), sys.float_info.max), weight)

"""Fuzzing the prompt parsers: whatever a prompt line holds, parsing it raises nothing but a one-line PromptError.

In the default run and bounded (a few hundred examples each, a few seconds in all); the alphabets are weighted
towards each parser's syntax so that hypothesis reaches its corners, not only plain text.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdbatch.errors import SdbatchError
from sdbatch.prompts.dynamic import MAX_VARIANTS, Wildcards, enumerate_variants, expand, has_dynamic
from sdbatch.prompts.syntax import parse_line
from sdbatch.prompts.weighting import BREAK, parse_weights, strip_weights

# ~1 s per test; the deadline only catches a parser gone quadratic or looping (an example takes milliseconds)
FUZZ = settings(max_examples=100, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])


def _text(pieces: list[str], max_size: int = 80) -> st.SearchStrategy[str]:
    """Random text, or text glued from the parser's syntax pieces."""
    glued = st.lists(st.sampled_from(pieces), max_size=max_size // 3).map("".join)
    return st.one_of(st.text(max_size=max_size), glued)


OPTION_PIECES = [" --", "--", " ", "w", "h", "s", "d", "l", "nl", "t", "am", "c", "f", "n", "dsd1", "dst1", "dsr",
                 "glt", "glr", "glus", "W", "512", "64", "-1", "0", "1.5", "1e309", "nan", "none", ",", ".", "..",
                 "/", "\x00", "é", "grid", "BREAK", "(a:1.2)", "{a|b}", "__x__"]
WEIGHT_PIECES = ["(", ")", "[", "]", ":", "\\", ".", "-", "+", "0", "1", "1.5", "9" * 30, " ", "a", "BREAK",
                 "BRE", "AK", ":-1)", ":0)", ":1.1)", "\n", "\x00"]
DYNAMIC_PIECES = ["{", "}", "|", "$$", "e$$", "2$$", "1-3$$", "-", "\\", "\\{", "\\|", " and ", "a", "b", " ",
                  "__", "__colors__", "__deep__", "__loop__", "__missing__", "__../x__", "_", "9" * 7]


def _only_prompt_errors(call, *args, **kwargs):
    """call(*args) returns, or raises a one-line SdbatchError; anything else fails the test."""
    try:
        return call(*args, **kwargs)
    except SdbatchError as ex:
        assert str(ex) and "\n" not in str(ex), repr(ex)
        return None


@FUZZ
@given(_text(OPTION_PIECES))
def test_parse_line_raises_only_prompt_errors(raw: str) -> None:
    parsed = _only_prompt_errors(parse_line, raw, "fuzz.txt:1")
    if parsed is not None:
        options = parsed.options
        assert options.width is None or (options.width > 0 and options.width % 8 == 0)
        assert options.steps is None or 1 <= options.steps <= 1000
        assert options.cfg_scale is None or math.isfinite(options.cfg_scale)
        assert options.file_name is None or ("/" not in options.file_name and options.file_name.endswith(".png"))


@FUZZ
@given(_text(WEIGHT_PIECES, max_size=120))
def test_parse_weights_never_raises_and_keeps_weights_finite(text: str) -> None:
    runs = parse_weights(text)
    assert runs and isinstance(strip_weights(text), str)
    for run, weight in runs:
        assert isinstance(run, str) and math.isfinite(weight)
        assert (run, weight) == BREAK or weight != BREAK[1] or run != BREAK[0]


@pytest.fixture(scope="module")
def wildcards(tmp_path_factory) -> Wildcards:
    folder = tmp_path_factory.mktemp("wildcards")
    (folder / "colors.txt").write_text("red\ngreen\n# a comment\n{light|dark} blue\n")
    (folder / "deep.txt").write_text("__colors__ {a|__colors__}\n")
    (folder / "loop.txt").write_text("x __loop__\n")
    return Wildcards(folder)


@FUZZ
@given(text=_text(DYNAMIC_PIECES), seed=st.integers(0, 2**32 - 1))
def test_dynamic_expansion_raises_only_prompt_errors(wildcards, text: str, seed: int) -> None:
    expanded = _only_prompt_errors(expand, text, seed, wildcards, origin="fuzz.txt:1")
    assert expanded is None or isinstance(expanded, str)
    variants = _only_prompt_errors(enumerate_variants, text, wildcards, origin="fuzz.txt:1")
    assert variants is None or 1 <= len(variants) <= MAX_VARIANTS
    assert isinstance(has_dynamic(text), bool)


@FUZZ
@given(text=_text(OPTION_PIECES + WEIGHT_PIECES + DYNAMIC_PIECES, max_size=100), seed=st.integers(0, 2**32 - 1))
def test_a_whole_line_parses_or_fails_in_one_line(wildcards, text: str, seed: int) -> None:
    """The planner's order: options, then enumeration and expansion, then weights of the expanded prompt."""
    parsed = _only_prompt_errors(parse_line, text, "fuzz.txt:1")
    if parsed is None:
        return
    for variant in _only_prompt_errors(enumerate_variants, parsed.prompt, wildcards) or []:
        prompt = _only_prompt_errors(expand, variant, seed, wildcards)
        if prompt is not None:
            assert parse_weights(prompt)

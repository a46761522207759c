"""Prompt attention syntax: A1111's documented examples, our deliberate differences, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdbatch.prompts.weighting import BREAK, parse_weights, strip_weights

R, S = 1.1, 1 / 1.1

CASES = [
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("a (very) [small] cat", [("a ", 1.0), ("very", R), (" ", 1.0), ("small", S), (" cat", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(a:1.5) b", [("a", 1.5), (" b", 1.0)]),
    ("(x:0.5)", [("x", 0.5)]),
    ("(x:.5)", [("x", 0.5)]),
    ("(x:+2)", [("x", 2.0)]),
    ("((nested))", [("nested", R * R)]),
    ("[[x]]", [("x", S * S)]),
    ("((a):2)", [("a", R * 2)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("[unbalanced", [("unbalanced", S)]),
    ("((unbalanced)", [("unbalanced", R * R)]),
    ("unbalanced)", [("unbalanced)", 1.0)]),
    ("a ] b", [("a ] b", 1.0)]),
    (r"\(literal\)", [("(literal)", 1.0)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a\b", [("ab", 1.0)]),
    (r"(\(x\))", [("(x)", R)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.55), (", sun, ", R),
      ("sky", R * R * R * R), (".", R)]),
    ("(a [b:1.5)", [("a ", 1.5), ("b", 1.5 * S)]),  # round and square brackets are matched separately
    # Not a number: the brackets still count, the ":..." is text (the reference crashes on 1.2.3)
    ("(x:1.2.3)", [("x:1.2.3", R)]),
    ("(x:abc)", [("x:abc", R)]),
    ("(y: 1.2)", [("y: 1.2", R)]),
    ("(x:-1)", [("x", -1.0)]),  # signed numbers and zero are weights, as in A1111 and kohya
    ("(x:0)", [("x", 0.0)]),
    ("(x:.)", [("x:.", R)]),
    ("(x:1.5", [("x:1.5", R)]),
    (":1.2) a", [(":1.2) a", 1.0)]),
    # BREAK: a whole uppercase word between spaces, syntax or the ends; never inside a word
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("a BREAKFAST b", [("a BREAKFAST b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a,BREAK,b", [("a,BREAK,b", 1.0)]),
    ("BREAK", [BREAK]),
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("a  BREAK  BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
    ("(a)BREAK[b]", [("a", R), BREAK, ("b", S)]),
    ("a\nBREAK\tb", [("a", 1.0), BREAK, ("b", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_parse_weights_table(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [run for run, _ in got] == [run for run, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_reference_doctest_weights_are_bit_exact() -> None:
    """The reference's doctest prints these exact floats; the multiplication order matches it."""
    got = dict(parse_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006 and got["hill"] == 0.55


@pytest.mark.parametrize(("text", "expected"), [
    ("a (red:1.2) [small] cat", "a red small cat"),
    (r"\(literal\)", "(literal)"),
    ("a  BREAK  b", "a BREAK b"),
    ("BREAK a BREAK", "BREAK a BREAK"),
    ("(x:1.2.3)", "x:1.2.3"),
    ("", ""),
])
def test_strip_weights(text: str, expected: str) -> None:
    assert strip_weights(text) == expected


def test_deep_nesting_keeps_weights_positive_and_finite() -> None:
    assert 0 < parse_weights("[" * 10_000 + "x")[0][1] < 1e-300
    assert parse_weights("(" * 10_000 + "x")[0][1] < float("inf")


SYNTAX = st.text(alphabet=st.sampled_from(list("()[]:\\.,-+0123456789 abBREAK\n")), max_size=60)


@given(st.one_of(st.text(max_size=80), SYNTAX))
def test_never_raises_and_weights_are_positive(text: str) -> None:
    runs = parse_weights(text)
    assert runs
    for run, weight in runs:
        if (run, weight) == BREAK:
            continue
        assert abs(weight) < float("inf") and (weight > 0 or ":" in text)  # 0 and < 0 only from a (x:N) weight
    assert isinstance(strip_weights(text), str)


@given(st.text(max_size=80).filter(lambda t: not any(c in t for c in "()[]:\\") and "BREAK" not in t))
def test_plain_text_is_one_run_of_weight_one(text: str) -> None:
    assert parse_weights(text) == [(text, 1.0)]
    assert strip_weights(text) == text


@given(st.lists(st.sampled_from(["a", "(b)", "[c]", "(d:1.5)", " ", "BREAK", " BREAK "]), max_size=12))
def test_adjacent_runs_never_share_a_weight(parts: list[str]) -> None:
    runs = parse_weights("".join(parts))
    for (_, w1), (_, w2) in zip(runs, runs[1:], strict=False):
        assert w1 != w2 or w1 == BREAK[1]

"""Dynamic prompts: seeded `{a|b}` choices, counts and joiners, escapes, nesting, enumeration, wildcards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdbatch.errors import PromptError
from sdbatch.prompts.dynamic import MAX_VARIANTS, Wildcards, enumerate_variants, expand, has_dynamic

SEEDS = range(200)


def outcomes(text: str, wildcards: Wildcards | None = None) -> set[str]:
    return {expand(text, seed, wildcards) for seed in SEEDS}


# ---- plain groups ---------------------------------------------------------------------------------


def test_reference_example_structure():
    # reference: ('a {red|blue} flower', 3 images) -> each image one of the two, tied to its own seed
    assert outcomes("a {red|blue} flower") == {"a red flower", "a blue flower"}


def test_choice_is_tied_to_the_seed():
    text = "{a|b|c|d|e|f}, {1-3$$x|y|z|w}, {2$$ and $$p|q|r}"
    for seed in (0, 1, 2**32 - 1, 123456789):
        assert expand(text, seed) == expand(text, seed)
    assert len({expand(text, seed) for seed in SEEDS}) > 50


def test_every_alternative_comes_up_over_many_seeds():
    assert outcomes("{a|b|c}") == {"a", "b", "c"}


def test_fixed_count_picks_distinct_alternatives_joined_by_comma():
    for result in outcomes("{2$$a|b|c}"):
        parts = result.split(", ")
        assert len(parts) == 2 and len(set(parts)) == 2 and set(parts) <= {"a", "b", "c"}


def test_count_range_gives_every_count_in_range():
    counts = {len(r.split(", ")) for r in outcomes("{1-3$$a|b|c|d}")}
    assert counts == {1, 2, 3}


def test_reversed_range_is_swapped_and_range_is_clamped():
    assert {len(r.split(", ")) for r in outcomes("{3-1$$a|b|c|d}")} == {1, 2, 3}
    assert outcomes("{5$$a|b}") == {"a, b", "b, a"}  # clamped to the 2 alternatives
    assert outcomes("{0$$a|b}") == {""}
    assert {len(r.split(", ")) for r in outcomes("{0-9$$a|b}") if r} == {1, 2}
    assert "" in outcomes("{0-9$$a|b}")


def test_custom_joiner():
    for result in outcomes("{2$$ and $$a|b|c}"):
        assert re.fullmatch(r"[abc] and [abc]", result)
    assert outcomes("{2$$-$$a|b}") == {"a-b", "b-a"}


def test_empty_alternative_means_maybe_nothing():
    assert outcomes("a {big |}cat") == {"a big cat", "a cat"}


def test_escaped_braces_and_pipes_are_literal():
    assert expand(r"a \{b\} c", 0) == "a {b} c"
    assert outcomes(r"{x\|y|z}") == {"x|y", "z"}
    assert expand(r"\(masterpiece\) {a|a}", 0) == r"\(masterpiece\) a"  # A1111 escapes stay
    assert expand("a | b", 0) == "a | b"  # a pipe outside a group is text


def test_text_without_groups_is_unchanged():
    text = "masterpiece, (red:1.2) cube, [blue], a_b, __init, ___, x__"
    assert expand(text, 5) == text
    assert not has_dynamic(text)


def test_nesting_resolves_inner_groups():
    assert outcomes("{a|{b|c}}") == {"a", "b", "c"}
    assert outcomes("{x {1|2}|y}") == {"x 1", "x 2", "y"}
    # an inner joiner or an escaped pipe never splits the outer group
    assert outcomes("{{2$$, or $$p|q}|r}") == {"p, or q", "q, or p", "r"}
    assert outcomes(r"{{p\|q|s}|r}") == {"p|q", "s", "r"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{a|b", "unclosed '{' at column 1"),
        ("a}b", "unmatched '}' at column 2"),
        ("{}", "empty group"),
        ("{2$$}", "empty group"),
        ("{1-$$a|b}", "bad count '1-'"),
        ("{1-2-3$$a|b}", "bad count"),
        ("{" * 40 + "a" + "}" * 40, "nested more than"),
    ],
)
def test_malformed_groups(text, message):
    with pytest.raises(PromptError, match=re.escape(message)) as info:
        expand(text, 0, origin="prompts.txt:7")
    assert str(info.value).startswith("prompts.txt:7: ")


def test_has_dynamic():
    assert has_dynamic("{a|b}") and has_dynamic("__colors__") and has_dynamic(r"\{") and has_dynamic("a}")
    assert not has_dynamic("a | b, (c:1.2), snake_case")


# ---- enumeration ----------------------------------------------------------------------------------


def test_reference_enumeration_examples():
    assert enumerate_variants("{e$$2$$A|B|C} x") == ["A, B x", "A, C x", "B, C x"]
    assert enumerate_variants("{e$$red|blue} {e$$1girl|2girls}") == [
        "red 1girl", "red 2girls", "blue 1girl", "blue 2girls"]


def test_enumeration_ranges_joiners_and_case():
    assert enumerate_variants("{E$$1-2$$ & $$a|b}") == ["a", "b", "a & b"]
    assert enumerate_variants("{e$$0-1$$a|b}") == ["", "a", "b"]


def test_enumeration_leaves_plain_groups_and_escapes_for_expand():
    variants = enumerate_variants(r"\{x\} {e$$a|b} {c|d}")
    assert variants == [r"\{x\} a {c|d}", r"\{x\} b {c|d}"]
    assert enumerate_variants(r"no \{enumeration\} {c|d}") == [r"no \{enumeration\} {c|d}"]


def test_nested_enumeration_terminates():
    # the reference loops forever on this line
    assert enumerate_variants("{e$$A|{B|C}} x") == ["A x", "{B|C} x"]
    assert enumerate_variants("{A|{e$$B|C}} x") == ["{A|B} x", "{A|C} x"]
    assert enumerate_variants("{e$$A|{e$$B|C}}") == ["A", "B", "C"]
    assert enumerate_variants("{e$$2$$A|{e$$B|C}|D}") == ["A, B", "A, C", "A, D", "B, D", "C, D"]


def test_enumerated_variants_expand_as_written():
    for variant in enumerate_variants(r"{x\|y|{e$$B|C}} {e$$p|q}"):
        assert expand(variant, 3) in {"x|y p", "B p", "x|y q", "C q", "C p", "B q"}
    # a '$$' produced by enumeration stays text inside the outer group
    variants = enumerate_variants("{{e$$2$$a|b}$$c|d}")
    assert variants == ["{1-1$$, $$a, b$$c|d}"]
    assert outcomes(variants[0]) == {"a, b$$c", "d"}


def test_too_many_variants_is_an_error():
    line = " ".join(["{e$$a|b|c|d|e|f|g|h|i|j}"] * 5)  # 100,000 variants
    with pytest.raises(PromptError, match=f"more than {MAX_VARIANTS}"):
        enumerate_variants(line, origin="p.txt:2")
    assert len(enumerate_variants(" ".join(["{e$$a|b|c|d|e|f|g|h|i|j}"] * 4))) == MAX_VARIANTS


def test_huge_combination_count_fails_fast():
    line = "{e$$1-40$$" + "|".join(f"t{i}" for i in range(80)) + "}"
    with pytest.raises(PromptError, match="more than"):
        enumerate_variants(line)


# ---- wildcards ------------------------------------------------------------------------------------


@pytest.fixture
def wildcards(tmp_path: Path) -> Wildcards:
    (tmp_path / "colors").mkdir()
    (tmp_path / "animal.txt").write_text("\ufeffcat\n\n# a comment\n  dog  \nbird\n", encoding="utf-8")
    (tmp_path / "colors" / "warm.txt").write_text("red\norange\n", encoding="utf-8")
    (tmp_path / "pet.txt").write_text("{small|big} __animal__\n__colors/warm__ __animal__\n", encoding="utf-8")
    (tmp_path / "loop_a.txt").write_text("x __loop_b__\n", encoding="utf-8")
    (tmp_path / "loop_b.txt").write_text("y\n__loop_a__\n", encoding="utf-8")
    (tmp_path / "self.txt").write_text("__self__ again\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    (tmp_path / "broken.txt").write_text("fine\n{oops\n", encoding="utf-8")
    return Wildcards(tmp_path)


def test_wildcard_options_skip_blanks_and_comments(wildcards):
    assert wildcards.options("animal") == ["cat", "dog", "bird"]
    assert wildcards.options("colors/warm") == ["red", "orange"]


def test_wildcard_picks_a_line_tied_to_the_seed(wildcards):
    assert outcomes("a __animal__", wildcards) == {"a cat", "a dog", "a bird"}
    assert expand("a __animal__", 42, wildcards) == expand("a __animal__", 42, Wildcards(wildcards.directory))


def test_wildcard_in_sub_folder_and_recursion(wildcards):
    assert outcomes("__colors/warm__", wildcards) == {"red", "orange"}
    results = outcomes("__pet__", wildcards)
    assert {"small cat", "big dog", "red bird", "orange cat"} <= results
    assert all(re.fullmatch(r"(small|big|red|orange) (cat|dog|bird)", r) for r in results)


def test_group_of_a_wildcard_draws_from_its_lines(wildcards):
    for result in outcomes("{2$$__animal__}", wildcards):
        parts = result.split(", ")
        assert len(set(parts)) == 2 and set(parts) <= {"cat", "dog", "bird"}


def test_enumerating_a_wildcard(wildcards):
    assert enumerate_variants("a {e$$__animal__}", wildcards) == ["a cat", "a dog", "a bird"]
    assert enumerate_variants("{e$$2$$__colors/warm__}", wildcards) == ["red, orange"]
    assert enumerate_variants("{e$$__animal__} __animal__", wildcards)[0] == "cat __animal__"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__loop_a__", "wildcard cycle __loop_a__ -> __loop_b__ -> __loop_a__"),
        ("__self__", "wildcard cycle __self__ -> __self__"),
        ("__missing__", "wildcard __missing__: no file missing.txt in the wildcards directory"),
        ("__animl__", "did you mean __animal__?"),
        ("__empty__", "has no lines"),
        ("__broken__", "wildcard __broken__ (broken.txt:2): unclosed '{'"),
        ("__colors/../animal__", "without '.', '..'"),
        ("{a|__missing__}", "__missing__"),  # checked even when the seed would not pick it
    ],
)
def test_wildcard_errors(wildcards, text, message):
    with pytest.raises(PromptError, match=re.escape(message)) as info:
        expand(text, 0, wildcards, origin="prompts.txt:9")
    assert str(info.value).startswith("prompts.txt:9: ")
    assert len(str(info.value).splitlines()) == 1


def test_missing_directory_errors_name_the_wildcard_and_directory(tmp_path):
    with pytest.raises(PromptError, match=r"__colors__ is used but no wildcards directory is set"):
        expand("__colors__", 0)
    with pytest.raises(PromptError, match=re.escape(f"__colors__: the wildcards directory {tmp_path / 'nope'}")):
        expand("__colors__", 0, Wildcards(tmp_path / "nope"))
    with pytest.raises(PromptError, match="__colors__"):
        Wildcards(None).options("colors")


def test_deep_wildcard_chain_is_an_error(tmp_path):
    for i in range(40):
        (tmp_path / f"w{i}.txt").write_text(f"{{a|__w{i + 1}__}}\n", encoding="utf-8")
    (tmp_path / "w40.txt").write_text("end\n", encoding="utf-8")
    with pytest.raises(PromptError, match="nested more than"):
        expand("__w0__", 0, Wildcards(tmp_path))
    assert expand("__w35__", 0, Wildcards(tmp_path)) in {"a", "end"}


# ---- robustness -----------------------------------------------------------------------------------

PIECES = st.sampled_from(["{", "}", "|", "$$", "e$$", "2$$", "1-3$$", "\\", "\\{", "__", "__x__", "a", " ", "-", "9"])


@given(st.text(), st.integers(min_value=0, max_value=2**32 - 1))
def test_expand_raises_only_prompt_error(text, seed):
    try:
        expand(text, seed)
    except PromptError as ex:
        assert len(str(ex).splitlines()) == 1


@given(st.lists(PIECES | st.text(max_size=3), max_size=30).map("".join), st.integers(min_value=0))
def test_syntax_soup_raises_only_prompt_error(text, seed):
    for call in (lambda: expand(text, seed), lambda: enumerate_variants(text)):
        try:
            call()
        except PromptError:
            pass


@given(st.lists(st.sampled_from(["{e$$", "{", "}", "|", "a", "b", "2$$", "\\{", "$$"]), max_size=20).map("".join))
def test_enumerated_variants_are_valid_input_for_expand(text):
    try:
        variants = enumerate_variants(text)
    except PromptError:
        return
    for variant in variants[:50]:
        expand(variant, 0)

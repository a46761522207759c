"""Prompt-line parsing: every option to its field, every malformed form to a one-line PromptError."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdbatch.config.deep_shrink_schema import DeepShrink
from sdbatch.config.gradual_latent_schema import GradualLatent
from sdbatch.config.sdxl_schema import SdxlLine
from sdbatch.errors import PromptError
from sdbatch.prompts.syntax import OFF, LineOptions, ParsedLine, parse_line

ORIGIN = "prompts.txt:4"

# (option as written, LineOptions field, expected value)
GOOD = [
    ("--n realistic, (lowres:1.1), bad hands", "negative", "realistic, (lowres:1.1), bad hands"),
    ("--w 960", "width", 960),
    ("--h 640", "height", 640),
    ("--s 28", "steps", 28),
    ("--s 1000", "steps", 1000),
    ("--d 1", "seeds", (1,)),
    ("--d 1,2,3", "seeds", (1, 2, 3)),
    ("--d 0, 4294967295", "seeds", (0, 2**32 - 1)),
    ("--l 7.5", "cfg_scale", 7.5),
    ("--l 5", "cfg_scale", 5.0),
    ("--nl 3.5", "negative_scale", 3.5),
    ("--nl none", "negative_scale", OFF),
    ("--nl None", "negative_scale", OFF),
    ("--t 0.6", "strength", 0.6),
    ("--t 1", "strength", 1.0),
    ("--am 0.8", "network_muls", (0.8,)),
    ("--am 0.8,-0.5,1", "network_muls", (0.8, -0.5, 1.0)),
    ("--c a photo of a cat", "clip_prompt", "a photo of a cat"),
    ("--f portrait", "file_name", "portrait.png"),
    ("--f my cat.png", "file_name", "my cat.png"),
    ("--f v1.5_test.PNG", "file_name", "v1.5_test.PNG"),
    ("--dsd1 3", "deep_shrink", DeepShrink(depth_1=3)),
    ("--ow 1024", "sdxl", SdxlLine(original_width=1024)),
    ("--oh 768", "sdxl", SdxlLine(original_height=768)),
    ("--nw 512", "sdxl", SdxlLine(negative_original_width=512)),
    ("--nh 256", "sdxl", SdxlLine(negative_original_height=256)),
    ("--ct 0", "sdxl", SdxlLine(crop_top=0)),
    ("--cl 32", "sdxl", SdxlLine(crop_left=32)),
    ("--dsd1 0", "deep_shrink", DeepShrink(depth_1=0)),
    ("--dst1 700", "deep_shrink", DeepShrink(timesteps_1=700)),
    ("--dsd2 1", "deep_shrink", DeepShrink(depth_2=1)),
    ("--dst2 300", "deep_shrink", DeepShrink(timesteps_2=300)),
    ("--dsr 0.5", "deep_shrink", DeepShrink(ratio=0.5)),
    ("--glt 750", "gradual_latent", GradualLatent(timesteps=750)),
    ("--glr 0.5", "gradual_latent", GradualLatent(ratio=0.5)),
    ("--gle 3", "gradual_latent", GradualLatent(every_n_steps=3)),
    ("--gls 0.125", "gradual_latent", GradualLatent(ratio_step=0.125)),
    ("--glsn 1", "gradual_latent", GradualLatent(s_noise=1.0)),
    ("--glus 3,0.5,0.5,1", "gradual_latent", GradualLatent(unsharp=(3.0, 0.5, 0.5, 1.0))),
    ("--glus 3,1.0,1.0", "gradual_latent", GradualLatent(unsharp=(3.0, 1.0, 1.0))),
]

# (option as written, token the message must name, text the message must contain)
BAD = [
    ("--w abc", "--w", "expects a positive multiple of 8, got 'abc'"),
    ("--w 500", "--w", "(nearest: 504)"),
    ("--w 0", "--w", "(nearest: 8)"),
    ("--w -8", "--w", "positive multiple of 8"),
    ("--h 512.0", "--h", "positive multiple of 8"),
    ("--s 0", "--s", "an integer from 1 to 1000"),
    ("--s 1001", "--s", "an integer from 1 to 1000"),
    ("--s 30.5", "--s", "got '30.5'"),
    ("--d 1,", "--d", "bad item ''"),
    ("--d ,1", "--d", "bad item ''"),
    ("--d 1,,2", "--d", "bad item ''"),
    ("--d -1", "--d", "from 0 to 4294967295"),
    ("--d 4294967296", "--d", "bad item '4294967296'"),
    ("--d 1.5", "--d", "seeds"),
    ("--d abc", "--d", "seeds"),
    ("--l 1.2.3", "--l", "expects a number"),
    ("--l nan", "--l", "expects a number"),
    ("--l inf", "--l", "expects a number"),
    ("--l 1e999", "--l", "expects a number"),
    ("--nl x", "--nl", "a number or 'none'"),
    ("--t 0", "--t", "(0, 1]"),
    ("--t 1.5", "--t", "(0, 1]"),
    ("--t -0.5", "--t", "(0, 1]"),
    ("--am 1,,2", "--am", "bad item ''"),
    ("--am x", "--am", "comma-separated numbers"),
    ("--f a/b.png", "--f", "plain file name"),
    ("--f ..\\x", "--f", "plain file name"),
    ("--f a..b", "--f", "plain file name"),
    ("--f a.jpg", "--f", "try 'a.png'"),
    ("--f .png", "--f", "plain file name"),
    ("--dsd1 4", "--dsd1", "from 0 to 3"),
    ("--dsd2 1.5", "--dsd2", "from 0 to 3"),
    ("--dst1 -1", "--dst1", "timestep"),
    ("--dst2 1001", "--dst2", "timestep"),
    ("--dsr 0", "--dsr", "(0, 1]"),
    ("--glt 0", "--glt", "timestep"),
    ("--glr 1.5", "--glr", "(0, 1]"),
    ("--gle 0", "--gle", "positive integer"),
    ("--gls 0", "--gls", "positive number"),
    ("--glsn -1", "--glsn", ">= 0"),
    ("--glus 1,2", "--glus", "(2 items)"),
    ("--glus a,b,c", "--glus", "bad item 'a'"),
    ("--w", "--w", "needs a value"),
    ("--n", "--n", "needs a value"),
    ("--d ", "--d", "needs a value"),
    ("--zzz 3", "--zzz", "unknown prompt option"),
    ("--w512", "--w512", "--w 512"),
    ("--wx 5", "--wx", "did you mean --w?"),
    ("--ow 0", "--ow", "a positive integer"),
    ("--nh x", "--nh", "a positive integer"),
    ("--ct -1", "--ct", "an integer >= 0"),
    ("-- w 512", "' --'", "without an option name"),
]


def fields_set(options: LineOptions) -> dict[str, object]:
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return {name: value for name, value in values.items() if value is not None}


@pytest.mark.parametrize(("option", "field", "expected"), GOOD, ids=[g[0] for g in GOOD])
def test_each_option_sets_its_field_only(option, field, expected):
    parsed = parse_line(f"a cat, best quality {option}", ORIGIN)
    assert parsed.prompt == "a cat, best quality"
    assert fields_set(parsed.options) == {field: expected}


@pytest.mark.parametrize(("option", "token", "message"), BAD, ids=[b[0] for b in BAD])
def test_each_malformed_option_names_origin_token_and_fix(option, token, message):
    with pytest.raises(PromptError) as info:
        parse_line(f"a cat {option} --s 20", ORIGIN)
    text = str(info.value)
    assert text.startswith(f"{ORIGIN}: ")
    assert token in text
    assert message in text
    assert len(text.splitlines()) == 1


def test_no_options_gives_all_none():
    parsed = parse_line("  a lighthouse at dusk  ", "prompt")
    assert parsed == ParsedLine("a lighthouse at dusk", LineOptions(), "  a lighthouse at dusk  ", "prompt")


def test_option_names_are_case_insensitive():
    upper = parse_line("x --W 768 --H 512 --S 20 --D 5 --NL NONE --DSD1 2 --GLT 700", ORIGIN).options
    lower = parse_line("x --w 768 --h 512 --s 20 --d 5 --nl none --dsd1 2 --glt 700", ORIGIN).options
    assert upper == lower
    assert upper.width == 768 and upper.negative_scale is OFF


def test_negative_keeps_spaces_commas_and_weights_and_order_is_free():
    a = parse_line("1girl --n lowres, (bad hands:1.2), text --w 960 --d 1,2", ORIGIN).options
    b = parse_line("1girl --d 1,2 --w 960 --n lowres, (bad hands:1.2), text", ORIGIN).options
    assert a == b
    assert a.negative == "lowres, (bad hands:1.2), text"
    assert a.seeds == (1, 2)


def test_reference_readme_example():
    line = ("(masterpiece, best quality), 1girl, [from below], kind smile, [goodembed] --n realistic, real life, "
            "(negprompt), (lowres:1.1), bad anatomy, signature, watermark, username, blurry "
            "--w 960 --h 640 --s 28 --d 1")
    parsed = parse_line(line, ORIGIN)
    assert parsed.prompt == "(masterpiece, best quality), 1girl, [from below], kind smile, [goodembed]"
    assert parsed.options.negative.endswith("username, blurry")
    options = parsed.options
    assert (options.width, options.height, options.steps, options.seeds) == (960, 640, 28, (1,))


def test_groups_collect_their_options():
    options = parse_line("x --dst1 900 --dsr 0.6 --glr 0.25 --gle 2 --glus 3,0.5,0.5", ORIGIN).options
    assert options.deep_shrink == DeepShrink(depth_1=None, timesteps_1=900, ratio=0.6)
    assert options.gradual_latent == GradualLatent(ratio=0.25, every_n_steps=2, unsharp=(3.0, 0.5, 0.5))


def test_only_space_dash_dash_splits():
    parsed = parse_line("a--b c-- d-- --w 64", ORIGIN)
    assert parsed.prompt == "a--b c-- d--"
    assert parsed.options.width == 64


def test_triple_dash_is_an_unknown_option():
    with pytest.raises(PromptError, match=r"unknown prompt option ---e"):
        parse_line("a ---e", ORIGIN)


def test_line_of_only_options_has_empty_prompt():
    parsed = parse_line("--w 512 --n ugly", ORIGIN)
    assert parsed.prompt == ""
    assert parsed.options == LineOptions(negative="ugly", width=512)


@pytest.mark.parametrize("line", ["x --w 512 --w 768", "x --W 512 --w 768", "x --n a --s 3 --N b", "x --d 1 --d 2"])
def test_an_option_given_twice_is_an_error(line):
    with pytest.raises(PromptError, match=rf"^{ORIGIN}: --\w+ is given twice .*keep one$"):
        parse_line(line, ORIGIN)


def test_line_options_are_frozen():
    options = parse_line("x --w 512", ORIGIN).options
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.width = 8  # type: ignore[misc]


def test_long_bad_value_is_shortened_in_the_message():
    with pytest.raises(PromptError) as info:
        parse_line("x --w " + "9" * 500, ORIGIN)
    assert len(str(info.value)) < 200


OPTION_WORDS = ["n", "w", "h", "s", "d", "l", "nl", "t", "am", "c", "f", "dsd1", "dst1", "dsr", "glt", "glus", "ow",
                "q", "", "W", "Nl"]
VALUES = ["512", "0", "-1", "1,2", "1,", "none", "0.5", "a b", "", "1e5", "x.png", "a/b", "\n", "\x00", "٣"]


@given(st.text())
def test_arbitrary_text_parses_or_raises_prompt_error(raw):
    try:
        parsed = parse_line(raw, ORIGIN)
    except PromptError as ex:
        assert len(str(ex).splitlines()) == 1
    else:
        assert isinstance(parsed.options, LineOptions)


@given(st.text(max_size=20), st.lists(st.tuples(st.sampled_from(OPTION_WORDS), st.sampled_from(VALUES) | st.text())))
def test_option_like_lines_parse_or_raise_prompt_error(prompt, options):
    raw = prompt + "".join(f" --{name} {value}" for name, value in options)
    try:
        parse_line(raw, ORIGIN)
    except PromptError as ex:
        assert str(ex).startswith(ORIGIN)
        assert len(str(ex).splitlines()) == 1

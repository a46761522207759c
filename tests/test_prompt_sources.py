"""Prompt modules (prompt_module=FILE.py) and interactive input: loading, items, origins, errors, terminals."""

from __future__ import annotations

import io
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdbatch.errors import ConfigError, PromptError, SdbatchError
from sdbatch.prompts import interactive
from sdbatch.prompts.interactive import preview_available, read_lines, report_saved, show_preview
from sdbatch.prompts.module import load_prompter
from sdbatch.prompts.sources import PromptLine

SPEC = SimpleNamespace(width=64, negative_prompt="lowres")
ENGINE = SimpleNamespace(bundle=SimpleNamespace(tokenizer="the tokenizer"))


def _module(tmp_path: Path, body: str, name: str = "prompts.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def _error(path: Path, kind: type[SdbatchError] = PromptError, spec=SPEC) -> str:
    """Load the module expecting `kind`; return the message after checking it is one line naming the file."""
    before = list(sys.path)
    with pytest.raises(kind) as info:
        list(load_prompter(path, spec, ENGINE))
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    assert sys.path == before
    return message


# --- prompt modules -------------------------------------------------------------------------------------------

def test_module_yields_str_and_dict_items(tmp_path):
    path = _module(tmp_path, """
        def get_prompter(spec, engine):
            yield f"a cat --w {spec.width}"
            yield "   "
            yield {"prompt": "a dog", "negative_prompt": "blurry"}
            yield {"prompt": " a fox "}
            yield engine.bundle.tokenizer
    """)
    lines = list(load_prompter(path, SPEC, ENGINE))
    assert lines == [
        PromptLine("a cat --w 64", "lowres", "prompts.py:#1"),
        PromptLine("a dog", "blurry", "prompts.py:#3"),
        PromptLine("a fox", "lowres", "prompts.py:#4"),
        PromptLine("the tokenizer", "lowres", "prompts.py:#5"),
    ]


def test_module_returning_a_list_and_explicit_negative(tmp_path):
    path = _module(tmp_path, """
        def get_prompter(spec, engine):
            return ["one", {"prompt": "two", "negative_prompt": None}]
    """)
    lines = list(load_prompter(str(path), SimpleNamespace(), None, negative="bad"))
    assert [(line.text, line.negative, line.origin) for line in lines] == [
        ("one", "bad", "prompts.py:#1"), ("two", "bad", "prompts.py:#2")]


def test_spec_without_negative_prompt_defaults_to_empty(tmp_path):
    path = _module(tmp_path, "def get_prompter(spec, engine):\n    return ['x']\n")
    assert list(load_prompter(path, SimpleNamespace(width=64), None))[0].negative == ""


def test_spec_and_engine_are_passed_through_untouched(tmp_path):
    path = _module(tmp_path, """
        def get_prompter(spec, engine):
            spec.calls.append((spec, engine))
            return ["x"]
    """)
    spec, engine = SimpleNamespace(calls=[]), object()
    assert [line.text for line in load_prompter(path, spec, engine)] == ["x"]
    assert spec.calls == [(spec, engine)]


def test_each_load_is_a_fresh_module(tmp_path):
    path = _module(tmp_path, """
        calls = 0
        def get_prompter(spec, engine):
            global calls
            calls += 1
            return [f"call {calls}"]
    """)
    assert [line.text for line in load_prompter(path, SPEC, ENGINE)] == ["call 1"]
    assert [line.text for line in load_prompter(path, SPEC, ENGINE)] == ["call 1"]


def test_module_folder_importable_only_while_loading(tmp_path):
    (tmp_path / "sdbatch_test_helper_words.py").write_text("WORDS = ['red', 'blue']\n", encoding="utf-8")
    path = _module(tmp_path, """
        from dataclasses import dataclass

        from sdbatch_test_helper_words import WORDS

        @dataclass
        class Item:
            word: str

        def get_prompter(spec, engine):
            return [f"a {Item(word).word} ball" for word in WORDS]
    """)
    before = list(sys.path)
    try:
        assert [line.text for line in load_prompter(path, SPEC, ENGINE)] == ["a red ball", "a blue ball"]
    finally:
        sys.modules.pop("sdbatch_test_helper_words", None)
    assert sys.path == before
    assert str(tmp_path) not in sys.path


def test_loading_happens_before_iteration(tmp_path):
    path = _module(tmp_path, "def get_prompter(spec, engine):\n    raise ValueError('no')\n")
    with pytest.raises(PromptError):
        load_prompter(path, SPEC, ENGINE)  # not list(): the error comes from the call itself


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nowhere.py", ConfigError)
    assert "does not exist" in message


def test_folder_instead_of_file(tmp_path):
    folder = tmp_path / "prompts.py"
    folder.mkdir()
    assert "not a file" in _error(folder, ConfigError)


def test_syntax_error_names_the_line(tmp_path):
    path = _module(tmp_path, "def get_prompter(spec, engine):\n    return [\n\nx = (\n", name="broken.py")
    message = _error(path)
    assert "syntax error at line" in message


def test_syntax_error_line_number(tmp_path):
    path = _module(tmp_path, "x = 1\ny = 2\nz = = 3\n")
    assert "syntax error at line 3" in _error(path)


def test_error_while_loading(tmp_path):
    path = _module(tmp_path, "import sdbatch_no_such_module_xyz\n")
    message = _error(path)
    assert "failed while loading" in message and "ModuleNotFoundError" in message and "line 1" in message


def test_no_get_prompter(tmp_path):
    path = _module(tmp_path, "def get_prompts(spec, engine):\n    return ['x']\n")
    assert "no function get_prompter" in _error(path)


def test_gen_img_style_signature(tmp_path):
    """gen_img's get_prompter(args, pipe, networks) must return a prompter (tests/test_gen_img.py runs them)."""
    path = _module(tmp_path, "def get_prompter(args, pipe, networks):\n    return ['x']\n")
    spec = SimpleNamespace(**vars(SPEC), seed=1, iter_same_seed=False, images_per_prompt=1,
                           network=SimpleNamespace(loras=[]))
    message = _error(path, spec=spec)
    assert "get_prompter(args, pipe, networks) returned list" in message and "callable prompter" in message


def test_raising_get_prompter(tmp_path):
    path = _module(tmp_path, """
        def get_prompter(spec, engine):
            raise KeyError(f"width {spec.width}\\nsecond line")
    """)
    message = _error(path)
    assert "KeyError" in message and "width 64" in message and "second line" in message
    assert "prompt module's own code, line 3" in message


def test_raising_generator_names_the_item(tmp_path):
    path = _module(tmp_path, """
        def get_prompter(spec, engine):
            yield "fine"
            yield "also fine"
            raise ValueError("ran out of ideas")
    """)
    message = _error(path)
    assert "item #3" in message and "ValueError: ran out of ideas" in message and "line 5" in message


@pytest.mark.parametrize(("item", "expected"), [
    ("42", "item #2 is a int"),
    ("b'bytes'", "item #2 is a bytes"),
    ("None", "item #2 is a NoneType"),
    ("('a', 'b')", "item #2 is a tuple"),
    ("{'promt': 'typo'}", "item #2 has unknown key(s) promt"),
    ("{'negative_prompt': 'x'}", "item #2 needs a non-empty string 'prompt'"),
    ("{'prompt': ''}", "item #2 needs a non-empty string 'prompt'"),
    ("{'prompt': 'x', 'negative_prompt': 3}", "item #2 'negative_prompt' must be a string"),
])
def test_bad_item(tmp_path, item, expected):
    path = _module(tmp_path, f"def get_prompter(spec, engine):\n    return ['ok', {item}]\n")
    assert expected in _error(path)


@pytest.mark.parametrize(("value", "kind"), [("None", "NoneType"), ("'a cat'", "str"),
                                              ("{'prompt': 'x'}", "dict"), ("len", "builtin_function_or_method")])
def test_get_prompter_returns_no_iterable(tmp_path, value, kind):
    path = _module(tmp_path, f"def get_prompter(spec, engine):\n    return {value}\n")
    assert f"get_prompter returned {kind}" in _error(path)


def test_no_lines_at_all(tmp_path):
    path = _module(tmp_path, "def get_prompter(spec, engine):\n    return ['', '  ']\n")
    assert "yielded no prompt lines" in _error(path)


def test_keyboard_interrupt_is_not_wrapped(tmp_path):
    path = _module(tmp_path, "def get_prompter(spec, engine):\n    raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_prompter(path, SPEC, ENGINE)


# --- interactive input ----------------------------------------------------------------------------------------

def test_read_lines_from_a_pipe_shows_no_prompt():
    out = io.StringIO()
    stream = io.StringIO("a cat --w 64\n\n   \n# a comment\n  big dog  \n# last\nno newline at end")
    assert list(read_lines(stream, out=out)) == ["a cat --w 64", "big dog", "no newline at end"]
    assert out.getvalue() == ""


def test_read_lines_empty_input():
    assert list(read_lines(io.StringIO(""), out=io.StringIO())) == []


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_read_lines_from_a_terminal_until_ctrl_d():
    master, slave = os.openpty()
    try:
        with open(slave, encoding="utf-8") as stream:
            assert stream.isatty()
            os.write(master, b"a cat\n# comment\n\nbig dog --n ugly\n\x04")  # \x04 = Ctrl-D at a line start
            out = io.StringIO()
            assert list(read_lines(stream, prompt="sd> ", out=out)) == ["a cat", "big dog --n ugly"]
    finally:
        os.close(master)
    assert out.getvalue() == "sd> " * 5  # before each of the 4 lines and before the end of input


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_read_lines_ends_when_the_terminal_closes():
    master, slave = os.openpty()
    with open(slave, encoding="utf-8") as stream:
        os.write(master, b"first\n")
        out = io.StringIO()
        lines = read_lines(stream, out=out)
        assert next(lines) == "first"
        os.close(master)  # the terminal hangs up
        assert list(lines) == []
    assert out.getvalue() == "prompt> prompt> "


class _Interrupted(io.StringIO):
    """A terminal-like stream whose second read is interrupted by Ctrl-C."""

    def __init__(self, tty: bool) -> None:
        super().__init__("first\nsecond\n")
        self.reads, self.tty = 0, tty

    def isatty(self) -> bool:
        return self.tty

    def readline(self, size: int | None = -1) -> str:
        self.reads += 1
        if self.reads == 2:
            raise KeyboardInterrupt
        return super().readline(size)


@pytest.mark.parametrize("tty", [True, False])
def test_ctrl_c_ends_input_quietly(tty):
    out = io.StringIO()
    assert list(read_lines(_Interrupted(tty), out=out)) == ["first"]
    assert out.getvalue() == ("prompt> prompt> \n" if tty else "")


def test_default_out_is_stderr_at_call_time(monkeypatch):
    fake = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake)
    assert list(read_lines(_Interrupted(True))) == ["first"]
    assert fake.getvalue().startswith("prompt> ")


@pytest.mark.parametrize(("platform", "env", "no_preview", "expected"), [
    ("linux", {}, False, False),
    ("linux", {"DISPLAY": ":0"}, False, True),
    ("linux", {"WAYLAND_DISPLAY": "wayland-0"}, False, True),
    ("linux", {"DISPLAY": ""}, False, False),
    ("linux", {"DISPLAY": ":0"}, True, False),
    ("freebsd14", {"DISPLAY": ":0"}, False, True),
    ("freebsd14", {}, False, False),
    ("darwin", {}, False, True),
    ("darwin", {}, True, False),
    ("win32", {}, False, True),
    ("win32", {}, True, False),
])
def test_preview_available(monkeypatch, platform, env, no_preview, expected):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(interactive.sys, "platform", platform)
    assert preview_available(no_preview) is expected


def _png(tmp_path: Path, name: str) -> Path:
    from PIL import Image

    path = tmp_path / name
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_show_preview_opens_each_image(tmp_path, monkeypatch):
    from PIL import ImageShow

    shown = []
    monkeypatch.setattr(ImageShow, "show", lambda image, title=None, **kw: shown.append((image.size, title)) or True)
    show_preview([_png(tmp_path, "a.png"), _png(tmp_path, "b.png")], "a cat")
    assert shown == [((8, 8), "a cat (1/2)"), ((8, 8), "a cat (2/2)")]
    show_preview([_png(tmp_path, "c.png")], "one")
    assert shown[-1] == ((8, 8), "one")


def test_show_preview_never_raises(tmp_path, monkeypatch, caplog):
    from PIL import ImageShow

    monkeypatch.setattr(ImageShow, "show", lambda image, title=None, **kw: False)
    with caplog.at_level("WARNING"):
        show_preview([_png(tmp_path, "a.png"), _png(tmp_path, "b.png")], "t")
        show_preview([tmp_path / "missing.png"], "t")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # one per call, not one per image
    assert "no image viewer" in warnings[0].getMessage() and "missing.png" in warnings[1].getMessage()
    show_preview([], "nothing")  # no images: nothing to do


def test_report_saved(tmp_path, monkeypatch):
    out = io.StringIO()
    report_saved([tmp_path / "00000-1.png", "run/00001-2.png"], out=out)
    assert out.getvalue() == f"{tmp_path / '00000-1.png'}\nrun/00001-2.png\n"
    fake = io.StringIO()
    monkeypatch.setattr(sys, "stdout", fake)
    report_saved([Path("x.png")])
    assert fake.getvalue() == "x.png\n"


class _HungUp(io.StringIO):
    def readline(self, size: int | None = -1) -> str:
        raise OSError(5, "Input/output error")


def test_terminal_hang_up_ends_input():
    assert list(read_lines(_HungUp(), out=io.StringIO())) == []

"""Values Hydra cannot read get a hint naming the key and a quoted form that works when pasted into bash."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from sdbatch.cli.quoting import bash_form, quoting_hint

ROOT = Path(__file__).resolve().parents[1]

# (override as bash hands it to Python, the value Hydra must end up with)
UNREADABLE = [
    ("prompt=masterpiece, (red:1.2) cube", "masterpiece, (red:1.2) cube"),
    ("prompt=a (red) castle", "a (red) castle"),
    ("prompt=a cat <lora:demo:0.5>", "a cat <lora:demo:0.5>"),
    ("negative_prompt=ugly, bad", "ugly, bad"),
    ("prompt=a cat's hat, red", "a cat's hat, red"),
    ('prompt=say "hi", [loud]', 'say "hi", [loud]'),
    ("prompt=[a red cube, (a blue ball:1.2)]", ["a red cube", "(a blue ball:1.2)"]),
    ("model.checkpoint=C:\\models\\a,b.safetensors", "C:\\models\\a,b.safetensors"),
]


def _suggestion(hint: str) -> str:
    """The last bash word of the hint (the quoted form), as bash would pass it on."""
    quoted = re.search(r"bash quotes: (.+)$", hint)[1]
    words = shlex.split(quoted)
    assert len(words) == 1, f"{quoted} must be one bash word"
    return words[0]


@pytest.mark.parametrize(("override", "value"), UNREADABLE)
def test_hint_names_the_key_and_its_quoted_form_reads_back(override: str, value: object) -> None:
    hint = quoting_hint(["model=tiny", override], multirun=False)
    key = override.partition("=")[0]
    assert hint is not None and f"; {key}:" in hint
    parsed = OverridesParser.create().parse_override(_suggestion(hint))
    assert parsed.key_or_group == key and not parsed.is_sweep_override()
    assert parsed.value() == value


def test_readable_values_and_meant_sweeps_get_no_hint() -> None:
    assert quoting_hint(["prompt=a cat", "seed=range(0,8)", "grid.x.values=[5,7,9]"], multirun=False) is None
    assert quoting_hint(["-m", "sampler.cfg_scale=5,7,9"], multirun=True) is None, "a multirun sweep is meant"
    assert quoting_hint(["sampler.cfg_scale=5,7,9"], multirun=False) is not None, "a single run cannot sweep"


def test_grid_axis_hint_offers_the_key_values_form() -> None:
    hint = quoting_hint(["grid.x=prompt_sr:<lora:s:0>,<lora:s:0.5>"], multirun=False)
    structured = re.search(r"give the axis as (\S+) (.+?) \(or quote it", hint)
    key, values = structured[1], shlex.split(structured[2])
    assert key == "grid.x.key=prompt_sr" and len(values) == 1
    assert OverridesParser.create().parse_override(values[0]).value() == ["<lora:s:0>", "<lora:s:0.5>"]


def test_bash_form_survives_bash() -> None:
    word = bash_form("prompt", "it's (red:1.2), $HOME `x` \\")
    echoed = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True, check=True).stdout
    assert OverridesParser.create().parse_override(echoed).value() == "it's (red:1.2), $HOME `x` \\"


def test_cli_prints_the_hint_in_one_line_with_status_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "model=tiny", "prompt=a (red) castle"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "quote it for Hydra inside bash quotes: 'prompt=\"a (red) castle\"'" in lines[0]
    assert not (tmp_path / "outputs").exists()

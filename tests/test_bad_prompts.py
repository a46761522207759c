"""Bad prompts, prompt modules, file names and files: each is one line naming the file:line or key (exit 2, no
traceback), or the documented result; malicious .ckpt files are refused by name and never run."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from test_run import SMALL, manifest, run_cli

from sdbatch.config.spec import GuidanceConfig, HighresConfig, ModelConfig, NetworkConfig, RunSpec, SamplerConfig
from sdbatch.errors import ModelError, PromptError
from sdbatch.plan.planner import MAX_NAME_BYTES, plan
from sdbatch.prompts import weighting
from sdbatch.prompts.dynamic import Wildcards, expand
from sdbatch.prompts.module import load_prompter
from sdbatch.prompts.sources import PromptLine, read_prompts
from sdbatch.prompts.weighting import BREAK, is_break, parse_weights, strip_weights


def _error_line(proc) -> str:
    """The run's one error line; asserts exit 2, exactly one 'sdbatch:' line and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sdbatch:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _run(args: list[str], cache: Path, tmp: Path, *, model: str = "model=tiny"):
    return run_cli([model, f"hydra.run.dir={tmp / 'run'}", *SMALL, *args], cache, tmp)


def _spec(**changes) -> RunSpec:
    base = RunSpec(model=ModelConfig(checkpoint="builtin:tiny"), sampler=SamplerConfig(name="ddim"),
                   network=NetworkConfig(), guidance=GuidanceConfig(), highres=HighresConfig(), prompt="x")
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------- prompt modules

MODULES = {
    "raises": ("def get_prompter(spec, engine):\n    yield 'a cat'\n    yield 'a dog'\n"
               "    raise ValueError('no more animals')\n",
               ["bad.py", "item #3", "2 yielded before", "ValueError: no more animals", "line 4"]),
    "exits": ("import sys\n\ndef get_prompter(spec, engine):\n    yield 'a cat'\n    sys.exit(3)\n",
              ["bad.py", "item #2", "sys.exit(3)", "line 5"]),
    "exits_loading": ("import sys\nsys.exit('bye')\n", ["bad.py failed while loading", "sys.exit('bye')", "line 2"]),
    "endless": ("import itertools\n\ndef get_prompter(spec, engine):\n"
                "    for i in itertools.count():\n        yield f'a cat {i}'\n",
                ["bad.py", "more than 50 items", "prompts.max_module_lines"]),
}


@pytest.mark.parametrize("case", list(MODULES))
def test_prompt_module_errors_are_one_line(case, cache_dir, tmp_path) -> None:
    source, needles = MODULES[case]
    (tmp_path / "bad.py").write_text(source)
    proc = _run([f"prompt_module={tmp_path / 'bad.py'}", "prompts.max_module_lines=50"], cache_dir, tmp_path)
    line = _error_line(proc)
    for needle in needles:
        assert needle in line, line


def test_keyboard_interrupt_in_a_prompt_module_is_the_users_ctrl_c(cache_dir, tmp_path) -> None:
    (tmp_path / "stop.py").write_text("def get_prompter(spec, engine):\n    yield 'a'\n    raise KeyboardInterrupt\n")
    proc = _run([f"prompt_module={tmp_path / 'stop.py'}"], cache_dir, tmp_path)
    assert proc.returncode == 130, proc.stderr  # as Ctrl-C: not turned into a prompt_module error (exit 2)
    assert "Traceback" not in proc.stderr and "stop.py" not in proc.stderr, proc.stderr
    assert "interrupted" in proc.stderr


def _module_lines(tmp_path: Path, source: str, max_lines: int = 100_000) -> list[PromptLine]:
    path = tmp_path / "mod.py"
    path.write_text(source)
    spec = SimpleNamespace(negative_prompt="", prompts=SimpleNamespace(max_module_lines=max_lines))
    return list(load_prompter(path, spec, None))


def test_module_keyboard_interrupt_propagates_unwrapped(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _module_lines(tmp_path, "def get_prompter(spec, engine):\n    yield 'a'\n    raise KeyboardInterrupt\n")
    before = set(sys.modules)
    with pytest.raises(KeyboardInterrupt):  # while loading, too; its module is not left in sys.modules
        _module_lines(tmp_path, "raise KeyboardInterrupt\n")
    assert set(sys.modules) == before


def test_module_cap_takes_exactly_max_lines_and_closes_the_generator(tmp_path) -> None:
    source = ("import itertools\nclosed = []\n\ndef get_prompter(spec, engine):\n    try:\n"
              "        for i in itertools.count():\n            yield f'line {i}'\n    finally:\n"
              "        closed.append(True)\n")
    assert len(_module_lines(tmp_path, source.replace("itertools.count()", "range(5)"), max_lines=5)) == 5
    with pytest.raises(PromptError, match=r"more than 5 items.*prompts\.max_module_lines"):
        _module_lines(tmp_path, source, max_lines=5)


def test_max_module_lines_must_be_positive(cache_dir, tmp_path) -> None:
    line = _error_line(_run(["prompt=x", "prompts.max_module_lines=0"], cache_dir, tmp_path))
    assert "prompts.max_module_lines must be a positive number" in line


# ---------------------------------------------------------------- prompt text: control characters

def test_nul_bytes_are_stripped_with_a_warning_naming_the_line(cache_dir, tmp_path) -> None:
    (tmp_path / "p.txt").write_bytes(b"# a comment\na b\x00ird\x01 --n ug\x00ly\n")
    proc = _run([f"prompt_file={tmp_path / 'p.txt'}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "control character" in line]
    assert len(warnings) == 1 and "p.txt:2" in warnings[0] and "U+0000" in warnings[0], proc.stderr
    (line,) = manifest(tmp_path / "run")
    assert line["prompt"] == "a bird" and line["negative_prompt"] == "ugly"
    text = Image.open(tmp_path / "run" / line["file"]).text
    assert all("\x00" not in value and "\x01" not in value for value in text.values())


def test_control_characters_leave_every_prompt_source(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        lines = read_prompts(["a\x00b", "tab\tand\nnewline stay"], "neg\x07ative", None)
        line = PromptLine("x\x1by", "", "stdin:3")
    assert [(one.text, one.negative) for one in lines] == [("ab", "negative"), ("tab\tand\nnewline stay", "negative")]
    assert line.text == "xy"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["negative_prompt", "prompt[0]", "stdin"]
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "c.txt").write_text("re\x00d\n")
    with caplog.at_level(logging.WARNING):
        assert expand("__c__", 1, Wildcards(tmp_path / "w")) == "red"
    assert "c.txt:1" in caplog.records[-1].getMessage()


# ---------------------------------------------------------------- prompt text: weights

@pytest.mark.parametrize(("text", "expected"), [
    ("(cat:0)", [("cat", 0.0)]),
    ("a (cat:-0.5) b", [("a ", 1.0), ("cat", -0.5), (" b", 1.0)]),
    ("(cat:+0)", [("cat", 0.0)]),
    ("(cat:-.5)", [("cat", -0.5)]),
    ("((cat:-2))", [("cat", -2.2)]),
    ("[(cat:0)]", [("cat", 0.0)]),
    ("(cat:-1.2.3)", [("cat:-1.2.3", 1.1)]),  # no number: text, as (x:abc)
    ("(cat:-)", [("cat:-", 1.1)]),
    ("(cat:" + "9" * 400 + ")", [("cat", sys.float_info.max)]),  # a number too large for a float: the largest
])
def test_zero_and_signed_weights_follow_a1111(text, expected) -> None:
    got = parse_weights(text)
    assert [run for run, _ in got] == [run for run, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a_weight_of_minus_one_is_not_a_break() -> None:
    runs = parse_weights("(x:-1) a BREAK b (BRE:-1)(AK:-1)")
    assert [is_break(run) for run in runs] == [False, False, True, False, False, False]
    assert runs[0] == ("x", -1.0) and strip_weights("(x:-1) y") == "x y"


def _alarm(seconds: int):
    def expired(*_):
        raise TimeoutError(f"parsing took more than {seconds} s: not linear")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    return previous


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
@pytest.mark.parametrize(("unit", "plain"), [("(a:", "a:"), ("(a", "a"), ("[(a", "a"), ("((a:1.1)", "a")])
def test_200_kb_of_brackets_parses_in_linear_time(unit, plain) -> None:
    count = 200_000 // len(unit)
    text = unit * count
    if unit == "(a":
        text += ")" * count  # every bracket closed: nested closes, each covering all the runs inside it
    previous = _alarm(30)  # the quadratic parser took minutes here; the linear one takes well under a second
    try:
        runs = parse_weights(text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "".join(run for run, _ in runs) == plain * count
    assert all(0 < w <= sys.float_info.max for _, w in runs)


@pytest.mark.parametrize("text", [
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "(a [b (c:0.7) d] e (f:-0.5) g)" * 20,
    "((" * 50 + "x" + "))" * 30 + "[y]" * 10,
    "(a:" * 300 + "[b" * 200,
])
def test_log_space_path_agrees_with_the_exact_one(monkeypatch, text) -> None:
    exact = parse_weights(text)
    monkeypatch.setattr(weighting, "WORK_PER_CHAR", 0)
    monkeypatch.setattr(weighting, "WORK_FREE", -1)
    approx = parse_weights(text)

    def per_char(runs):
        return [(c, w) for run, w in runs for c in (["B"] if (run, w) == BREAK else run)]

    assert [c for c, _ in per_char(approx)] == [c for c, _ in per_char(exact)]
    assert [w for _, w in per_char(approx)] == pytest.approx([w for _, w in per_char(exact)], rel=1e-12)


# ---------------------------------------------------------------- --f names

@pytest.mark.parametrize(("name", "needle"), [
    ("grid", "--f grid.png is the name of a file the run directory holds"),
    ("Grid-Z2.png", "--f Grid-Z2.png is the name of a file"),
    ("x" * 300, "is 304 bytes long"),
])
def test_bad_file_names_are_refused_when_planning(name, needle, cache_dir, tmp_path) -> None:
    (tmp_path / "p.txt").write_text(f"a cat\na dog --f {name}\n")
    line = _error_line(_run([f"prompt_file={tmp_path / 'p.txt'}", "output.grid=true"], cache_dir, tmp_path))
    assert "p.txt:2" in line and needle in line, line
    assert not list((tmp_path / "run").glob("*.png")), "refused before any image is made"


def test_the_longest_allowed_name_is_written(cache_dir, tmp_path) -> None:
    name = "n" * (MAX_NAME_BYTES - 4)  # with ".png": the limit, and its temporary name still fits in 255 bytes
    (tmp_path / "p.txt").write_text(f"a cat --f {name}\n")
    proc = _run([f"prompt_file={tmp_path / 'p.txt'}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [line["file"] for line in manifest(tmp_path / "run")] == [name + ".png"]
    assert (tmp_path / "run" / (name + ".png")).is_file()


def test_file_name_length_counts_bytes_and_numbering() -> None:
    fits = "é" * ((MAX_NAME_BYTES - 4) // 2)  # 2 bytes each: exactly at the limit with ".png"
    jobs = plan(_spec(), [PromptLine(f"a cat --f {fits}", "", "p.txt:1")], 0)
    assert len(jobs[0].file_name.encode()) <= MAX_NAME_BYTES
    with pytest.raises(PromptError, match=r"p\.txt:1: --f .* bytes long"):
        plan(_spec(), [PromptLine(f"a cat --f {fits}é", "", "p.txt:1")], 0)
    with pytest.raises(PromptError, match=r"p\.txt:1: the file name .* with its numbering"):
        plan(_spec(images_per_prompt=2), [PromptLine(f"a cat --f {fits}", "", "p.txt:1")], 0)


def test_on_error_skip_drops_a_line_with_a_reserved_name(caplog) -> None:
    lines = [PromptLine("a cat --f grid", "", "p.txt:1"), PromptLine("a dog", "", "p.txt:2")]
    jobs = plan(_spec(on_error="skip"), lines, 0)
    assert [job.origin for job in jobs] == ["p.txt:2"]


def test_an_init_image_named_grid_gets_a_free_name(tmp_path) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "grid.png")
    line = PromptLine("a cat", "", "prompt", init_image=str(tmp_path / "grid.png"))
    output = dataclasses.replace(_spec().output, naming="original")
    jobs = plan(_spec(output=output, init_image=str(tmp_path / "grid.png")), [line], 0)
    assert jobs[0].file_name == "grid_1.png"


# ---------------------------------------------------------------- files: what was found instead

def _folders(tmp: Path) -> dict[str, Path]:
    empty = tmp / "empty"
    empty.mkdir()
    loose = tmp / "loose"
    loose.mkdir()
    (loose / "model.safetensors").write_bytes(b"")
    (loose / "notes.txt").write_text("x")
    return {"empty": empty, "loose": loose}


FILE_CASES = {
    "prompt_file": (lambda d: [f"prompt_file={d['empty']}"], "prompt_file", "is a folder, not a file"),
    "prompt_module": (lambda d: [f"prompt_module={d['empty']}"], "prompt_module", "is a folder, not a file"),
    "init_image": (lambda d: ["prompt=x", f"init_image={d['loose']}"], "init_image folder",
                   "holds no images (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff), only model.safetensors, notes.txt"),
    "textual_inversion": (lambda d: ["prompt=x", f"model.textual_inversion=[{d['empty']}]"],
                          "model.textual_inversion", "is a folder, not a file"),
    "lora": (lambda d: ["prompt=x", "network=lora", f"network.loras=[{{path: '{d['empty']}'}}]"],
             "network.loras[0].path", "is a folder, not a LoRA file"),
    "vae": (lambda d: ["prompt=x", f"model.vae={d['loose']}"], "model.vae",
            "is a folder without config.json or vae/config.json; it holds model.safetensors"),
    "checkpoint": (lambda d: ["prompt=x"], "model.checkpoint",
                   "is a folder without model_index.json (not a diffusers model); it holds model.safetensors"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_wrong_kind_of_path_says_what_was_found(case, cache_dir, tmp_path) -> None:
    folders = _folders(tmp_path)
    args, key, needle = FILE_CASES[case]
    model = f"model.checkpoint={folders['loose']}" if case == "checkpoint" else "model=tiny"
    line = _error_line(_run(args(folders), cache_dir, tmp_path, model=model))
    assert key in line and needle in line, line


# ---------------------------------------------------------------- malicious .ckpt files

class _System:
    """Unpickling this would run `echo pwned`; pickling it runs nothing."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


class _Exec:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w')",)


def _evil_file(tmp: Path, kind: str) -> tuple[Path, str]:
    path = tmp / f"evil-{kind}.ckpt"
    if kind.startswith("protocol"):
        payload = {"state_dict": {"w": _System()}}
        path.write_bytes(pickle.dumps(payload, protocol=int(kind[-1])))
        return path, "posix.system (os.system)" if os.name == "posix" else "os.system"
    if kind == "exec-protocol0":
        path.write_bytes(pickle.dumps({"state_dict": _Exec(tmp / "pwned")}, protocol=0))
        return path, "builtins.exec"
    import torch

    zipped = kind == "zip"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _System()}, path, _use_new_zipfile_serialization=zipped)
    return path, "posix.system (os.system)" if os.name == "posix" else "os.system"


@pytest.mark.parametrize("kind", ["protocol0", "legacy", "exec-protocol0"])  # every kind in-process below
def test_malicious_ckpt_is_refused_naming_the_global(kind, cache_dir, tmp_path) -> None:
    path, name = _evil_file(tmp_path, kind)
    proc = run_cli([f"model.checkpoint={path}", "prompt=x", f"hydra.run.dir={tmp_path / 'run'}", *SMALL],
                   cache_dir, tmp_path)
    line = _error_line(proc)
    assert f"refusing to load {path}" in line and name in line, line
    assert "truncated or corrupt" not in line and "PyTorch 2.6" not in line, line
    assert "pwned" not in proc.stdout and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["protocol0", "protocol2", "legacy", "zip", "exec-protocol0"])
def test_refused_global_is_named_in_process(kind, tmp_path, capfd) -> None:
    from sdbatch.engine.models.checkpoint import read_state_dict

    path, name = _evil_file(tmp_path, kind)
    with pytest.raises(ModelError, match="refusing to load") as info:
        read_state_dict(path)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert "pwned" not in capfd.readouterr().out and not (tmp_path / "pwned").exists()

"""LoRA training metadata: the safetensors header reader, the printed block, `+info=lora` and network.show_meta."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from test_run import ROOT, SMALL, run_cli

from sdbatch.cli import info
from sdbatch.cli.info import format_lora_meta, info_command, printable, show_network_meta
from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.engine.features.lora_network import addnet_hash
from sdbatch.engine.models.lora_meta import read_lora_meta
from sdbatch.engine.models.tiny_lora import random_lora
from sdbatch.errors import ModelError

EVIL = "hi\x1b[2J\x1b[31mred\x07\r\nfake line\u202eevil\x00"
# 13 tags over two datasets: "shared" sums to the top, "a"/"b" tie (sorted by name), "z9"/"z10" miss the top 10
TAGS = {"10_style": {"shared": 7, "a": 9, "b": 9, "c": 8, "d": 6, "e": 5, "z10": 1},
        "5_extra": {"shared": 5, "f": 4, "g": 3, "h": 2, "i": 2, " z9": 1, "bell\x07\x1b[1m": 3}}
TRAINING = {
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_network_module": "networks.lora",
    "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_resolution": "(512, 512)",
    "ss_num_train_images": "120", "ss_num_epochs": "10", "ss_steps": "1200", "ss_training_comment": EVIL,
    "ss_output_name": "style", "sshs_model_hash": "0123abcd", "ss_tag_frequency": json.dumps(TAGS),
    "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"}, indent=2),
}


def _file(path, metadata=None, tensors=None):
    save_file(tensors or {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path), metadata=metadata)
    return path


def test_the_block_shows_the_training_settings_and_top_tags(tmp_path) -> None:
    path = _file(tmp_path / "style.safetensors", TRAINING)
    meta = read_lora_meta(path)
    assert meta.name == "style.safetensors" and meta.metadata == TRAINING
    assert meta.hash == addnet_hash(path) and len(meta.hash) == 12
    block = format_lora_meta(meta)
    lines = block.splitlines()
    assert lines[:14] == [
        "style.safetensors",
        f"  short hash:       {meta.hash}",
        "  base model:       v1-5-pruned-emaonly.safetensors",
        "  network module:   networks.lora",
        "  network dim:      16",
        "  network alpha:    8.0",
        '  network args:     {"conv_dim":"4","conv_alpha":"1"}',
        "  resolution:       (512, 512)",
        "  train images:     120",
        "  epochs:           10",
        "  steps:            1200",
        "  output name:      style",
        "  sshs model hash:  0123abcd",
        r"  training comment: hi\x1b[2J\x1b[31mred\x07\r\nfake line\u202eevil\x00",
    ]
    assert lines[14] == "  top tags:         10 of 13 (counts summed over 2 datasets)"
    top = [line.split(maxsplit=1) for line in lines[15:]]
    assert top == [["12", "shared"], ["9", "a"], ["9", "b"], ["8", "c"], ["6", "d"], ["5", "e"], ["4", "f"],
                   ["3", r"bell\x07\x1b[1m"], ["3", "g"], ["2", "h"]]
    assert all(ch.isprintable() for line in lines for ch in line), "no control character reaches the terminal"


def test_files_without_training_metadata_and_malformed_values(tmp_path) -> None:
    plain = format_lora_meta(read_lora_meta(_file(tmp_path / "plain.safetensors")))
    assert plain.splitlines()[1:] == [plain.splitlines()[1], "  (no training metadata)"]
    other = format_lora_meta(read_lora_meta(_file(tmp_path / "other.safetensors", {"sdbatch_tiny_version": "1"})))
    assert other.endswith("(no training metadata)")
    bad = {"ss_tag_frequency": '{"x": {"a": 1', "ss_network_args": "[1,", "ss_network_dim": "4"}
    lines = format_lora_meta(read_lora_meta(_file(tmp_path / "bad.safetensors", bad))).splitlines()
    assert "  network args:     [1, (not valid JSON)" in lines
    assert lines[-1] == "  top tags:         (ss_tag_frequency is not valid JSON)"
    shapeless = {"ss_tag_frequency": '{"d": ["a"], "e": {"a": "many", "b": true, "c": NaN, "d": -Infinity}}'}
    lines = format_lora_meta(read_lora_meta(_file(tmp_path / "shape.safetensors", shapeless))).splitlines()
    assert lines[-1] == "  top tags:         (ss_tag_frequency holds no tag counts)"
    long = format_lora_meta(read_lora_meta(_file(tmp_path / "long.safetensors", {"ss_training_comment": "x" * 5000})))
    assert long.splitlines()[-1].endswith("x... (5000 characters)") and len(long) < 600
    assert printable("a\tb\u200bc") == r"a\tb\u200bc"


def test_only_safetensors_headers_are_read(tmp_path) -> None:
    pt = tmp_path / "old.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1)}, pt)
    with pytest.raises(ModelError, match=r"old\.pt: metadata is only stored in \.safetensors files"):
        read_lora_meta(pt)
    with pytest.raises(ModelError, match=r"LoRA file .*nope\.safetensors not found"):
        read_lora_meta(tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="is a folder"):
        read_lora_meta(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match=r"notes\.txt is not a \.safetensors file"):
        read_lora_meta(tmp_path / "notes.txt")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelError, match="header length is wrong"):
        read_lora_meta(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(ModelError, match="header is not JSON"):
        read_lora_meta(garbage)


def test_info_command_prints_blocks_without_loading_a_model(tmp_path) -> None:
    style = _file(tmp_path / "style.safetensors", TRAINING)
    plain = _file(tmp_path / "plain.safetensors")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "+info=lora", str(style), str(plain)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    blocks = proc.stdout.strip().split("\n\n")
    assert blocks == [format_lora_meta(read_lora_meta(style)), format_lora_meta(read_lora_meta(plain))]
    assert "\x1b" not in proc.stdout
    assert seconds < 20, "reads two headers (the target is < 3 s: Python, Hydra and torch imports)"
    assert not (tmp_path / "outputs").exists(), "no run directory"
    # in-process: the model libraries and the model loader are never imported
    probe = ("import sys, io, contextlib; from sdbatch.cli.info import info_command\n"
             "with contextlib.redirect_stdout(io.StringIO()): code = info_command(['+info=lora', sys.argv[1]])\n"
             "heavy = ('diffusers', 'transformers', 'sdbatch.engine.models.loading', 'sdbatch.engine.core.engine')\n"
             "print(code, [m for m in heavy if m in sys.modules])")
    checked = subprocess.run([sys.executable, "-c", probe, str(style)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert checked.stdout.split() == ["0", "[]"], checked.stderr


@pytest.mark.parametrize(("args", "error"), [
    (["nope.safetensors"], "sdbatch: error: LoRA file nope.safetensors not found"),
    ([], "sdbatch: error: +info=lora needs one or more LoRA files: python run.py +info=lora FILE [FILE...]"),
])
def test_info_command_errors_are_one_line(tmp_path, args, error) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "+info=lora", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr.splitlines()) == (2, "", [error])


def test_info_command_keeps_going_and_only_takes_plus_info(tmp_path, capsys) -> None:
    assert info_command(["model=tiny", "prompt=x"]) is None, "a run: Hydra parses it"
    good = _file(tmp_path / "good.safetensors", {"ss_network_dim": "4"})
    pt = tmp_path / "old.ckpt"
    torch.save({}, pt)
    assert info_command(["+info=lora", str(pt), str(good)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("good.safetensors\n") and err.count("\n") == 1 and "old.ckpt: metadata is only" in err
    assert info_command(["+info=what", str(good)]) == 2
    assert "+info=what: unknown info command" in capsys.readouterr().err


def test_show_meta_logs_each_file_once(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(info, "_shown", set())
    style = _file(tmp_path / "style.safetensors", TRAINING)
    pt = tmp_path / "old.pt"
    torch.save({}, pt)
    network = NetworkConfig(name="lora", loras=[LoraConfig(path=str(style)), LoraConfig(path=str(pt))],
                            show_meta=True)
    with caplog.at_level(logging.INFO, logger="sdbatch"):
        show_network_meta(dataclasses.replace(network, show_meta=False))
        assert caplog.records == []
        show_network_meta(network)
        show_network_meta(network)  # a multirun's next job in the same process
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert infos == [f"training metadata <network.show_meta>\n{format_lora_meta(read_lora_meta(style))}"]
    assert len(warnings) == 1 and "old.pt: metadata is only stored in .safetensors files" in warnings[0]


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_show_meta_run_prints_the_blocks_before_generating(cache_dir, sd1_components, tmp_path) -> None:
    """A two-job multirun in one process, a LoRA file and a <lora:> tag's file: each block once, before images."""
    unet, _, text_encoder = sd1_components
    style = tmp_path / "style.safetensors"
    save_file(random_lora(unet, text_encoder), str(style), metadata=TRAINING)
    (tmp_path / "tags").mkdir()
    tagged = tmp_path / "tags" / "detail.safetensors"
    save_file(random_lora(unet, text_encoder, seed=1), str(tagged), metadata={"ss_network_dim": "4"})
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny", "network=lora", f"network.loras=[{{path: '{style}'}}]",
                    f"network.lora_dir={tmp_path / 'tags'}", "network.show_meta=true",
                    "prompt='a cube <lora:detail:0.5>'", "seed=1,2", f"hydra.sweep.dir={sweep}", *SMALL],
                   cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    for path in (style, tagged):
        block = format_lora_meta(read_lora_meta(path))
        assert err.count(block) == 1, err
        assert err.index(block) < err.index("text encoder ran for"), "shown before the first image"
    assert "\x1b" not in err and r"\x1b[31mred" in err

"""End to end: `python run.py …` writes the run-directory contract, resumes, and reports user mistakes in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdbatch.prompts.png_info import parse_infotext

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["width=64", "height=64", "sampler.steps=3", "perf.progress=false"]


def run_cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def manifest(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]


def test_done_when_command_writes_the_run_directory(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny", "prompt=a lighthouse at dusk", "images_per_prompt=4", "batch_size=2",
                    f"hydra.run.dir={run_dir}", *SMALL], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    pngs = sorted(run_dir.glob("*.png"))
    assert len(pngs) == 4
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "config.yaml").exists()
    lines = manifest(run_dir)
    assert [line["file"] for line in lines] == [p.name for p in pngs]
    seeds = [line["seed"] for line in lines]
    assert seeds == list(range(seeds[0], seeds[0] + 4)), "image k gets base seed + k"
    for png, line in zip(pngs, lines, strict=True):
        text = Image.open(png).text
        assert json.loads(text["sdbatch"]) == line
        info = parse_infotext(text["parameters"])
        assert info["Prompt"] == "a lighthouse at dusk" and info["Seed"] == str(line["seed"])
        assert (info["Steps"], info["Sampler"], info["Size-1"], info["Size-2"]) == ("3", "DDIM", "64", "64")
        assert info["Model hash"] == line["model_hash"] and len(line["model_hash"]) == 10
    config = (run_dir / "config.yaml").read_text()
    assert f"seed: {seeds[0]}" in config and "sdbatch_version:" in config
    assert "model_hashes:" in config and f"tiny-sd1.safetensors: {lines[0]['model_hash']}" in config
    assert "${" not in config


@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_rerun_into_the_same_directory_skips_done_images(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["model=tiny", "prompt=a cat", "images_per_prompt=2", f"hydra.run.dir={run_dir}", *SMALL]
    assert run_cli(args, cache_dir, tmp_path).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.png")}
    again = run_cli(args, cache_dir, tmp_path)
    assert again.returncode == 0 and "0 new image(s), 2 already done" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.png")} == first
    assert len(manifest(run_dir)) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["prompt=x"], "model.checkpoint is not set"),
        (["model=tiny", "prompt=x", "width=100"], "width must be a multiple of 8"),
        (["model=tiny", "prompt=x", "height=-8"], "height must be a positive number"),
        (["model=tiny", "prompt=x", "sampler.steps=0"], "sampler.steps must be a positive number"),
        (["model=tiny", "prompt=x", "sampler=nope"], "available options in 'sampler'"),
        (["model=tiny", "prompt=x", "sampler.stpes=3"], "sampler.stpes"),
        (["model=tiny", "prompt=x", "width=abc"], "key: width"),
        (["model=tiny", "prompt=x", "+model.colour=red"], "unknown key model.colour"),
        (["model=tiny", "prompt=a, b"], "quote it for Hydra inside bash quotes: 'prompt=\"a, b\"'"),
        (["model=tiny", "prompt=x", "grid.x=seed:1,2"], "give the axis as grid.x.key=seed 'grid.x.values=[1,2]'"),
    ],
)
def test_config_mistakes_fail_in_one_line(args, needle, cache_dir, tmp_path) -> None:
    proc = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cache_dir, tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sdbatch:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


class _MakesAFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _bad_models(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    import torch
    from safetensors.torch import save_file

    unrelated = tmp / "unrelated.safetensors"
    save_file({"layer.weight": torch.zeros(2, 2)}, str(unrelated))
    evil = tmp / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _MakesAFile(tmp / "pwned")}))
    return {
        "missing": (tmp / "nope.safetensors", "nope.safetensors"),
        "truncated": (truncated, "truncated.safetensors"),
        "unrelated": (unrelated, "no UNet"),
        "evil": (evil, "evil.ckpt"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "unrelated", "evil"])
def test_bad_checkpoints_fail_in_one_line(case, cache_dir, tmp_path, sd1_single_file) -> None:
    path, needle = _bad_models(tmp_path, sd1_single_file)[case]
    proc = run_cli([f"model.checkpoint={path}", "prompt=x", f"hydra.run.dir={tmp_path / 'run'}", *SMALL],
                   cache_dir, tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sdbatch:")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned").exists(), "a pickle must never run code"


def test_unwritable_output_directory(cache_dir, tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    proc = run_cli(["model=tiny", "prompt=x", f"hydra.run.dir={blocker}/run", *SMALL], cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(blocker) in proc.stderr


def test_multirun_over_seeds_loads_the_model_once(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny", "prompt=a cat", "seed=1,2,3", f"hydra.sweep.dir={sweep}", *SMALL],
                   cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    seeds = [manifest(sweep / str(n))[0]["seed"] for n in range(3)]
    assert seeds == [1, 2, 3]
    logs = [(sweep / str(n) / "run.log").read_text() for n in range(3)]
    assert ["Loaded tiny-sd1" in log for log in logs] == [True, False, False]


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_named_sweep_preset_runs_every_seed(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["+sweeps=seeds", "model=tiny", "prompt=a cat", f"hydra.sweep.dir={sweep}", *SMALL],
                   cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(manifest(sweep / str(n))[0]["seed"] for n in range(8)) == list(range(8))


@pytest.mark.parametrize(("option", "fixture", "v_pred"), [("sd15", "sd1_single_file", False),
                                                            ("sd21", "sd2_single_file", True)])
def test_own_single_file_checkpoint(option, fixture, v_pred, request, cache_dir, tmp_path) -> None:
    path = request.getfixturevalue(fixture)
    run_dir = tmp_path / "run"
    proc = run_cli([f"model={option}", f"model.checkpoint={path}", "prompt=a lighthouse", "images_per_prompt=2",
                    "batch_size=2", f"hydra.run.dir={run_dir}", *SMALL], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = manifest(run_dir)
    assert len(lines) == 2 and all(line["v_prediction"] is v_pred for line in lines)
    assert lines[0]["model"] == path.stem


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_six_job_sweep_loads_once_and_encodes_each_prompt_once(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny", "prompt=a cat", "negative_prompt=blurry", "seed=1,2,3",
                    "sampler.cfg_scale=5,7", f"hydra.sweep.dir={sweep}", *SMALL], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    logs = [(sweep / str(n) / "run.log").read_text() for n in range(6)]
    assert ["text encoder ran for 2 prompt(s)" in log for log in logs] == [True] + [False] * 5
    assert all("text encoder ran for 0 prompt(s) in this run; 1 model load(s)" in log for log in logs[1:])

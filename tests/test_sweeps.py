"""Sweeps: presets, sweep.jsonl and contact sheet, failures, resume after a kill, joblib/submitit/ray launchers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from sdbatch.cli.hydra_app import device_for_job, sweep_choices
from sdbatch.cli.progress import sweep_jobs
from sdbatch.cli.quoting import hydra_quoted
from sdbatch.config.schema import register_configs
from sdbatch.outputs.contact_sheet import EMPTY, labelled_grid
from sdbatch.outputs.sweep_index import NO_RESULT, collect, swept_keys

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["height=64", "sampler.steps=3", "perf.progress=false"]  # width is swept or added per test
register_configs()


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run_cli(args: list[str], cache: Path, cwd: Path, python: str = sys.executable,
            **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(ROOT / "run.py"), *args], cwd=cwd, env=_env(cache, **env),
                          capture_output=True, text=True, timeout=300)


def index(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "sweep.jsonl").read_text().splitlines()]


def manifest_files(run_dir: Path) -> list[str]:
    return [json.loads(line)["file"] for line in (run_dir / "manifest.jsonl").read_text().splitlines()]


def summary(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sdbatch:")]


# ---------------------------------------------------------------- in process


def test_sweep_choices_quote_each_item_as_one_job() -> None:
    words = ["cube", 'cone, "tall"', "a \\[table\\]", "(red:1.2)", "cube"]
    override = OverridesParser.create().parse_override(f"prompt_sr={sweep_choices(words)}")
    jobs = [OverridesParser.create().parse_override(f"prompt_sr={v}").value()
            for v in override.sweep_string_iterator()]
    assert jobs == words[:4]  # duplicates dropped, commas/quotes/brackets/colons literal
    assert OverridesParser.create().parse_override("x=" + hydra_quoted("a\\")).value() == "a\\"
    with pytest.raises(ValueError, match="list is empty"):
        sweep_choices([])


def _expand(*overrides: str) -> list[list[str]]:
    """The jobs Hydra's basic sweeper would launch for these overrides (sweeper params first)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return sweep_jobs(compose("config", overrides=list(overrides), return_hydra_config=True))


SAMPLER_OPTIONS = len(list((ROOT / "conf" / "sampler").glob("*.yaml")))


@pytest.mark.parametrize(("preset", "key", "count"), [
    ("seeds", "seed", 8), ("cfg_scale", "sampler.cfg_scale", 6), ("steps", "sampler.steps", 5),
    ("samplers", "sampler", SAMPLER_OPTIONS), ("prompt_sr", "prompt_sr", 4)])
def test_presets_expand_and_command_line_wins(preset: str, key: str, count: int) -> None:
    jobs = _expand(f"+sweeps={preset}", "model=tiny", "prompt=x")
    values = {o for job in jobs for o in job if o.startswith(f"{key}=")}
    assert len(jobs) == count
    if preset == "prompt_sr":
        assert [job[0] for job in jobs] == [f'prompt_sr="{w}"' for w in ("dusk", "dawn", "noon", "night")]
        words = _expand(f"+sweeps={preset}", "model=tiny", "prompt=x", "prompt_sr_words=[red,'blue, dark']")
        assert [job[0] for job in words] == ['prompt_sr="red"', 'prompt_sr="blue, dark"']
    elif preset == "samplers":
        assert {v.split("=")[1] for v in values} >= {"ddim", "euler_a", "dpmpp_2m_karras", "unipc", "k_lms"}
    else:
        assert len(values) == count
        assert len(_expand(f"+sweeps={preset}", "model=tiny", "prompt=x", f"{key}=1")) == 1


def test_labelled_grid_draws_labels_and_grey_missing_cells() -> None:
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    sheet = labelled_grid([[red, None], [blue, red]], ["sampler.cfg_scale=5", "sampler.cfg_scale=7"],
                          ["seed=1", "seed=2"], title="model=tiny")
    left, top = sheet.width - 2 * 64, sheet.height - 2 * 48
    assert left > 0 and top > 0
    assert sheet.getpixel((left + 10, top + 10)) == (255, 0, 0)
    assert sheet.getpixel((left + 64 + 32, top + 24)) == EMPTY
    assert sheet.getpixel((left + 32, top + 48 + 24)) == (0, 0, 255)  # smaller images are centred
    label_band = sheet.crop((0, 0, sheet.width, top)).convert("L")
    assert label_band.getextrema()[0] < 128, "axis labels are drawn as text"
    bare = labelled_grid([[red]], [""], [""])
    assert bare.size == red.size


def test_device_for_job(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for_job(3) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [device_for_job(n) for n in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def _job_dir(sweep: Path, num: int, overrides: list[str], result: dict | None) -> Path:
    run_dir = sweep / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    if result is not None:
        (run_dir / "job.json").write_text(json.dumps({"num": num, "overrides": overrides, **result}))
    return run_dir


def test_collect_skips_earlier_sweeps_and_reports_killed_jobs(tmp_path) -> None:
    stale = _job_dir(tmp_path, 5, ["seed=9", "width=64"], {"status": "completed"})
    for path in [stale / "job.json", *(stale / ".hydra").iterdir()]:
        os.utime(path, (time.time() - 100, time.time() - 100))
    (tmp_path / "multirun.yaml").write_text("{}\n")
    _job_dir(tmp_path, 0, ["seed=1", "width=64"], {"status": "completed", "seconds": 1.5})
    (tmp_path / "0" / "manifest.jsonl").write_text('{"file": "00000-1.png"}\n{"file": "00001-2.png"}\n{"fi')
    _job_dir(tmp_path, 1, ["seed=2", "width=64"], None)
    records = collect(tmp_path)
    assert [(r.num, r.status, r.image_count) for r in records] == [(0, "completed", 2), (1, "failed", 0)]
    assert records[0].images == ["00000-1.png", "00001-2.png"] and records[1].error == NO_RESULT
    assert swept_keys(records) == ["seed"]


# ---------------------------------------------------------------- end to end (python run.py -m ...)


def _start_and_kill_after_first_image(args: list[str], cache: Path, cwd: Path, first_job: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # the manifest line, not the PNG: an image written but not yet in the manifest is made again on resume
        manifest = first_job / "manifest.jsonl"
        while not (manifest.exists() and manifest.read_text().strip()) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


@pytest.mark.slow  # end-to-end in subprocesses: the slow stage of .ci/run
def test_killed_sweep_resumes_and_failed_jobs_do_not_stop_it(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "model=tiny", "prompt=a cat", "images_per_prompt=4", "seed=1,2", "width=64,100",
            f"hydra.sweep.dir={sweep}", "height=64", "sampler.steps=40", "perf.progress=false"]
    # 40 steps: each image takes long enough (~0.1 s or more) that the kill lands before job 0's last image
    _start_and_kill_after_first_image(args, cache_dir, tmp_path, sweep / "0")
    assert not (sweep / "sweep.jsonl").exists()
    proc = run_cli(args, cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    jobs = index(sweep)
    assert [j["status"] for j in jobs[1:]] == ["failed", "completed", "failed"]
    for job in jobs[0::2]:  # every image exactly once, in the manifest and on disk
        files = manifest_files(sweep / job["run_dir"])
        assert len(files) == len(set(files)) == 4 == job["image_count"]
        assert sorted(p.name for p in (sweep / job["run_dir"]).glob("*.png")) == sorted(files) == job["images"]
    assert jobs[0]["new_images"] < 4 and jobs[2]["new_images"] == 4, "job 0 resumed, job 2 ran after a failure"
    assert jobs[0]["status"] == ("completed" if jobs[0]["new_images"] else "skipped")
    assert "width must be a multiple of 8" in jobs[1]["error"] and "width=100" in jobs[1]["overrides"]
    lines = summary(proc.stderr)
    assert lines[0].startswith("sdbatch: 2 failed of 4 job(s)") and len(lines) == 3
    assert lines[1].startswith("sdbatch: job 1 (seed=1 width=100): failed: width must be a multiple of 8")
    sheet = Image.open(sweep / "contact_sheet.png")
    assert sheet.width > 2 * 64 and sheet.height > 2 * 64  # widths across, seeds down, labels around
    again = run_cli(args, cache_dir, tmp_path)  # finished jobs are skipped without loading the model
    assert again.returncode == 2 and [j["status"] for j in index(sweep)] == ["skipped", "failed"] * 2
    assert "Loaded tiny-sd1" not in again.stderr


def test_presets_share_one_seed_and_sweep_prompt_words(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["+sweeps=[cfg_scale,prompt_sr]", "model=tiny", "width=64", *SMALL, "sampler.cfg_scale=3,9",
                    "prompt='a red cube, studio light'", "negative_prompt=red haze", "prompt_sr_words=[red,blue]",
                    f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = index(sweep)
    lines = [json.loads((sweep / j["run_dir"] / "manifest.jsonl").read_text()) for j in jobs]
    assert [(line["cfg_scale"], line["prompt"], line["negative_prompt"]) for line in lines] == [
        (3.0, "a red cube, studio light", "red haze"), (3.0, "a blue cube, studio light", "blue haze"),
        (9.0, "a red cube, studio light", "red haze"), (9.0, "a blue cube, studio light", "blue haze")]
    assert len({line["seed"] for line in lines}) == 1, "one seed for the whole sweep"
    from sdbatch.outputs.sweep_index import JobRecord

    assert swept_keys([JobRecord(**j) for j in jobs]) == ["sampler.cfg_scale", "prompt_sr"]
    assert (sweep / "contact_sheet.png").exists()


def test_stop_on_error_cancels_the_jobs_not_started(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny", "prompt=x", "width=100,64,72", "height=64", f"hydra.sweep.dir={sweep}",
                    "hydra.callbacks.sweep_index.stop_on_error=true"], cache_dir, tmp_path)  # with the sweep's bar
    assert proc.returncode == 2
    assert [j["status"] for j in index(sweep)] == ["failed", "cancelled", "cancelled"]
    assert not (sweep / ".sdbatch-stop").exists()
    assert "Traceback" not in proc.stderr and len(summary(proc.stderr)) == 4
    assert any(s.startswith("sweep: 100%") and "3/3" in s for s in re.split(r"[\r\n]", proc.stderr)), proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None,
                    reason="hydra-ray-launcher is installed here")
def test_missing_launcher_names_the_extra(cache_dir, tmp_path) -> None:
    proc = run_cli(["-m", "hydra/launcher=ray", "model=tiny", "prompt=x", "seed=1,2",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cache_dir, tmp_path)
    lines = summary(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "hydra-ray-launcher" in lines[0] and "pip install -e '.[ray]'" in lines[0]
    assert "Traceback" not in proc.stderr


def _launcher_sweep(launcher: list[str], cache: Path, tmp: Path, python: str = sys.executable) -> list[dict]:
    sweep = tmp / "sweep"
    proc = run_cli(["-m", *launcher, "model=tiny", "prompt=a cat", "width=64", *SMALL, "seed=1,2",
                    f"hydra.sweep.dir={sweep}"], cache, tmp, python=python)
    assert proc.returncode == 0, proc.stderr
    jobs = index(sweep)
    assert [(j["status"], j["device"]) for j in jobs] == [("completed", "cpu")] * 2
    assert [json.loads((sweep / j["run_dir"] / "manifest.jsonl").read_text())["seed"] for j in jobs] == [1, 2]
    assert "is validated against ConfigStore schema" not in proc.stderr  # our launcher configs: no deprecation noise
    return jobs


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_joblib_launcher_two_workers(cache_dir, tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher.joblib_launcher")
    _launcher_sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], cache_dir, tmp_path)


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_submitit_local_launcher(cache_dir, tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher.submitit_launcher")
    _launcher_sweep(["hydra/launcher=submitit_local"], cache_dir, tmp_path)
    assert (tmp_path / "sweep" / ".submitit").is_dir()


def test_ray_launcher_local_instance(cache_dir, tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_ray_launcher.ray_launcher")
    _launcher_sweep(["hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0"], cache_dir, tmp_path)

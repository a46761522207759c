"""The installable tool: the wheel ships conf/ and sweeps/ as sdbatch._conf, and its `sdbatch` command runs anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_list_covers_the_source_tree() -> None:
    """pyproject.toml lists packages by hand (the conf/ mapping needs it): a new sdbatch/ package must be added."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {p for p in find_namespace_packages(where=str(ROOT), include=["sdbatch*"]) if "__pycache__" not in p}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    mapped = set(_pyproject()["tool"]["setuptools"]["package-dir"])
    assert listed - on_disk == mapped == {"sdbatch._conf", "sdbatch._conf.sweeps"}


def test_console_script_and_config_dir() -> None:
    assert _pyproject()["project"]["scripts"]["sdbatch"] == "sdbatch.cli.main:main"
    from sdbatch.cli.main import packaged_config_dir

    assert (packaged_config_dir() / "config.yaml").is_file()
    assert (packaged_config_dir() / "sweeps" / "seeds.yaml").is_file()


def test_missing_user_config_dir_is_one_line(tmp_path, monkeypatch) -> None:
    from sdbatch.cli.main import CONFIG_DIR_ENV, user_config_dirs
    from sdbatch.errors import ConfigError

    monkeypatch.setenv(CONFIG_DIR_ENV, os.pathsep.join([str(tmp_path), str(tmp_path / "nope")]))
    with pytest.raises(ConfigError, match="nope"):
        user_config_dirs()
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    assert user_config_dirs() == [tmp_path.resolve()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv (reusing the system's torch, diffusers, ...) with the wheel built from this checkout installed."""
    base = tmp_path_factory.mktemp("install")
    wheels, venv, source = base / "wheels", base / "venv", base / "source"
    # build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml (conf/sweeps stays a link)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "local")
    for name in ("sdbatch", "conf", "sweeps"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, cwd=base, timeout=300)
    (wheel,) = wheels.glob("sdbatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = sorted(n.removeprefix("sdbatch/_conf/") for n in names if n.startswith("sdbatch/_conf/"))
    in_repo = sorted([str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")
                      if p.parts[len(ROOT.parts) + 1] not in ("sweeps", "local")]
                     + [f"sweeps/{p.name}" for p in (ROOT / "sweeps").glob("*.yaml")])
    assert packaged == in_repo
    assert len(names) == len(set(names))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, cwd=base, timeout=300)
    return venv


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SDBATCH_CONFIG_DIR")}
    return {**env, "SDBATCH_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
def test_wheel_installs_a_working_tool(installed, tmp_path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import sdbatch; print(sdbatch.__file__)"],
                           cwd=work, env=_env(tmp_path), capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(installed), "the venv must run the wheel, not the checkout"

    out = tmp_path / "out"
    proc = subprocess.run([str(installed / "bin" / "sdbatch"), "model=tiny", "prompt=a cat", "sampler.steps=2",
                           "width=64", "height=64", f"hydra.run.dir={out}"],
                          cwd=work, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.png"))) == 1
    assert (out / "manifest.jsonl").is_file()
    assert (out / "run.log").is_file()  # the same job name as `python run.py`
    assert "gallery-data" in (out / "index.html").read_text()  # the page's CSS and JavaScript ship in the wheel

    sweep = subprocess.run([str(installed / "bin" / "sdbatch"), "+sweeps=seeds", "model=tiny", "prompt=x",
                            "--cfg", "hydra"], cwd=work, env=_env(tmp_path), capture_output=True, text=True)
    assert sweep.returncode == 0, sweep.stderr
    assert "seed: range(0,8)" in sweep.stdout

    # a user's own config group option, through SDBATCH_CONFIG_DIR and through --config-dir
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "mytiny.yaml").write_text((ROOT / "conf" / "model" / "tiny.yaml").read_text())
    for args, env in (([], {"SDBATCH_CONFIG_DIR": str(mine)}), (["--config-dir", str(mine)], {})):
        own = subprocess.run([str(installed / "bin" / "sdbatch"), *args, "model=mytiny", "prompt=x", "--cfg", "job"],
                             cwd=work, env={**_env(tmp_path), **env}, capture_output=True, text=True)
        assert own.returncode == 0, own.stderr
        assert "checkpoint: builtin:tiny" in own.stdout

    missing = subprocess.run([str(installed / "bin" / "sdbatch"), "model=tiny", "prompt=x", "--cfg", "job"], cwd=work,
                             env={**_env(tmp_path), "SDBATCH_CONFIG_DIR": str(tmp_path / "nope")},
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"sdbatch: error: SDBATCH_CONFIG_DIR: config directory {tmp_path / 'nope'} not found"]

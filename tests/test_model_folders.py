"""Model folders by name (paths.models / SDBATCH_MODELS, A1111's and sdbatch's layouts), +info=models, sdbatch-info."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from controlnet_files import tiny_controlnet
from engine_helpers import spec
from lora_files import make_lora
from test_run import manifest

from sdbatch.cli.info import info_command
from sdbatch.cli.info_main import main as sdbatch_info
from sdbatch.config.model_folders import KINDS, find, kind_folders, scan
from sdbatch.config.model_names import resolve_model_names
from sdbatch.config.spec import LoraConfig, NetworkConfig, PathsConfig
from sdbatch.engine.features.lora_network import addnet_hash
from sdbatch.engine.models.checkpoint import file_sha256_short
from sdbatch.engine.models.export import save_controlnet, vae_to_ldm
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.lora_tags import apply_tags
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"a1111": {k: spec.folders[0] for k, spec in KINDS.items()},
           "sdbatch": {k: spec.folders[-1] for k, spec in KINDS.items()}}


def _models(root: Path, layout: str, sd1_single_file: Path, components) -> Path:
    """A models folder with one tiny model of each kind, some in subfolders, in `layout`."""
    unet, vae, text_encoder = components
    folder = {kind: root / name for kind, name in LAYOUTS[layout].items()}
    for path in folder.values():
        path.mkdir(parents=True)
    (folder["checkpoint"] / "sd15").mkdir()
    shutil.copy(sd1_single_file, folder["checkpoint"] / "sd15" / "tiny.safetensors")
    safetensors.torch.save_file(vae_to_ldm(vae), str(folder["vae"] / "mse.safetensors"))
    (folder["lora"] / "styles").mkdir()
    make_lora(folder["lora"] / "styles" / "ink.safetensors", unet, text_encoder, seed=1)
    safetensors.torch.save_file({"emb_params": torch.randn(2, text_encoder.config.hidden_size)},
                                str(folder["embedding"] / "neg.safetensors"))
    save_controlnet(tiny_controlnet(unet, 3), folder["controlnet"] / "canny.safetensors")
    return root


@pytest.fixture(scope="module", params=list(LAYOUTS))
def models(request, tmp_path_factory, sd1_single_file, sd1_components) -> Path:
    return _models(tmp_path_factory.mktemp(request.param), request.param, sd1_single_file, sd1_components)


@pytest.fixture(scope="module")
def a1111_models(tmp_path_factory, sd1_single_file, sd1_components) -> Path:
    return _models(tmp_path_factory.mktemp("webui-models"), "a1111", sd1_single_file, sd1_components)


def _with_names(root: Path, **changes) -> object:
    base = spec("sd15/tiny")
    return dataclasses.replace(base, paths=PathsConfig(str(root)), **changes)


def test_names_resolve_to_files_in_both_layouts(models) -> None:
    run = _with_names(models, network=NetworkConfig(name="lora", loras=[LoraConfig("ink", 0.5)]))
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, vae="mse.safetensors",
                                                             textual_inversion=["neg"]))
    run = dataclasses.replace(run, guidance=dataclasses.replace(run.guidance, models=["canny"]))
    resolved = resolve_model_names(run)
    where = {kind: models.resolve() / name for kind, name in LAYOUTS[_layout(models)].items()}
    assert resolved.model.checkpoint == str(where["checkpoint"] / "sd15" / "tiny.safetensors")
    assert resolved.model.vae == str(where["vae"] / "mse.safetensors")
    assert resolved.model.textual_inversion == [str(where["embedding"] / "neg.safetensors")]
    assert resolved.network.loras[0].path == str(where["lora"] / "styles" / "ink.safetensors")
    assert resolved.network.loras[0].mul == 0.5
    assert resolved.guidance.models == [str(where["controlnet"] / "canny.safetensors")]


def _layout(root: Path) -> str:
    return "a1111" if (root / "Stable-diffusion").is_dir() else "sdbatch"


def test_an_existing_path_builtin_and_hub_ids_are_kept(models, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("sd15").mkdir()
    Path("sd15/tiny").write_bytes(b"")  # a real file of that name, relative to the working directory, wins
    assert resolve_model_names(_with_names(models)).model.checkpoint == "sd15/tiny"
    for kept in ("builtin:tiny", "someone/some-model"):
        run = _with_names(models)
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, checkpoint=kept))
        assert resolve_model_names(run).model.checkpoint == kept
    unset = dataclasses.replace(_with_names(models), paths=PathsConfig())
    assert resolve_model_names(unset) == unset, "without paths.models nothing changes"


def test_lookup_rules_subfolders_extensions_case_and_ambiguity(tmp_path) -> None:
    lora = tmp_path / "Lora"
    for name in ("a/ink.safetensors", "a/ink.pt", "b/deep/Ink2.safetensors", "b/ink3.ckpt", "c/dup.pt",
                 "d/dup.pt", "notes.txt"):
        (lora / name).parent.mkdir(parents=True, exist_ok=True)
        (lora / name).write_bytes(b"")
    entries = scan(kind_folders(tmp_path, "lora"), "lora")
    assert [e.name for e in entries] == ["a/ink", "a/ink", "b/deep/Ink2", "b/ink3", "c/dup", "d/dup"]
    assert find("ink", entries, "lora").path.name == "ink.safetensors", ".safetensors wins in one folder"
    assert find("a/ink.pt", entries, "lora").path.suffix == ".pt"
    assert find("ink2", entries, "lora").path.name == "Ink2.safetensors", "case differs: still found"
    assert find("b/deep/Ink2", entries, "lora") and find("ink3.ckpt", entries, "lora")
    assert find("nope", entries, "lora") is None
    with pytest.raises(ConfigError, match=r"'dup' matches 2 files: c/dup, d/dup; write the path"):
        find("dup", entries, "lora")
    assert find("c/dup", entries, "lora").path.parent.name == "c"
    for name in ("cn/config.json", "cn/diffusion_pytorch_model.safetensors", "canny.pth"):
        (tmp_path / "controlnet" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "controlnet" / name).write_bytes(b"")
    cn = scan(kind_folders(tmp_path, "controlnet"), "controlnet")
    assert [e.name for e in cn] == ["canny", "cn"], "a diffusers folder is one model, its files are not"
    webui = tmp_path / "webui"  # A1111: embeddings/ beside models/, not in it
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    (webui / "embeddings").mkdir()
    assert kind_folders(webui / "models", "embedding") == [webui / "embeddings"]


def test_a_miss_names_the_key_and_the_closest_names(models) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_model_names(_with_names(models, network=NetworkConfig(name="lora", loras=[LoraConfig("inc")])))
    message = str(caught.value)
    assert message.startswith("network.loras[0].path=inc: no LoRA file named inc in ") and "closest: ink" in message
    assert "\n" not in message
    empty = models.parent / f"{models.name}-empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=r"model.checkpoint=tiny: .*no .* folder there\); there are no checkpoint"):
        resolve_model_names(dataclasses.replace(spec("tiny"), paths=PathsConfig(str(empty))))
    with pytest.raises(ConfigError, match="paths.models: .*/nope is not a folder"):
        resolve_model_names(dataclasses.replace(spec("x"), paths=PathsConfig(str(models / "nope"))))


def test_prompt_tags_fall_back_to_the_models_lora_folder(models) -> None:
    run = _with_names(models)
    jobs = plan(run, [PromptLine("a <lora:ink:0.5>", "", "f:1")], 0)
    _, network = apply_tags(jobs, run.network, str(models))
    assert [Path(lora.path).name for lora in network.loras] == ["ink.safetensors"]
    lines = [PromptLine("a <lora:styles/ink:0.5>", "", "f:1"), PromptLine("b <lora:ink:0.7>", "", "f:2")]
    jobs, network = apply_tags(plan(run, lines, 0), run.network, str(models))
    assert len(network.loras) == 1 and [j.network_muls for j in jobs] == [(0.5,), (0.7,)], "two names, one file"
    with pytest.raises(PromptError, match=r"f:1: <lora:inc>: no LoRA file named inc in paths.models .*closest: ink"):
        apply_tags(plan(run, [PromptLine("a <lora:inc>", "", "f:1")], 0), run.network, str(models))


def test_info_models_lists_each_kind_with_hashes(models, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDBATCH_MODELS", raising=False)
    assert info_command(["+info=models", f"paths.models={models}"]) == 0
    out = capsys.readouterr().out
    folders = LAYOUTS[_layout(models)]
    checkpoint = models / folders["checkpoint"] / "sd15" / "tiny.safetensors"
    lora = models / folders["lora"] / "styles" / "ink.safetensors"
    assert f"checkpoints ({folders['checkpoint']}/): 1" in out
    assert f"  {file_sha256_short(checkpoint)}    sd15/tiny  " in out, out
    assert f"  {addnet_hash(lora)}  styles/ink  " in out
    assert "VAEs (" in out and "embeddings (embeddings/): 1" in out and "ControlNets (" in out and " canny " in out
    monkeypatch.setenv("SDBATCH_MODELS", str(models))  # the config's default: ${oc.env:SDBATCH_MODELS,null}
    assert sdbatch_info(["models"]) == 0 and capsys.readouterr().out == out
    monkeypatch.delenv("SDBATCH_MODELS")
    assert info_command(["+info=models"]) == 2
    assert "paths.models is not set: export SDBATCH_MODELS=DIR" in capsys.readouterr().err


def test_sdbatch_info_on_model_files(models, capsys) -> None:
    folders = LAYOUTS[_layout(models)]
    checkpoint = models / folders["checkpoint"] / "sd15" / "tiny.safetensors"
    assert sdbatch_info([str(checkpoint), str(models / folders["controlnet"] / "canny.safetensors"),
                         str(models / folders["lora"] / "styles" / "ink.safetensors"), str(models / "nope.pt")]) == 2
    captured = capsys.readouterr()
    assert "  kind:             checkpoint (SD 1.x)" in captured.out
    assert f"  short hash:       {file_sha256_short(checkpoint)}" in captured.out
    assert "  kind:             ControlNet" in captured.out and "  kind:             LoRA, " in captured.out
    assert captured.err.strip().splitlines() == [f"sdbatch: error: {models / 'nope.pt'}: no such file"]


def test_a_run_by_name_with_sdbatch_models_set(a1111_models, cache_dir, tmp_path, capsys) -> None:
    """End to end: model.checkpoint=NAME and a <lora:NAME> tag found under SDBATCH_MODELS; the run records the
    files; a wrong name is one line, exit 2; sdbatch-info shows the image's parameters."""
    models = a1111_models
    env = {**os.environ, "SDBATCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SDBATCH_MODELS": str(models), "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "run"
    args = ["model=tiny", "model.checkpoint=sd15/tiny", "prompt='a red cube <lora:ink:0.7>'", "seed=3", "width=64",
            "height=64", "sampler.steps=2", "perf.progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = manifest(run_dir)[0]
    checkpoint = models.resolve() / "Stable-diffusion" / "sd15" / "tiny.safetensors"
    assert line["model"] == "tiny" and line["model_hash"] == file_sha256_short(checkpoint)
    assert line["networks"][0]["file"] == str(models.resolve() / "Lora" / "styles" / "ink.safetensors")
    assert f"checkpoint: {checkpoint}" in (run_dir / "config.yaml").read_text()

    assert sdbatch_info([str(run_dir / line["file"])]) == 0
    out = capsys.readouterr().out
    assert "  A1111 parameters:\n    a red cube <lora:ink:0.7>\n" in out and "Model: tiny" in out
    assert "  sdbatch parameters:\n" in out and "    seed:             3\n" in out
    assert "  other text:\n" in out and "    scale:            7.5\n" in out  # gen_img's own keys

    wrong = subprocess.run([sys.executable, str(ROOT / "run.py"), *args[:1], "model.checkpoint=sd15/tinny",
                            *args[2:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1:] == [
        f"sdbatch: error: model.checkpoint=sd15/tinny: no checkpoint file named sd15/tinny in "
        f"{models.resolve() / 'Stable-diffusion'}; closest: sd15/tiny"], wrong.stderr


def test_sdbatch_info_is_a_console_script(capsys) -> None:
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["sdbatch-info"]
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert sdbatch_info([]) == 2 and "usage: sdbatch-info models" in capsys.readouterr().out
    assert sdbatch_info(["--help"]) == 0

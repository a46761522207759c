"""ControlNet files: the three formats load to the same model, misfits and bad files are refused in one line,
loads are cached per model, and the built-in tiny ControlNet is built once and always the same."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from controlnet_files import tiny_controlnet, write_all_formats
from lora_files import make_lora

from sdbatch.engine.models import controlnet_files as loader
from sdbatch.engine.models.checkpoint import file_sha256_short, read_state_dict
from sdbatch.engine.models.controlnet_files import TINY_CONTROLNET, load_controlnet
from sdbatch.engine.models.convert import controlnet_config, strip
from sdbatch.engine.models.export import controlnet_to_ldm, save_controlnet, unet_to_ldm
from sdbatch.engine.models.loading import TINY_SOURCE, clear_model_cache, load_models
from sdbatch.errors import ModelError

torch.set_num_threads(1)

CPU = torch.device("cpu")
FP32 = {"device": CPU, "dtype": torch.float32, "vae_dtype": torch.float32}
KEY = "guidance.models[0]"
# The config entries a ControlNet's shapes must give back as they were.
FIELDS = ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
          "use_linear_projection", "conditioning_embedding_out_channels", "conditioning_channels", "in_channels",
          "upcast_attention")
KINDS = {"original": "original", "original_pth": "original", "difference": "difference", "diffusers": "diffusers",
         "diffusers_bin": "diffusers"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private sdbatch cache (model hashes, built-in files) for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cn-cache")
        mp.setenv("SDBATCH_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def sd1(sd1_single_file, cache):
    return load_models(str(sd1_single_file), **FP32)


@pytest.fixture(scope="module")
def cn(sd1_components):
    return tiny_controlnet(sd1_components[0], seed=1)


@pytest.fixture(scope="module")
def files(cn, sd1_components, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cn-files")
    found = write_all_formats(cn, sd1_components[0], folder)
    cn.save_pretrained(folder / "cn-bin", safe_serialization=False)  # a pickled diffusion_pytorch_model.bin
    return {**found, "diffusers_bin": folder / "cn-bin"}


def _outputs(model, seed: int = 0) -> list[torch.Tensor]:
    """The ControlNet's down and mid residuals for a seeded random latent, text and hint."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    sample = torch.randn(2, config.in_channels, 8, 8, generator=gen)
    text = torch.randn(2, 5, config.cross_attention_dim, generator=gen)
    hint = torch.rand(2, config.conditioning_channels, 64, 64, generator=gen)
    with torch.no_grad():
        down, mid = model(sample, torch.tensor([10, 500]), text, hint, return_dict=False)
    return [*down, mid]


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def _error(path, bundle, key: str = KEY) -> str:
    with pytest.raises(ModelError) as info:
        load_controlnet(str(path), bundle, key)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}")
    return message


@pytest.mark.parametrize("fmt", list(KINDS))
def test_every_format_loads_the_same_controlnet(fmt, files, cn, sd1):
    loaded = load_controlnet(str(files[fmt]), sd1, KEY)
    weights = files[fmt] / "diffusion_pytorch_model.safetensors" if fmt == "diffusers" else files[fmt]
    weights = files[fmt] / "diffusion_pytorch_model.bin" if fmt == "diffusers_bin" else weights
    assert (loaded.kind, loaded.name, loaded.file) == (KINDS[fmt], files[fmt].stem, str(files[fmt].resolve()))
    assert loaded.hash == file_sha256_short(weights) and len(loaded.hash) == 10
    state, expected = loaded.model.state_dict(), cn.state_dict()
    assert state.keys() == expected.keys()
    torch.testing.assert_close(state, expected, atol=1e-6, rtol=0)  # a difference file: fp32 rounding only
    assert {k: _plain(loaded.model.config[k]) for k in FIELDS} == {k: _plain(cn.config[k]) for k in FIELDS}
    torch.testing.assert_close(_outputs(loaded.model), _outputs(cn), atol=1e-5, rtol=1e-5)
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_sd2_controlnet_loads_on_sd2_with_its_config(sd2_components, sd2_single_file, tmp_path):
    unet = sd2_components[0]
    cn2 = tiny_controlnet(unet, seed=3)
    path = save_controlnet(cn2, tmp_path / "cn-sd2.safetensors")
    config = controlnet_config(strip(read_state_dict(path), "control_model."), "cn-sd2")
    assert {k: _plain(config[k]) for k in FIELDS} == {k: _plain(cn2.config[k]) for k in FIELDS}
    loaded = load_controlnet(str(path), load_models(str(sd2_single_file), **FP32), KEY)
    torch.testing.assert_close(loaded.model.state_dict(), cn2.state_dict(), atol=0, rtol=0)
    torch.testing.assert_close(_outputs(loaded.model), _outputs(cn2), atol=1e-5, rtol=1e-5)


def test_placed_on_the_unet_dtype(sd1_single_file, files):
    bundle = load_models(str(sd1_single_file), device=CPU, dtype=torch.bfloat16, vae_dtype=torch.float32)
    model = load_controlnet(str(files["original"]), bundle, KEY).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {CPU}


def test_original_layout_keys(cn, sd1_components, files):
    state = controlnet_to_ldm(cn)
    for key in ("input_blocks.0.0.weight", "time_embed.2.bias", "zero_convs.0.0.weight", "middle_block_out.0.bias",
                "input_hint_block.0.weight", "input_hint_block.12.weight", "input_hint_block.14.weight",
                "middle_block.1.proj_in.weight", "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"):
        assert "control_model." + key in state
    assert len(state) == len(cn.state_dict())
    diff = read_state_dict(files["difference"])
    base = unet_to_ldm(sd1_components[0])["middle_block.0.in_layers.2.weight"]
    key = "control_model.middle_block.0.in_layers.2.weight"
    assert "difference" in diff and torch.equal(diff[key], state[key] - base)
    assert torch.equal(diff["control_model.zero_convs.0.0.weight"], state["control_model.zero_convs.0.0.weight"])


def test_keys_without_prefix_load(cn, sd1, tmp_path):
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(strip(controlnet_to_ldm(cn), "control_model."), str(path))
    torch.testing.assert_close(load_controlnet(str(path), sd1, KEY).model.state_dict(), cn.state_dict())


def test_sd2_controlnet_on_sd1_model_is_refused(sd2_components, sd1, tmp_path):
    path = save_controlnet(tiny_controlnet(sd2_components[0], seed=3), tmp_path / "cn-sd2.safetensors")
    message = _error(path, sd1, "guidance.models[1]")
    assert message == (f"guidance.models[1]={path} is a ControlNet for SD2 (context 64), but the model is SD1 "
                       "(context 32); use a ControlNet trained for SD1")


def test_other_width_is_refused(sd1, tmp_path):
    from sdbatch.engine.models.tiny import build_tiny_components

    wide = build_tiny_components("sd1", 0, unet={"block_out_channels": (64, 64)})[0]
    path = save_controlnet(tiny_controlnet(wide, seed=0), tmp_path / "wide.safetensors")
    assert "does not fit the model's UNet: its widths [64, 64] x1 blocks, the UNet's [32, 64] x1" in _error(path, sd1)


def test_original_layout_sdxl_and_sdxl_configs_on_sd1_are_refused(cn, sd1, files, tmp_path):
    path = tmp_path / "xl.safetensors"
    extra = {"control_model.label_emb.0.0.weight": torch.zeros(4, 4)}
    safetensors.torch.save_file({**controlnet_to_ldm(cn), **extra}, str(path))
    assert "is an SDXL ControlNet in the original (non-diffusers) layout, which sdbatch does not read; use a " \
           "diffusers-format SDXL ControlNet" in _error(path, sd1)
    folder = tmp_path / "xl-diffusers"
    cn.save_pretrained(folder)
    config = (folder / "config.json").read_text().replace('"addition_embed_type": null', '"addition_embed_type": '
                                                          '"text_time"')
    (folder / "config.json").write_text(config)
    assert "is a ControlNet for SDXL (context 32), but the model is SD1" in _error(folder, sd1)


def test_diffusers_single_file_loads_like_its_folder(cn, sd1, files, tmp_path):
    path = tmp_path / "cn-weights.safetensors"
    safetensors.torch.save_file(cn.state_dict(), str(path))
    loaded = load_controlnet(str(path), sd1, KEY)
    assert loaded.kind == "diffusers"
    torch.testing.assert_close(loaded.model.state_dict(), load_controlnet(str(files["diffusers"]), sd1,
                                                                          KEY).model.state_dict(), atol=0, rtol=0)
    assert {k: _plain(loaded.model.config[k]) for k in FIELDS} == {k: _plain(cn.config[k]) for k in FIELDS}


@pytest.mark.parametrize("what", ["lora", "checkpoint"])
def test_a_file_that_is_not_a_controlnet_is_refused(what, cn, sd1, sd1_components, sd1_single_file, tmp_path):
    if what == "lora":
        path, hint = make_lora(tmp_path / "style.safetensors", sd1_components[0]), "it is a LoRA"
    else:
        path, hint = sd1_single_file, "it is a whole Stable Diffusion checkpoint"
    message = _error(path, sd1)
    assert message.startswith(f"{KEY}={path} is not a ControlNet: no control_model.* keys; ") and hint in message


def test_missing_and_folder_without_config(sd1, tmp_path):
    assert _error(tmp_path / "nope.safetensors", sd1) == (
        f"{KEY}={tmp_path / 'nope.safetensors'}: no such file; give a ControlNet .safetensors/.pth file or a "
        "diffusers ControlNet folder")
    (tmp_path / "empty").mkdir()
    message = _error(tmp_path / "empty", sd1)
    assert "is a folder without config.json (not a diffusers ControlNet); it is empty" in message
    assert "unknown; the built-in ControlNet is builtin:tiny" in _error("builtin:nope", sd1)


@pytest.mark.parametrize("fmt", ["original", "original_pth"])
def test_truncated_file_is_refused(fmt, files, sd1, tmp_path):
    data = files[fmt].read_bytes()
    path = tmp_path / f"cut{files[fmt].suffix}"
    path.write_bytes(data[: len(data) // 2])
    message = _error(path, sd1)
    assert f"{KEY}: {path} is not a valid" in message and "(truncated or corrupt?)" in message


class _RunsCommand:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pth_is_refused_without_running_it(cn, sd1, tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": controlnet_to_ldm(cn), "x": _RunsCommand(str(target))}, path)
    assert "it contains code, not just tensors (it would call posix.system (os.system))" in _error(path, sd1)
    folder = tmp_path / "evil-folder"
    cn.save_pretrained(folder, safe_serialization=False)
    torch.save({**cn.state_dict(), "x": _RunsCommand(str(target))}, folder / "diffusion_pytorch_model.bin")
    assert "refusing to load" in _error(folder, sd1)
    assert not target.exists()


def test_loaded_once_per_bundle(files, sd1_single_file, monkeypatch):
    bundle = load_models(str(sd1_single_file), **FP32)
    first = load_controlnet(str(files["original"]), bundle, KEY)

    def no_reads(path):
        raise AssertionError(f"{path} was read again")

    with monkeypatch.context() as mp:
        mp.setattr(loader, "read_state_dict", no_reads)
        assert load_controlnet(str(files["original"]), bundle, "guidance.models[1]") is first
    clear_model_cache()  # the model is loaded again: a new bundle, with its own ControlNets
    again = load_models(str(sd1_single_file), **FP32)
    assert again is not bundle and not again.controlnets
    assert load_controlnet(str(files["original"]), again, KEY) is not first


def test_builtin_tiny_is_built_once_and_always_the_same(tmp_path, monkeypatch, sd1):
    weights = []
    for cache in ("a", "b"):
        monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path / cache))
        bundle = load_models(TINY_SOURCE, **FP32)
        loaded = load_controlnet(TINY_CONTROLNET, bundle, KEY)
        assert Path(loaded.file) == tmp_path / cache / "tiny-controlnet-v1.safetensors"
        stamp = Path(loaded.file).stat().st_mtime_ns
        assert load_controlnet(TINY_CONTROLNET, bundle, KEY) is loaded
        bundle.controlnets.clear()  # loading again reads the same file: it is not rebuilt
        assert load_controlnet(TINY_CONTROLNET, bundle, KEY).hash == loaded.hash
        assert Path(loaded.file).stat().st_mtime_ns == stamp
        weights.append(loaded.model.state_dict())
    # The tensors, not the file hash: safetensors writes its metadata in hash-map order, which varies by process.
    torch.testing.assert_close(weights[0], weights[1], atol=0, rtol=0)
    assert (loaded.kind, loaded.name) == ("original", "tiny-controlnet-v1")
    zero_convs = [p for m in loaded.model.controlnet_down_blocks for p in m.parameters()]
    assert all(p.abs().max() > 0 for p in zero_convs)  # it acts: its outputs are not zero convolutions
    assert all(out.abs().max() > 0 for out in _outputs(loaded.model))
    message = _error(TINY_CONTROLNET, sd1)
    assert "builtin:tiny is the tiny ControlNet of model=tiny and model=tiny_xl, not of tiny-sd1" in message

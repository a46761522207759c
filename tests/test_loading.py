"""Model loading: single-file conversion both ways, safe reading, folders, separate VAE, cache, tiny model."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel

from sdbatch.engine.models import loading
from sdbatch.engine.models.checkpoint import file_sha256_short, read_state_dict
from sdbatch.engine.models.convert import OPENCLIP_PREFIX, convert_checkpoint
from sdbatch.engine.models.export import (
    clip_to_ldm,
    openclip_to_ldm,
    save_single_file,
    to_ldm_state_dict,
    unet_to_ldm,
    vae_to_ldm,
)
from sdbatch.engine.models.loading import clear_model_cache, load_count, load_models, set_attention
from sdbatch.engine.models.tiny import build_tiny_components, ensure_tiny_checkpoint, tiny_checkpoint_path
from sdbatch.errors import ModelError

CPU = torch.device("cpu")
FP32 = {"device": CPU, "dtype": torch.float32, "vae_dtype": torch.float32}

# Non-standard layouts the converter can only get right by reading shapes: three levels, two resnets and
# two transformer blocks per level, an inpainting input (9 channels), a wider 3-layer text encoder, a
# 3-level VAE with 8 latent channels.
WIDE = {
    "unet": {
        "block_out_channels": (32, 64, 96),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 2,
        "transformer_layers_per_block": 2,
        "in_channels": 9,
    },
    "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3},
    "vae": {
        "block_out_channels": (32, 64, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 2,
        "latent_channels": 8,
    },
}
WIDE_SD2 = {
    **WIDE,
    "unet": {**WIDE["unet"], "block_out_channels": (64, 128, 192), "attention_head_dim": (1, 2, 3)},
}


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def assert_same_models(components: tuple, bundle: loading.ModelBundle) -> None:
    for module, loaded in zip(components, (bundle.unet, bundle.vae, bundle.text_encoder), strict=True):
        assert_same_weights(module, loaded)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("sd1", {}), ("sd2", {}), ("sd1", WIDE), ("sd2", WIDE_SD2)],
    ids=["sd1", "sd2", "sd1-wide", "sd2-wide"],
)
def test_export_then_convert_is_bit_exact(family, overrides):
    components = build_tiny_components(family, seed=3, **overrides)
    unet, vae, text_encoder, found = convert_checkpoint(to_ldm_state_dict(*components, family), "x")
    assert found == family
    for module, loaded in zip(components, (unet, vae, text_encoder), strict=True):
        assert_same_weights(module, loaded)
    for key in (
        "in_channels",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "down_block_types",
    ):
        assert list(np.ravel(unet.config[key])) == list(np.ravel(components[0].config[key])), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert list(np.ravel(vae.config[key])) == list(np.ravel(components[1].config[key])), key
    channels = unet.config.block_out_channels
    assert unet.config.attention_head_dim == (8 if family == "sd1" else [c // 64 for c in channels])
    assert unet.config.use_linear_projection == (family == "sd2")
    assert text_encoder.config.hidden_act == ("gelu" if family == "sd2" else "quick_gelu")
    assert text_encoder.config.num_attention_heads == max(1, text_encoder.config.hidden_size // 64)


def _real_layout(family: str) -> tuple:
    """Full-size SD1.5 / SD2.x modules on the meta device: real shapes, no memory, no init."""
    sd2 = family == "sd2"
    text = CLIPTextConfig(
        hidden_size=1024 if sd2 else 768,
        intermediate_size=4096 if sd2 else 3072,
        num_hidden_layers=23 if sd2 else 12,
        num_attention_heads=16 if sd2 else 12,
        hidden_act="gelu" if sd2 else "quick_gelu",
    )
    vae = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
    with torch.device("meta"):
        return (
            UNet2DConditionModel(
                cross_attention_dim=text.hidden_size,
                attention_head_dim=[5, 10, 20, 20] if sd2 else 8,
                use_linear_projection=sd2,
            ),
            AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **vae
            ),
            CLIPTextModel(text),
        )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_sd_layouts_are_read_from_shapes(family):
    unet, vae, text_encoder = _real_layout(family)
    text = clip_to_ldm(text_encoder) if family == "sd1" else openclip_to_ldm(text_encoder)
    prefix = "cond_stage_model.transformer.text_model." if family == "sd1" else OPENCLIP_PREFIX
    state = {
        **{"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet).items()},
        **{"first_stage_model." + k: v for k, v in vae_to_ldm(vae).items()},
        **{prefix + k: v for k, v in text.items()},
    }
    converted = convert_checkpoint(state, "real")
    for module, loaded in zip((unet, vae, text_encoder), converted, strict=False):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == expected
    assert converted[0].config.attention_head_dim == unet.config.attention_head_dim
    assert converted[2].config.num_attention_heads == text_encoder.config.num_attention_heads


def test_sd2_export_looks_like_a_real_sd2_file(sd2_components):
    state = to_ldm_state_dict(*sd2_components, "sd2")
    layers, width = sd2_components[2].config.num_hidden_layers, sd2_components[2].config.hidden_size
    blocks = {k.split(".")[4] for k in state if k.startswith(OPENCLIP_PREFIX + "transformer.resblocks.")}
    assert len(blocks) == layers + 1  # the extra last block, dropped again on load
    assert state[OPENCLIP_PREFIX + "text_projection"].shape == (width, width)
    assert state[OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)


def test_single_files_load_bit_exact(sd1_components, sd1_single_file, sd1_ckpt):
    for path in (sd1_single_file, sd1_ckpt):
        bundle = load_models(str(path), **FP32)
        assert_same_models(sd1_components, bundle)
        assert (bundle.family, bundle.in_channels, bundle.model_name) == ("sd1", 4, "tiny-sd1")
        assert bundle.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        assert bundle.tokenizer.pad_id == bundle.tokenizer.eos_id == 49407
        assert not any(p.requires_grad for p in bundle.unet.parameters()) and not bundle.unet.training


def test_ckpt_nested_state_dict_is_unwrapped(sd1_ckpt, sd1_single_file):
    assert torch.load(sd1_ckpt, weights_only=True).keys() == {"state_dict"}
    from_ckpt, from_safetensors = read_state_dict(sd1_ckpt), read_state_dict(sd1_single_file)
    assert from_ckpt.keys() == from_safetensors.keys()


class _WritesFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


class _RunsCommand:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [_WritesFile, _RunsCommand])
def test_malicious_ckpt_is_refused_without_running_it(tmp_path, payload, zipped):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    evil = {"state_dict": {"w": torch.zeros(1)}, "x": payload(str(target))}
    torch.save(evil, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ModelError, match=r"refusing to load .*evil\.ckpt: it contains code.*safetensors"):
        load_models(str(path), **FP32)
    assert not target.exists()


def test_lightning_ckpt_metadata_loads_without_lightning(tmp_path, monkeypatch):
    # Original SD1 .ckpt files pickle Lightning's ModelCheckpoint class and numpy scalars beside the weights.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    names.append(names[-1] + ".model_checkpoint")
    fakes = {name: types.ModuleType(name) for name in names}
    lightning_class = type("ModelCheckpoint", (), {"__module__": names[-1]})
    fakes[names[-1]].ModelCheckpoint = lightning_class
    with monkeypatch.context() as patch:  # the fake Lightning exists only while saving
        for name, module in fakes.items():
            patch.setitem(sys.modules, name, module)
        meta = {lightning_class: {"best_model_score": np.float64(0.5)}}
        torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": meta}, tmp_path / "old.ckpt")
    assert names[-1] not in sys.modules
    assert torch.equal(read_state_dict(tmp_path / "old.ckpt")["w"], torch.ones(2))


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_truncated_file_is_named(tmp_path, sd1_single_file, sd1_ckpt, kind):
    source = sd1_single_file if kind == "safetensors" else sd1_ckpt
    path = tmp_path / f"cut.{kind}"
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    what = "safetensors file" if kind == "safetensors" else "PyTorch checkpoint"
    with pytest.raises(ModelError, match=rf"cut\.{kind} is not a valid {what} \(truncated or corrupt\?\)"):
        load_models(str(path), **FP32)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (None, r"not a Stable Diffusion checkpoint: no UNet keys \(model\.diffusion_model\.\*\) found"),
        ("first_stage_model.", r"no VAE keys \(first_stage_model\.\*\); give a separate VAE with model\.vae"),
        ("cond_stage_model.", r"no text encoder keys \(cond_stage_model\.transformer\.\* or"),
    ],
)
def test_missing_parts_are_named(tmp_path, sd1_single_file, drop, message):
    state = read_state_dict(sd1_single_file)
    state = (
        {"foo.weight": torch.ones(3)} if drop is None else {k: v for k, v in state.items() if drop not in k}
    )
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(ModelError, match=r"partial\.safetensors.*" + message):
        load_models(str(path), **FP32)


def test_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="is not a file, a folder or a cached hub model; download it first"):
        load_models(str(tmp_path / "nothing.safetensors"), **FP32)
    with pytest.raises(
        ModelError, match="'sdbatch-tests/not-cached' is not a file, a folder or a cached hub"
    ):
        load_models("sdbatch-tests/not-cached", **FP32)
    with pytest.raises(ModelError, match="does not exist"):
        read_state_dict(tmp_path / "nothing.ckpt")
    with pytest.raises(ModelError, match="not a diffusers model"):
        load_models(str(tmp_path), **FP32)


def test_diffusers_folder_equals_single_file(sd1_components, sd1_diffusers_dir, sd1_single_file):
    folder = load_models(str(sd1_diffusers_dir), **FP32)
    single = load_models(str(sd1_single_file), **FP32)
    assert_same_models(sd1_components, folder)
    for a, b in (
        (folder.unet, single.unet),
        (folder.vae, single.vae),
        (folder.text_encoder, single.text_encoder),
    ):
        assert_same_weights(a, b)
    assert (folder.family, folder.model_name, folder.tokenizer.pad_id) == ("sd1", "tiny-sd1-diffusers", 49407)
    unet_file = sd1_diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert folder.model_hash == file_sha256_short(unet_file)


def test_cached_hub_model_loads_offline(tmp_path, monkeypatch, sd1_components, sd1_diffusers_dir):
    import huggingface_hub.constants

    repo = tmp_path / "models--sdbatch-tests--tiny-hub"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(sd1_diffusers_dir, repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    bundle = load_models("sdbatch-tests/tiny-hub", **FP32)
    assert_same_models(sd1_components, bundle)
    assert bundle.model_name == "tiny-hub"


@pytest.fixture(scope="module")
def other_vae():
    """A VAE that differs from the fixtures' one (another seed), to see that model.vae replaces it."""
    return build_tiny_components("sd1", seed=1)[1]


@pytest.mark.parametrize("layout", ["checkpoint", "prefixed", "bare", "vae_folder", "model_folder"])
def test_separate_vae(tmp_path, sd1_single_file, sd1_components, other_vae, layout):
    bare = {k: v.contiguous() for k, v in vae_to_ldm(other_vae).items()}
    if layout == "checkpoint":  # the VAE of another whole checkpoint
        unet, _, text_encoder = sd1_components
        vae_path = save_single_file(tmp_path / "other.safetensors", unet, other_vae, text_encoder, "sd1")
    elif layout in ("prefixed", "bare"):
        vae_path = tmp_path / f"vae-{layout}.safetensors"
        prefix = "first_stage_model." if layout == "prefixed" else ""
        safetensors.torch.save_file({prefix + k: v for k, v in bare.items()}, str(vae_path))
    else:
        vae_path = tmp_path / "folder"
        other_vae.save_pretrained(vae_path if layout == "vae_folder" else vae_path / "vae")
    bundle = load_models(str(sd1_single_file), vae=str(vae_path), **FP32)
    assert_same_weights(other_vae, bundle.vae)
    assert_same_weights(sd1_components[0], bundle.unet)
    assert bundle.vae_name == vae_path.name and len(bundle.vae_hash) == 10


def test_v2_override_must_agree_with_the_weights(sd1_single_file, sd2_single_file, sd1_diffusers_dir):
    with pytest.raises(ModelError, match=r"model\.v2=true but .*tiny-sd1\.safetensors has an SD1 \(CLIP\)"):
        load_models(str(sd1_single_file), v2="true", **FP32)
    with pytest.raises(
        ModelError, match=r"model\.v2=false but .*tiny-sd2\.safetensors has an SD2 \(OpenCLIP\)"
    ):
        load_models(str(sd2_single_file), v2="false", **FP32)
    with pytest.raises(ModelError, match=r"model\.v2=true but .*tiny-sd1-diffusers is an SD1 model"):
        load_models(str(sd1_diffusers_dir), v2="true", **FP32)
    assert load_models(str(sd2_single_file), v2="true", **FP32).family == "sd2"


def test_sd2_is_detected_with_its_tokenizer(sd2_components, sd2_single_file):
    bundle = load_models(str(sd2_single_file), **FP32)
    assert bundle.family == "sd2"
    assert bundle.tokenizer.pad_id == 0  # "!" pads SD2 prompts
    assert bundle.text_encoder.config.num_hidden_layers == sd2_components[2].config.num_hidden_layers
    assert_same_models(sd2_components, bundle)


def test_second_load_comes_from_the_cache(sd1_single_file):
    clear_model_cache()
    first = load_models(str(sd1_single_file), **FP32)
    count = load_count()
    assert load_models(str(sd1_single_file), **FP32) is first
    assert load_count() == count
    other_dtype = load_models(str(sd1_single_file), device=CPU, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert load_count() == count + 1 and other_dtype.unet.dtype == torch.bfloat16
    assert other_dtype.vae.dtype == torch.float32
    clear_model_cache()
    assert load_models(str(sd1_single_file), **FP32) is not first


def test_tiny_checkpoint_is_built_once_and_loaded_as_a_single_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path))
    path = ensure_tiny_checkpoint()
    assert path == tiny_checkpoint_path() == tmp_path / "tiny-sd1.safetensors"
    assert 1_000_000 < path.stat().st_size < 10_000_000
    stamp = path.stat().st_mtime_ns
    assert ensure_tiny_checkpoint() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    read = []
    monkeypatch.setattr(loading, "read_state_dict", lambda p: read.append(p) or read_state_dict(p))
    bundle = load_models("builtin:tiny", **FP32)
    assert read == [path] and bundle.source == str(path) and bundle.model_name == "tiny-sd1"
    expected = [m.half().float() for m in build_tiny_components("sd1", 0)]  # the file stores fp16
    assert_same_models(tuple(expected), bundle)


def test_tiny_models_give_non_degenerate_outputs(sd1_single_file):
    bundle = load_models(str(sd1_single_file), **FP32)
    ids = torch.tensor([bundle.tokenizer.encode_padded("a red cube")[0]])
    with torch.no_grad():
        context = bundle.text_encoder(ids).last_hidden_state  # (1, 77, 32)
        eps = bundle.unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=context).sample
        image = bundle.vae.decode(torch.randn(1, 4, 8, 8)).sample  # (1, 3, 64, 64)
    assert image.shape == (1, 3, 64, 64)
    for out in (context, eps, image):
        assert torch.isfinite(out).all() and out.std() > 1e-3


def test_set_attention(sd1_single_file, caplog, monkeypatch):
    bundle = load_models(str(sd1_single_file), **FP32)
    set_attention(bundle, "eager")
    assert all(isinstance(p, AttnProcessor) for p in bundle.unet.attn_processors.values())
    monkeypatch.setattr(loading, "_xformers_available", lambda: False)
    monkeypatch.setattr(loading, "_warned_xformers", False)
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        set_attention(bundle, "xformers")
        set_attention(bundle, "xformers")
    assert [r.getMessage() for r in caplog.records] == [
        "xformers is not installed; using SDPA <perf.attention=xformers>"
    ]
    for module in (bundle.unet, bundle.vae):
        assert all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values())


def test_model_hash_is_remembered_across_processes(tmp_path, monkeypatch) -> None:
    from sdbatch.engine.models import checkpoint

    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"some model bytes")
    expected = hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert file_sha256_short(model) == expected
    checkpoint._hash_cache.clear()  # a new process: only the file cache remains
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: pytest.fail("hashed again"))
    assert file_sha256_short(model) == expected
    os.utime(model, ns=(1, 1))  # a changed file is hashed again
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: "f" * 64)
    assert file_sha256_short(model) == "f" * 10

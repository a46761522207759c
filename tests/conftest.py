"""Shared test fixtures: tiny seeded SD1/SD2/SDXL models as modules, single files and a diffusers folder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers read it: tests never download

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sdbatch.engine.models.export import save_diffusers_folder, save_single_file  # noqa: E402
from sdbatch.engine.models.tiny import build_tiny_components  # noqa: E402

# One thread keeps CPU timings steady and the suite fast on shared machines.
torch.set_num_threads(1)

SEED = 0  # every fixture below is built from this seed, so files and folder hold identical weights


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A private SDBATCH_CACHE for command-line runs, so the built-in tiny model is built by the test run itself."""
    return tmp_path_factory.mktemp("sdbatch-cache")


@pytest.fixture(scope="session")
def sd1_components():
    """(unet, vae, text_encoder): tiny SD1-layout diffusers modules from seed 0. Shared: do not modify."""
    return build_tiny_components("sd1", SEED)


@pytest.fixture(scope="session")
def sd2_components():
    """(unet, vae, text_encoder): tiny SD2-layout modules (linear proj, gelu) from seed 0. Do not modify."""
    return build_tiny_components("sd2", SEED)


@pytest.fixture(scope="session")
def sdxl_components():
    """(unet, vae, text_encoder, text_encoder_2): the tiny SDXL twin from seed 0. Shared: do not modify."""
    return build_tiny_components("sdxl", SEED)


@pytest.fixture(scope="session")
def sdxl_file(tmp_path_factory, sdxl_components) -> Path:
    """Path of ``sdxl_components`` as an original-layout SDXL .safetensors single file."""
    unet, vae, text, text_2 = sdxl_components
    path = tmp_path_factory.mktemp("sdxl_file") / "tiny-sdxl.safetensors"
    return save_single_file(path, unet, vae, text, "sdxl", text_encoder_2=text_2)


@pytest.fixture(scope="session")
def sd1_single_file(tmp_path_factory, sd1_components) -> Path:
    """Path of ``sd1_components`` saved as an original-layout .safetensors single file."""
    path = tmp_path_factory.mktemp("sd1_file") / "tiny-sd1.safetensors"
    return save_single_file(path, *sd1_components, "sd1")


@pytest.fixture(scope="session")
def sd1_ckpt(tmp_path_factory, sd1_components) -> Path:
    """Path of ``sd1_components`` saved as a .ckpt holding ``{"state_dict": ...}`` (Lightning style)."""
    path = tmp_path_factory.mktemp("sd1_ckpt") / "tiny-sd1.ckpt"
    return save_single_file(path, *sd1_components, "sd1")


@pytest.fixture(scope="session")
def sd2_single_file(tmp_path_factory, sd2_components) -> Path:
    """Path of ``sd2_components`` as an SD2 .safetensors (OpenCLIP keys, one extra last text block)."""
    path = tmp_path_factory.mktemp("sd2_file") / "tiny-sd2.safetensors"
    return save_single_file(path, *sd2_components, "sd2")


@pytest.fixture(scope="session")
def sd1_diffusers_dir(tmp_path_factory, sd1_components) -> Path:
    """A diffusers StableDiffusionPipeline folder of ``sd1_components`` (same weights as ``sd1_single_file``).

    Holds unet/, vae/, text_encoder/, tokenizer/ (offline CLIP tokenizer), scheduler/ (SD's DDIM config)
    and model_index.json without safety checker, so ``StableDiffusionPipeline.from_pretrained`` loads it.
    """
    root = tmp_path_factory.mktemp("sd1_dir") / "tiny-sd1-diffusers"
    return save_diffusers_folder(root, *sd1_components, "sd1")

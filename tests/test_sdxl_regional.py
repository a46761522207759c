"""Attention Couple (A AND B) and regional LoRA (network.regional) on SDXL, on the tiny SDXL twin (tiny_xl): one
part equals the plain image, the prompt rows' pooled embedding is the last part's (the reference's choice), masks,
batching, the features it combines with (ControlNet and ControlNet-LLLite included), SDXL LoRA bound to regions
(both text encoders), and run.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import halves, max_diff, run_images, spec
from PIL import Image
from sdxl_net_files import kohya_sdxl_lora

from sdbatch.config.regions_schema import RegionsConfig
from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.features.lora_network import module_map
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

S = 64
A, B = "a photo of a red fire truck", "a green forest with tall trees"
XL = "builtin:tiny_xl"
ROOT = Path(__file__).resolve().parents[1]
NO_PIXELS = ("time_embed", "label_emb", "emb_layers")  # layers whose outputs are (rows, C)


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("xlmasks")
    red, green = (255, 0, 0), (0, 255, 0)
    return {"rg": halves(folder / "rg.png", red, green), "red": halves(folder / "red.png", red, red),
            "r_only": halves(folder / "r.png", red, (0, 0, 0))}


@pytest.fixture(scope="module")
def xl_engine():
    run_spec = spec(XL)
    return get_engine(run_spec.model, run_spec.perf)


@pytest.fixture(scope="module")
def loras(xl_engine, tmp_path_factory) -> dict[str, Path]:
    """kohya SDXL LoRA files for tiny_xl: every layer (lora_te1_, lora_te2_, lora_unet_, the time and size
    embeddings included), and a UNet-only one."""
    bundle, folder = xl_engine.bundle, tmp_path_factory.mktemp("xlloras")
    names = module_map(bundle.unet, bundle.text_encoder, bundle.text_encoder_2)
    unet_only = {n: m for n, m in names.items() if n.startswith("lora_unet_")}
    kept = {n: m for n, m in names.items() if not any(x in n for x in NO_PIXELS)}
    return {"all": kohya_sdxl_lora(folder / "xl-all.safetensors", names, scale=0.15),
            "kohya": kohya_sdxl_lora(folder / "xl-kohya.safetensors", kept, scale=0.15),
            "unet": kohya_sdxl_lora(folder / "xl-unet.safetensors", unet_only, scale=0.15, seed=1)}


def image(prompt: str, mask: str | None = None, seed: int = 3, negative_scale: float | None = None) -> np.ndarray:
    """One tiny_xl image through the engine (outside a run), with its region mask."""
    run_spec = spec(XL, steps=6)
    run_spec = dataclasses.replace(run_spec, sampler=dataclasses.replace(run_spec.sampler,
                                                                         negative_scale=negative_scale))
    job = dataclasses.replace(plan(run_spec, [PromptLine(prompt, "blurry", "test")], 0)[0], seed=seed,
                              region_mask=mask)
    engine = get_engine(run_spec.model, run_spec.perf)
    return np.asarray(engine.run_batch(Batch(BatchKey.of(job), (job,)))[0]).astype(float)


def _run(tmp: Path, name: str, sampler: str = "ddim", cfg: float = 7.5, **top) -> tuple[list[np.ndarray], list[dict]]:
    return run_images(spec(XL, steps=6, sampler=sampler, cfg=cfg, **top), tmp / name)


def _net(path: Path, regional: bool, mul: float = 1.0) -> NetworkConfig:
    return NetworkConfig(name="lora", loras=[LoraConfig(path=str(path), mul=mul)], regional=regional)


# ---------------------------------------------------------------- the text and the pooled embedding


@pytest.mark.parametrize("negative_scale", [None, 4.0])
def test_a_and_a_equals_a(negative_scale) -> None:
    plain = image(A, negative_scale=negative_scale)
    assert max_diff([image(f"{A} AND {A}", negative_scale=negative_scale)], [plain]) <= 1


def test_the_pooled_embedding_is_the_last_parts() -> None:
    """A part of weight 0 adds nothing to the cross-attention, so `B :0 AND A` is `A` (its pooled is A's), while
    `A AND B :0` keeps A's cross-attention but takes B's pooled embedding: a different image."""
    plain = image(A)
    assert max_diff([image(f"{B} :0 AND {A}")], [plain]) <= 1
    assert max_diff([image(f"{A} AND {B} :0")], [plain]) > 8


def test_size_options_reach_a_couple(tmp_path) -> None:
    """The image's size values (time ids) go with every row of a couple call, as without AND."""
    sizes = " --ow 256 --oh 32 --nw 48 --d 9"
    images, lines = _run(tmp_path, "sizes", prompt=[f"{A} AND {A}{sizes}", f"{A}{sizes}", f"{A} AND {A} --d 9"], seed=4,
                         batch_size=3)
    assert max_diff(images[:1], images[1:2]) <= 1 and max_diff(images[:1], images[2:]) > 3
    assert lines[0]["regions"] is not None


def test_a_full_region_and_an_empty_one(masks) -> None:
    """Part 1 red everywhere, part 2's green channel empty: an empty region covers the whole image (README), so
    this is the unmasked couple; a real split differs from both."""
    unmasked = image(f"{A} AND {B}")
    assert max_diff([image(f"{A} AND {B}", masks["red"])], [unmasked]) <= 1
    assert max_diff([image(f"{A} AND {B}", masks["rg"])], [unmasked]) > 1


def test_a_batch_mixing_regional_and_plain_images_equals_each_alone(masks, loras, tmp_path) -> None:
    """With a regional SDXL LoRA (both text encoders and the UNet) and per-image multipliers."""
    prompts = [f"{A} AND {B} --am 0.5", A, f"{B} :0.5 AND {A} AND a cat"]
    same = {"prompt": prompts, "seed": 5, "regions": RegionsConfig(mask=masks["rg"]), "sampler": "euler_a",
            "network": _net(loras["all"], True)}
    together, lines = _run(tmp_path, "three", batch_size=3, **same)
    alone, _ = _run(tmp_path, "one", batch_size=1, **same)
    assert max_diff(together, alone) <= 1
    assert lines[0]["network_muls"] == [0.5] and lines[0]["regions"]["parts"][0]["network"] == "xl-all"
    assert lines[1]["regions"] is None and [p["weight"] for p in lines[2]["regions"]["parts"]] == [0.5, 1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("feature", ["img2img", "inpaint", "highres", "deep_shrink", "gradual_latent", "lora",
                                     "lllite", "controlnet"])
def test_attention_couple_with_other_features(feature, masks, loras, xl_engine, tmp_path) -> None:
    from safetensors.torch import save_file
    from sdxl_net_files import lllite_state

    from sdbatch.config.deep_shrink_schema import DeepShrinkConfig
    from sdbatch.config.gradual_latent_schema import GradualLatentConfig
    from sdbatch.config.guidance_schema import GuidanceConfig
    from sdbatch.config.highres_schema import HighresConfig

    init = tmp_path / "init.png"
    if feature == "lllite":
        save_file(lllite_state(xl_engine.bundle.unet), str(tmp_path / "lllite.safetensors"))
    Image.fromarray((np.random.default_rng(0).random((S, S, 3)) * 255).astype(np.uint8)).save(init)
    extra = {"img2img": {"init_image": str(init), "strength": 0.7},
             "inpaint": {"init_image": str(init), "mask_image": masks["r_only"], "strength": 0.9},
             "lora": {"network": _net(loras["all"], False)},
             "lllite": {"guidance": GuidanceConfig(name="lllite", models=[str(tmp_path / "lllite.safetensors")],
                                                   guide_image=masks["rg"])},
             "controlnet": {"guidance": GuidanceConfig(name="controlnet", models=["builtin:tiny"],
                                                       guide_image=masks["rg"])},
             "highres": {"highres": HighresConfig(name="on", steps=3, scale=0.5), "width": 96, "height": 96},
             "deep_shrink": {"deep_shrink": DeepShrinkConfig(depth_1=1, timesteps_1=0)},
             "gradual_latent": {"gradual_latent": GradualLatentConfig(timesteps=900, every_n_steps=2),
                                "sampler": "euler_a"}}[feature]
    regional, _ = _run(tmp_path, "couple", prompt=f"{A} AND {B}", seed=2, regions=RegionsConfig(mask=masks["rg"]),
                       **extra)
    plain, _ = _run(tmp_path, "plain", prompt=A, seed=2, **extra)
    assert max_diff(regional, plain) > 1
    if feature in ("highres", "gradual_latent", "lllite"):  # sizes change; LLLite sees the couple's rows
        same, _ = _run(tmp_path, "same", prompt=f"{A} AND {A}", seed=2, regions=RegionsConfig(mask=masks["rg"]),
                       **extra)
        assert max_diff(same, plain) <= 1


# ---------------------------------------------------------------- regional LoRA


def test_a_network_over_the_whole_image_is_the_plain_network(loras, tmp_path) -> None:
    """`A AND B :0`: part 1 is everywhere, so its UNet-only LoRA (the time and size embeddings included) acts
    everywhere exactly as the plain LoRA (without CFG: the negative's cross-attention keys and values take no
    regional LoRA, as in the reference); and a LoRA on both text encoders changes part 1's text only."""
    same = {"prompt": f"{A} AND {B} :0", "seed": 3, "cfg": 1.0}
    regional, _ = _run(tmp_path, "regional", network=_net(loras["unet"], True), **same)
    everywhere, _ = _run(tmp_path, "everywhere", network=_net(loras["unet"], False), **same)
    plain, _ = _run(tmp_path, "plain", **same)
    assert max_diff(regional, everywhere) <= 1 and max_diff(regional, plain) > 8
    # a LoRA on both text encoders bound to part 1 changes part 1's text only (not part 2's, nor its pooled)
    text_only = NetworkConfig(name="lora", regional=True, loras=[LoraConfig(path=str(loras["all"]), unet_mul=0.0)])
    assert max_diff(_run(tmp_path, "te", network=text_only, **same)[0], plain) > 1
    other = {**same, "prompt": f"{B} :0 AND {A}"}
    assert max_diff(_run(tmp_path, "te2", network=text_only, **other)[0], _run(tmp_path, "plain2", **other)[0]) <= 1


@pytest.mark.slow
def test_a_regional_lora_acts_in_its_region(loras, tmp_path) -> None:
    """LoRA 0 bound to part 0 changes its half (left, then right with the mask mirrored) much more than the
    other half. Tiny SDXL mixes the halves more than tiny SD1 (its 16×16 latents go down to 4×4, where
    self-attention and GroupNorm see the whole image), so the bounds are looser than test_attention_couple's."""
    size = 128
    lr, rl = (halves(tmp_path / f"{n}.png", a, b, size) for n, a, b in (("lr", (255, 0, 0), (0, 255, 0)),
                                                                        ("rl", (0, 255, 0), (255, 0, 0))))

    def go(name: str, mask: str, **top) -> np.ndarray:
        run_spec = spec(XL, steps=6, width=size, height=size, prompt=f"{A} AND {B}", seed=4,
                        regions=RegionsConfig(mask=mask), **top)
        return run_images(run_spec, tmp_path / name)[0][0].astype(float)

    left, right = slice(0, size // 2 - size // 8), slice(size // 2 + size // 8, size)
    for name, mask, inside, outside in (("lr", lr, left, right), ("rl", rl, right, left)):
        plain, regional = go(f"plain-{name}", mask), go(f"regional-{name}", mask, network=_net(loras["kohya"], True))
        change_in, change_out = (np.abs(regional[:, c] - plain[:, c]).mean() for c in (inside, outside))
        assert change_in > 1.5 * change_out, (name, change_in, change_out)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow  # a fresh process: ~25 s of imports and the tiny_xl build on this machine
def test_run_py_with_model_tiny_xl(cache_dir, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "model=tiny_xl", 'prompt="a cat AND a dog"', "seed=7", "width=64",
         "height=64", "sampler.steps=3", f"hydra.run.dir={tmp_path / 'run'}", "perf.progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SDBATCH_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads((tmp_path / "run" / "manifest.jsonl").read_text().splitlines()[0])
    assert [p["text"] for p in line["regions"]["parts"]] == ["a cat", "a dog"]
    png = Image.open(tmp_path / "run" / line["file"])
    assert png.text["parameters"].startswith("a cat AND a dog")

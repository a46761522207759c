"""Attention Couple (A AND B): parts, region masks by channel and colour code, part weights, batching, metadata,
the features it combines with, and bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import halves, max_diff, run_images, spec
from PIL import Image

from sdbatch.config.regions_schema import RegionsConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.features.attention_couple import attention_size, normalise
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.plan.regions import assign_masks
from sdbatch.prompts.couple import Part, split_parts
from sdbatch.prompts.region_masks import region_shares, region_weights
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

S = 64
A, B = "a photo of a red fire truck", "a green forest with tall trees"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("masks")
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    return {"rg": halves(folder / "rg.png", red, green), "gr": halves(folder / "gr.png", green, red),
            "r_only": halves(folder / "r.png", red, (0, 0, 0)), "r_full_g": halves(folder / "rfg.png", (255, 255, 0),
                                                                                   green),
            "codes": halves(folder / "codes.png", red, green), "blue": halves(folder / "blue.png", blue, blue)}


def image(prompt: str, mask: str | None = None, seed: int = 3, codes: int | None = None,
          negative_scale: float | None = None) -> np.ndarray:
    """One image through the engine (outside a run), with its region mask."""
    run_spec = spec("builtin:tiny", steps=8)
    run_spec = dataclasses.replace(run_spec, sampler=dataclasses.replace(run_spec.sampler,
                                                                         negative_scale=negative_scale))
    job = dataclasses.replace(plan(run_spec, [PromptLine(prompt, "blurry", "test")], 0)[0], seed=seed,
                              region_mask=mask, region_codes=codes)
    engine = get_engine(run_spec.model, run_spec.perf)
    return np.asarray(engine.run_batch(Batch(BatchKey.of(job), (job,)))[0]).astype(float)


# ---------------------------------------------------------------- syntax


def test_parts_and_weights_split_as_a1111() -> None:
    assert split_parts("a (red:1.2) cat :1.5 AND a dog") == (Part("a (red:1.2) cat", 1.5), Part("a dog", 1.0))
    assert split_parts("one :1.5") == (Part("one :1.5"),) and split_parts("") == (Part(""),)
    with pytest.raises(PromptError, match="prompts.txt:3: part 2 of the AND prompt is empty"):
        split_parts("a cat AND  AND a dog", "prompts.txt:3")


# ---------------------------------------------------------------- equivalences


@pytest.mark.parametrize("negative_scale", [None, 2.0])
def test_a_and_a_equals_a(negative_scale) -> None:
    plain = image(A, negative_scale=negative_scale)
    assert max_diff([plain], [image(f"{A} AND {A}", negative_scale=negative_scale)]) <= 1
    assert max_diff([plain], [image(f"{A} :1 AND {A} :3", negative_scale=negative_scale)]) <= 1  # weights only mix


def test_parts_change_the_image() -> None:
    assert max_diff([image(A)], [image(f"{A} AND {B}")]) > 2


def test_swapping_the_mask_channels_swaps_the_halves(masks) -> None:
    """With A on the left and B on the right each half is nearer its own part's image; swapped, the other way."""
    alone_a, alone_b = image(A), image(B)
    left, right = slice(0, S // 2 - 6), slice(S // 2 + 6, S)  # away from the border, where attention mixes

    def distance(x, y, cols):
        return np.abs(x[:, cols] - y[:, cols]).mean()

    for mask, (near_left, near_right) in ((masks["rg"], (alone_a, alone_b)), (masks["gr"], (alone_b, alone_a))):
        got = image(f"{A} AND {B}", mask)
        far_left = alone_b if near_left is alone_a else alone_a
        far_right = alone_a if near_right is alone_b else alone_b
        assert distance(got, near_left, left) < distance(got, far_left, left)
        assert distance(got, near_right, right) < distance(got, far_right, right)


def test_an_empty_channel_is_a_full_image_region(masks) -> None:
    """R left, G empty → part 2 everywhere; the same as a mask whose G is full (R+G left, G right)."""
    assert max_diff([image(f"{A} AND {B}", masks["r_only"])], [image(f"{A} AND {B}", masks["r_full_g"])]) == 0


def test_colour_codes_equal_the_same_regions_by_channel(masks) -> None:
    by_code = image(f"{A} AND {B}", masks["codes"], codes=2)
    assert max_diff([by_code], [image(f"{A} AND {B}", masks["rg"])]) == 0
    # part 3 is past the 2 codes: the whole image; blue is code 4, beyond 2 codes, so every part covers the image
    assert max_diff([image(f"{A} AND {B}", masks["blue"], codes=2)], [image(f"{A} AND {B}")]) == 0


def test_region_weights_and_shares(masks) -> None:
    weights = region_weights(masks["rg"], 4, S, S, None)
    assert weights.shape == (4, S, S) and weights[0, :, 0].min() == 1 and weights[0, :, -1].max() == 0
    assert (weights[2] == 1).all() and (weights[3] == 1).all()  # B is empty; part 4 is past R, G, B
    assert region_shares(masks["rg"], [1, 1], S, S, None) == [0.5, 0.5]
    assert region_shares(None, [1, 3], S, S, None) == [0.25, 0.75]
    grey = Path(masks["rg"]).with_name("grey.png")
    Image.new("RGB", (S, S), (128, 64, 0)).save(grey)
    soft = region_weights(str(grey), 2, S, S, None)  # feathered masks are weights, not thresholds
    assert np.allclose(soft[0], 128 / 255) and np.allclose(soft[1], 64 / 255)


def test_blend_weights_and_attention_sizes() -> None:
    weights = normalise(torch.tensor([[[2.0, 0.0], [2.0, 0.0]]]))  # two parts, two pixels, the second uncovered
    assert torch.allclose(weights, torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    assert attention_size(8 * 4, 0.5) == (4, 8) and attention_size(4 * 8, 2.0) == (8, 4)  # by shape, not area
    assert attention_size(3 * 5, 0.6) == (3, 5)  # odd sizes (Deep Shrink, ceil halving)


# ---------------------------------------------------------------- runs


def _run(tmp: Path, name: str, sampler: str = "ddim", **top) -> tuple[list[np.ndarray], list[dict]]:
    run_spec = spec("builtin:tiny", steps=6, sampler=sampler, **top)
    return run_images(run_spec, tmp / name)


def test_a_batch_mixing_regional_and_plain_images_equals_each_alone(masks, tmp_path) -> None:
    prompts = [f"{A} AND {B}", A, f"{B} AND {A} AND a cat", f"{A} AND {B}"]
    regions = RegionsConfig(mask=str(Path(masks["rg"]).parent))
    together, lines = _run(tmp_path, "four", prompt=prompts, seed=5, batch_size=4, regions=regions)
    alone, _ = _run(tmp_path, "one", prompt=prompts, seed=5, batch_size=1, regions=regions)
    assert max_diff(together, alone) <= 1
    masks_used = [line["regions"] and Path(line["regions"]["mask"]).name for line in lines]
    assert masks_used[1] is None and masks_used[0] != masks_used[3]  # in turn, plain images take none


def test_metadata_records_parts_mask_and_shares(masks, tmp_path) -> None:
    _, lines = _run(tmp_path, "meta", prompt=f"{A} :1.5 AND {B}", seed=1, regions=RegionsConfig(mask=masks["rg"]))
    record = lines[0]["regions"]
    assert record["mask"] == masks["rg"] and record["max_color_codes"] is None
    assert [(p["text"], p["weight"], p["share"]) for p in record["parts"]] == [(A, 1.5, 0.5), (B, 1.0, 0.5)]
    png = Image.open(tmp_path / "meta" / lines[0]["file"])
    assert png.text["parameters"].startswith(f"{A} :1.5 AND {B}")  # A1111 reads the AND prompt back
    assert json.loads(png.text["sdbatch"])["regions"] == record


@pytest.mark.parametrize("feature", ["img2img", "inpaint", "highres", "deep_shrink", "gradual_latent", "controlnet",
                                     "lora"])
def test_attention_couple_with_other_features(feature, masks, tmp_path) -> None:
    from sdbatch.config.deep_shrink_schema import DeepShrinkConfig
    from sdbatch.config.gradual_latent_schema import GradualLatentConfig
    from sdbatch.config.guidance_schema import GuidanceConfig
    from sdbatch.config.highres_schema import HighresConfig
    from sdbatch.config.spec import LoraConfig, NetworkConfig

    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((S, S, 3)) * 255).astype(np.uint8)).save(init)
    extra = {"img2img": {"init_image": str(init), "strength": 0.7},
             "inpaint": {"init_image": str(init), "mask_image": masks["r_only"], "strength": 0.9},
             "lora": {"network": NetworkConfig(name="lora", loras=[LoraConfig(path="builtin:tiny-lora", mul=1.0)])},
             "highres": {"highres": HighresConfig(name="on", steps=4, scale=0.5), "width": 96, "height": 96},
             "deep_shrink": {"deep_shrink": DeepShrinkConfig(depth_1=1, timesteps_1=0)},
             "gradual_latent": {"gradual_latent": GradualLatentConfig(timesteps=900, every_n_steps=2),
                                "sampler": "euler_a"},
             "controlnet": {"guidance": GuidanceConfig(name="controlnet", models=["builtin:tiny"],
                                                       guide_image=masks["rg"])}}[feature]
    regional, _ = _run(tmp_path, "couple", prompt=f"{A} AND {B}", seed=2, regions=RegionsConfig(mask=masks["rg"]),
                       **extra)
    plain, _ = _run(tmp_path, "plain", prompt=A, seed=2, **extra)
    assert max_diff(regional, plain) > 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("args", "needle"), [
    (["regions.max_color_codes=8", "regions.mask=MASK", "prompt='a AND b'"], "regions.max_color_codes must be"),
    (["regions.max_color_codes=2", "prompt='a AND b'"], "regions.max_color_codes needs regions.mask"),
    (["regions.mask=MASK", "prompt=a cat"], "regions.mask is set but no prompt has AND parts"),
    (["regions.mask=BAD", "prompt='a AND b'"], "regions.mask"),
    (["prompt='a cat AND  AND a dog'"], "part 2 of the AND prompt is empty"),
])
def test_bad_region_input_is_one_line(args, needle, masks, cache_dir, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    args = [a.replace("MASK", masks["rg"]).replace("BAD", str(bad)) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "model=tiny", "sampler.steps=2", "width=64",
                           "height=64", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, env={**__import__("os").environ,
                                                               "SDBATCH_CACHE": str(cache_dir)}, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sdbatch:")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_regions_config_checks() -> None:
    with pytest.raises(ConfigError, match="from 1 to 7"):
        RegionsConfig(mask="m.png", max_color_codes=0).check()


# ---------------------------------------------------------------- regional LoRA


def _lora(regional: bool, mul: float = 1.5, **extra):
    from sdbatch.config.spec import LoraConfig, NetworkConfig

    return NetworkConfig(name="lora", loras=[LoraConfig(path="builtin:tiny-lora", mul=mul, **extra)],
                         regional=regional)


def test_a_regional_lora_acts_in_its_region(tmp_path) -> None:
    """LoRA 0 bound to part 0 (the left half) changes the left half much more than the right; the right changes
    about half as much as with the LoRA everywhere (self-attention and GroupNorm mix the halves; measured away
    from the border)."""
    size = 128
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2, 0], pixels[:, size // 2 :, 1] = 255, 255
    Image.fromarray(pixels).save(tmp_path / "lr.png")

    def go(name: str, **top) -> np.ndarray:
        run_spec = spec("builtin:tiny", steps=8, width=size, height=size, prompt=f"{A} AND {B}", seed=4,
                        regions=RegionsConfig(mask=str(tmp_path / "lr.png")), **top)
        return run_images(run_spec, tmp_path / name)[0][0].astype(float)

    plain, everywhere, regional = go("plain"), go("global", network=_lora(False)), go("regional", network=_lora(True))
    left, right = slice(0, size // 2 - size // 8), slice(size // 2 + size // 8, size)

    def change(image, cols):
        return np.abs(image[:, cols] - plain[:, cols]).mean()

    assert change(regional, left) > 2 * change(regional, right)
    assert change(regional, right) < 0.7 * change(everywhere, right)


def test_regional_lora_with_per_image_multipliers_batches_like_alone(masks, tmp_path) -> None:
    prompts = [f"{A} AND {B} --am 0.5", f"{B} AND {A} --am 1.5", f"{A} AND {B} --am 0"]
    regions = RegionsConfig(mask=masks["rg"])
    together, lines = _run(tmp_path, "three", prompt=prompts, seed=7, batch_size=3, regions=regions,
                           network=_lora(True))
    alone, _ = _run(tmp_path, "one", prompt=prompts, seed=7, batch_size=1, regions=regions, network=_lora(True))
    assert max_diff(together, alone) <= 1
    assert [p["network"] for p in lines[0]["regions"]["parts"]] == ["tiny-lora-sd1", None]
    plain, _ = _run(tmp_path, "plain", prompt=[f"{A} AND {B}"], seed=9, regions=regions)
    zero, _ = _run(tmp_path, "zero", prompt=[f"{A} AND {B} --am 0"], seed=9, regions=regions, network=_lora(True))
    assert max_diff(plain, zero) == 0  # multiplier 0: no network, regional or not


def test_regional_lora_needs_hooked_mode_and_a_part_per_network(masks) -> None:
    import dataclasses as dc

    from sdbatch.config.resolve import _check_networks
    from sdbatch.config.spec import LoraConfig

    with pytest.raises(ConfigError, match="network.regional=true .* needs network=lora with network.mode=hooked"):
        _check_networks(spec("builtin:tiny", network=dc.replace(_lora(True), mode="merge")))
    three = dc.replace(_lora(True), loras=[LoraConfig(path="builtin:tiny-lora")] * 3)
    run_spec = spec("builtin:tiny", network=three, regions=RegionsConfig(mask=masks["rg"]))
    jobs = plan(run_spec, [PromptLine(f"{A} AND {B}", "", "f:1"), PromptLine(A, "", "f:2")], 0)
    with pytest.raises(ConfigError, match="f:1: network.regional=true binds 3 LoRA files to AND parts, but the "
                                          "prompt has 2"):
        assign_masks(jobs, run_spec)
    assert assign_masks(jobs[1:], dc.replace(run_spec, regions=RegionsConfig())) == jobs[1:]  # plain lines: as usual


def test_a_prompt_file_mixing_plain_and_regional_lines_with_two_bound_loras(masks, cache_dir, tmp_path) -> None:
    """The issue's end-to-end run: plain lines, AND lines with a mask, two networks bound to regions (the tiny
    LoRA and a LoHa file), --am, from `python run.py`."""
    import os

    from lycoris_files import loha_state, targets
    from safetensors.torch import save_file

    engine = get_engine(spec("builtin:tiny").model, spec("builtin:tiny").perf)
    loha = tmp_path / "style-loha.safetensors"
    save_file(loha_state(targets(engine.bundle.unet, engine.bundle.text_encoder), seed=3), str(loha))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{A} --am 0.5,1\n{A} AND {B} --am 1,0.8\n{B} AND {A} :0.7\n{B}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "model=tiny", f"prompt_file={prompts}", "seed=11", "width=64",
         "height=64", "sampler.steps=4", "batch_size=2", "network=lora", "network.regional=true",
         f"network.loras=[{{path: builtin:tiny-lora, mul: 1.0}}, {{path: {loha}, mul: 0.9}}]",
         f"regions.mask={masks['rg']}", f"hydra.run.dir={tmp_path / 'run'}", "perf.progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SDBATCH_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted((json.loads(x) for x in (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()),
                   key=lambda line: line["index"])
    assert [line["regions"] is None for line in lines] == [True, False, False, True]
    assert [p["network"] for p in lines[1]["regions"]["parts"]] == ["tiny-lora-sd1", "style-loha"]
    assert [p["weight"] for p in lines[2]["regions"]["parts"]] == [1.0, 0.7]
    assert [n["mul"] for n in lines[0]["networks"]] == [0.5, 1.0] and lines[1]["network_muls"] == [1.0, 0.8]
    assert all((tmp_path / "run" / line["file"]).is_file() for line in lines)

"""Separate text-encoder and UNet weights: `<lora:NAME:TE:UNET>` tags and network.loras[].unet_mul, in every mode
and per image in one hooked batch; the text-encoding cache key, --am, grids and the records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from engine_helpers import max_diff, run_images, spec
from lycoris_files import lora_for, only, save
from test_configs import _spec as composed

from sdbatch.config.spec import GridConfig, LoraConfig, NetworkConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.plan.planner import plan
from sdbatch.plan.stage import plan_run
from sdbatch.prompts.png_info import read_png_params
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd1_components) -> dict[str, Path]:
    """style: a LoRA on both models (also the lora_dir's file for tags); unet/te: the same tensors of one model."""
    unet, _, text_encoder = sd1_components
    folder = tmp_path_factory.mktemp("weights")
    state = lora_for(unet, text_encoder)
    return {"style": save(state, folder / "style.safetensors"),
            "unet": save(only(state, "lora_unet_"), folder / "unet-only.safetensors"),
            "te": save(only(state, "lora_te_"), folder / "te-only.safetensors")}


def _with(run_spec, path: Path, mul: float, unet_mul: float | None = None, mode: str = "hooked", **network):
    lora = LoraConfig(path=str(path), mul=mul, unet_mul=unet_mul)
    return dataclasses.replace(run_spec, network=NetworkConfig(name="lora", loras=[lora], mode=mode, **network))


@pytest.mark.parametrize("mode", ["hooked", "merge", "precalc"])
def test_one_model_weight_zero_equals_a_file_for_the_other(sd1_single_file, files, tmp_path, mode) -> None:
    base = spec(sd1_single_file, prompt="a red cube", seed=5)
    unet_only = run_images(_with(base, files["unet"], 1.0, mode=mode), tmp_path / "unet")[0]
    te_only = run_images(_with(base, files["te"], 1.0, mode=mode), tmp_path / "te")[0]
    both = run_images(_with(base, files["style"], 1.0, mode=mode), tmp_path / "both")[0]
    assert max_diff(unet_only, both) > 8 and max_diff(te_only, both) > 8 and max_diff(unet_only, te_only) > 8
    diffs = [max_diff(run_images(_with(base, files["style"], 0.0, 1.0, mode), tmp_path / "te0")[0], unet_only),
             max_diff(run_images(_with(base, files["style"], 1.0, 0.0, mode), tmp_path / "unet0")[0], te_only)]
    print(f"{mode}: TE 0/UNet 1 vs UNet-only file, TE 1/UNet 0 vs TE-only file: {diffs}")
    assert max(diffs) <= 1


def test_tags_set_each_images_two_weights_in_one_hooked_batch(sd1_single_file, files, tmp_path) -> None:
    lines = ["a red cube <lora:style:0:1> --d 5", "a red cube <lora:style:1:0> --d 5",
             "a red cube <lora:style:te=0.5:unet=0.5> --d 5", "a red cube --d 5"]
    tagged = dataclasses.replace(spec(sd1_single_file, prompt=lines, batch_size=4),
                                 network=NetworkConfig(lora_dir=str(files["style"].parent)))
    images, records = run_images(tagged, tmp_path / "tagged")
    base = spec(sd1_single_file, prompt="a red cube", seed=5)
    alone = [run_images(_with(base, files["style"], 0.0, 1.0), tmp_path / "config")[0],
             run_images(_with(base, files["te"], 1.0), tmp_path / "te")[0],
             run_images(_with(base, files["style"], 0.5), tmp_path / "half")[0],
             run_images(base, tmp_path / "plain")[0]]
    diffs = [max_diff([image], one) for image, one in zip(images, alone, strict=True)]
    print(f"tagged images in one batch vs each alone: {diffs}")
    assert max(diffs) <= 1
    assert [(n["mul"], n["unet_mul"]) for r in records for n in r["networks"]] == [
        (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.0, 0.0)]
    assert records[0]["network_muls"] == [[0.0, 1.0]] and records[2]["network_muls"] == [0.5]
    infotext = read_png_params(tmp_path / "tagged" / records[0]["file"])["parameters"]
    assert infotext.startswith("a red cube <lora:style:0:1>") and 'Lora hashes: "style: ' in infotext
    assert "Lora hashes" not in read_png_params(tmp_path / "tagged" / records[3]["file"])["parameters"]


def test_text_is_encoded_once_per_text_encoder_weight(sd1_single_file, files, tmp_path) -> None:
    lines = ["a cube <lora:style:0.45:1>", "a cube <lora:style:0.45:0>", "a cube <lora:style:0.15:1>"]
    run_spec = dataclasses.replace(spec(sd1_single_file, prompt=lines, batch_size=3, negative_prompt="grey fog"),
                                   network=NetworkConfig(lora_dir=str(files["style"].parent)))
    engine = get_engine(run_spec.model, run_spec.perf)
    counts = []
    for name in ("run", "again"):
        before = engine.text.encoded
        run_images(run_spec, tmp_path / name)
        counts.append(engine.text.encoded - before)
    assert counts == [4, 0], "prompt and negative at TE 0.45 and at TE 0.15, once; a second run reuses them"


def test_unet_mul_in_config_am_and_grids(sd1_single_file, files) -> None:
    net = NetworkConfig(name="lora", loras=[LoraConfig(str(files["style"]), 0.0, 1.0)])
    run_spec = dataclasses.replace(spec(sd1_single_file, prompt="x"), network=net)
    jobs = plan(run_spec, [PromptLine("a", "", "f:1"), PromptLine("b --am 0.5", "", "f:2")], 0)
    assert [j.network_muls for j in jobs] == [((0.0, 1.0),), (0.5,)], "--am sets both weights"
    muls = dataclasses.replace(net, muls=[0.3])
    assert muls.multipliers() == (0.3,), "network.muls sets both weights"
    grid = dataclasses.replace(run_spec, prompt="a red cube", grid=GridConfig(x="seed:1,2", y="network_muls:0.5,1"))
    assert [j.network_muls for j in plan_run(grid, 0).jobs] == [(0.5,), (0.5,), (1.0,), (1.0,)]
    seeds_only = dataclasses.replace(grid, grid=GridConfig(x="seed:1,2"))
    assert [j.network_muls for j in plan_run(seeds_only, 0).jobs] == [((0.0, 1.0),)] * 2, "a grid keeps the pair"


def test_config_key_composes(files) -> None:
    run_spec = composed("network=lora", f"network.loras=[{{path: {files['style']}, mul: 0, unet_mul: 0.7}}]")
    assert run_spec.network.loras[0] == LoraConfig(str(files["style"]), 0.0, 0.7)
    assert run_spec.network.multipliers() == ((0.0, 0.7),)
    plain = composed("network=lora", f"network.loras=[{{path: {files['style']}, mul: 0.4}}]")
    assert plain.network.loras[0].unet_mul is None and plain.network.multipliers() == (0.4,)

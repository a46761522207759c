"""ControlNet on SDXL: pixel parity with diffusers' StableDiffusionXLControlNetPipeline (one model, two summed or
averaged), diffusers folders and single files, wrong-family files in one line, and builtin:tiny on model=tiny_xl
end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from controlnet_files import tiny_controlnet
from diffusers import StableDiffusionXLControlNetPipeline
from engine_helpers import SIZE, max_diff, spec
from PIL import Image
from test_controlnet import _guide, _hint
from test_controlnet import ours as controlnet_ours
from test_controlnet_run import HIGHRES, _stage_one, finals
from test_run import manifest, run_cli
from test_sdxl import _pipeline

from sdbatch.config.guidance_schema import GuidanceConfig
from sdbatch.engine.models.controlnet_files import load_controlnet
from sdbatch.engine.models.export import controlnet_to_ldm, save_controlnet
from sdbatch.engine.models.loading import load_models
from sdbatch.errors import ModelError

torch.set_num_threads(1)

PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [11, 12345]
STEPS = 6
FP32 = {"device": torch.device("cpu"), "dtype": torch.float32, "vae_dtype": torch.float32}


@pytest.fixture(scope="module")
def xl_nets(sdxl_components, tmp_path_factory) -> dict:
    """Two tiny SDXL ControlNets (a: a diffusers folder, b: a diffusers single file) and four guide images."""
    folder = tmp_path_factory.mktemp("xl-controlnets")
    unet = sdxl_components[0]
    a, b = tiny_controlnet(unet, seed=1), tiny_controlnet(unet, seed=2)
    a.save_pretrained(folder / "cn-a")
    b_file = folder / "cn-b.safetensors"
    safetensors.torch.save_file(b.state_dict(), str(b_file))
    return {"a": a, "b": b, "a_path": folder / "cn-a", "b_path": b_file,
            "guides": [_guide(folder / f"guide{i}.png", i) for i in range(4)]}


def xl_spec(file: Path, models: list, sampler: str = "ddim", steps: int = STEPS, **guidance):
    cfg = GuidanceConfig(name="controlnet", models=[str(m) for m in models], guide_image="unused", **guidance)
    return spec(file, sampler=sampler, steps=steps, guidance=cfg)


def xl_reference(components, tmp: Path, nets: list, guides: list[tuple], sampler: str = "ddim",
                 **kwargs) -> list[np.ndarray]:
    """diffusers' SDXL ControlNet pipeline (a MultiControlNetModel for several nets) on the same weights."""
    base = _pipeline(components, tmp, sampler)
    pipe = StableDiffusionXLControlNetPipeline(**base.components, controlnet=nets if len(nets) > 1 else nets[0],
                                               force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    hints = [[_hint(g[i], "none") for g in guides] for i in range(len(nets))]
    if len(nets) > 1:  # the SDXL pipeline takes one hint per model for every prompt
        assert len(set(guides)) == 1
        hints = [per_net[0] for per_net in hints]
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    out = pipe(PROMPTS, image=hints if len(nets) > 1 else hints[0], negative_prompt=["blurry"] * len(PROMPTS),
               num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, generator=gens,
               output_type="pil", **kwargs)
    return [np.asarray(im) for im in out.images]


def test_sdxl_controlnet_parity_with_diffusers(xl_nets, sdxl_components, sdxl_file, tmp_path) -> None:
    guides = [(xl_nets["guides"][0],), (xl_nets["guides"][1],)]
    expected = xl_reference(sdxl_components, tmp_path, [xl_nets["a"]], guides)
    got = controlnet_ours(xl_spec(sdxl_file, [xl_nets["a_path"]]), guides)
    assert max_diff(got, expected) <= 1
    plain = controlnet_ours(spec(sdxl_file, steps=STEPS), [(), ()])
    assert max_diff(got, plain) > 8  # the ControlNet really acts


def test_two_sdxl_controlnets_sum_and_mean_parity_with_multi_controlnet(xl_nets, sdxl_components, sdxl_file,
                                                                        tmp_path) -> None:
    """sum is diffusers' MultiControlNet; mean averages each residual element-wise, which is MultiControlNet with
    the weights divided by the number of models (gen_img's SDXL code meant this, but collapsed it to a scalar)."""
    guides = [(xl_nets["guides"][0], xl_nets["guides"][2])] * 2  # diffusers: the same hints for every prompt
    models = [xl_nets["a_path"], xl_nets["b_path"]]
    for combine, scales in (("sum", [0.8, 0.6]), ("mean", [0.4, 0.3])):
        expected = xl_reference(sdxl_components, tmp_path, [xl_nets["a"], xl_nets["b"]], guides,
                                controlnet_conditioning_scale=scales)
        got = controlnet_ours(xl_spec(sdxl_file, models, weights=[0.8, 0.6], combine=combine), guides)
        assert max_diff(got, expected) <= 1, combine


@pytest.mark.slow
def test_sdxl_guess_mode_and_start_ratio_parity(xl_nets, sdxl_components, sdxl_file, tmp_path) -> None:
    guides = [(xl_nets["guides"][0], xl_nets["guides"][2])] * 2  # diffusers: the same hints for every prompt
    nets, models = [xl_nets["a"], xl_nets["b"]], [xl_nets["a_path"], xl_nets["b_path"]]
    expected = xl_reference(sdxl_components, tmp_path, nets, guides, "euler_a", guess_mode=True,
                            control_guidance_start=[0.0, 0.3], control_guidance_end=[0.5, 1.0])
    got = controlnet_ours(xl_spec(sdxl_file, models, "euler_a", guess_mode=True, start=[0.0, 0.3],
                                  ratios=[0.5, 1.0]), guides)
    assert max_diff(got, expected) <= 1


def _error(path, bundle) -> str:
    with pytest.raises(ModelError) as info:
        load_controlnet(str(path), bundle, "guidance.models[1]")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"guidance.models[1]={path}")
    return message


def test_wrong_family_and_original_layout_are_one_line_errors(xl_nets, sdxl_file, sd1_components, sd1_single_file,
                                                             tmp_path) -> None:
    xl, sd1 = load_models(str(sdxl_file), **FP32), load_models(str(sd1_single_file), **FP32)
    sd1_cn = save_controlnet(tiny_controlnet(sd1_components[0], seed=1), tmp_path / "cn-sd1.safetensors")
    assert _error(sd1_cn, xl) == (f"guidance.models[1]={sd1_cn} is a ControlNet for SD1 (context 32), but the model "
                                  "is SDXL (context 96); use a ControlNet trained for SDXL")
    for path in (xl_nets["a_path"], xl_nets["b_path"]):
        assert _error(path, sd1) == (f"guidance.models[1]={path} is a ControlNet for SDXL (context 96), but the "
                                     "model is SD1 (context 32); use a ControlNet trained for SD1")
    original = tmp_path / "xl-original.safetensors"  # lllyasviel's layout of an SDXL ControlNet: label_emb keys
    extra = {"control_model.label_emb.0.0.weight": torch.zeros(4, 4)}
    safetensors.torch.save_file({**controlnet_to_ldm(tiny_controlnet(sd1_components[0], seed=1)), **extra},
                                str(original))
    assert "in the original (non-diffusers) layout, which sdbatch does not read; use a diffusers-format SDXL " \
           "ControlNet" in _error(original, xl)
    # the single file is read on the model's config with its own shapes: the same model as its folder would be
    loaded = load_controlnet(str(xl_nets["b_path"]), xl, "guidance.models[0]")
    assert loaded.kind == "diffusers"
    torch.testing.assert_close(loaded.model.state_dict(), xl_nets["b"].state_dict(), atol=0, rtol=0)


@pytest.mark.slow
def test_run_py_tiny_xl_with_builtin_tiny(cache_dir, tmp_path) -> None:
    """`python run.py model=tiny_xl guidance=controlnet guidance.models=[builtin:tiny] ...` end to end, with the
    A1111 ControlNet infotext."""
    guide = _guide(tmp_path / "guide.png", 0)
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny_xl", "guidance=controlnet", "guidance.models=[builtin:tiny]",
                    f"guidance.guide_image={guide}", "prompt=a cat", "seed=5", "width=64", "height=64",
                    "sampler.steps=3", "perf.progress=false", f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    [line] = manifest(run_dir)
    [unit] = line["guidance"]["units"]
    assert (unit["model"], unit["name"]) == ("builtin:tiny", "tiny-controlnet-xl-v1")
    assert re.fullmatch(r"[0-9a-f]{10}", unit["hash"]) and Path(unit["file"]).is_file()
    text = Image.open(run_dir / line["file"]).text
    assert json.loads(text["sdbatch"]) == line
    assert (f'ControlNet 0: "Module: none, Model: tiny-controlnet-xl-v1 [{unit["hash"][:8]}], Weight: 1.0, '
            'Guidance Start: 0.0, Guidance End: 1.0"') in text["parameters"]



XL_CN = ["model=tiny_xl", "guidance=controlnet", "guidance.models=[builtin:tiny]"]


@pytest.mark.slow
def test_tiny_xl_controlnet_with_deep_shrink_and_highres(cache_dir, monkeypatch, tmp_path) -> None:
    """Deep Shrink shrinks the SDXL ControlNet's block like the UNet's; Highres. fix guides both stages unless
    highres.disable_controlnet, which leaves stage 1 as it was and changes stage 2."""
    monkeypatch.setenv("SDBATCH_CACHE", str(cache_dir))
    guide = [*XL_CN, f"guidance.guide_image={_guide(tmp_path / 'guide.png', 1)}"]
    shrink = ["width=128", "height=128", "deep_shrink.depth_1=1", "deep_shrink.timesteps_1=500"]
    plain, _ = finals(tmp_path / "plain", "model=tiny_xl", *shrink)
    shrunk, lines = finals(tmp_path / "shrunk", *guide, *shrink)
    alone, _ = finals(tmp_path / "alone", *guide, "width=128", "height=128")
    assert lines[0]["deep_shrink"] is not None
    assert max_diff(shrunk, plain) > 8 and max_diff(shrunk, alone) > 8
    on, _ = finals(tmp_path / "on", *guide, *HIGHRES)
    off, off_lines = finals(tmp_path / "off", *guide, *HIGHRES, "highres.disable_controlnet=true")
    assert off_lines[0]["highres"]["disable_controlnet"] is True
    assert max_diff(_stage_one(tmp_path / "on"), _stage_one(tmp_path / "off")) == 0
    assert max_diff(on, off) > 0

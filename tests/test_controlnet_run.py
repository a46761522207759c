"""guidance=controlnet in whole runs: the README command, guide images in turn, two models summed or alternated,
Highres. fix (with and without highres.disable_controlnet), save_hints and resume, the guidance.weights grid
axis, the features it combines with, one load per multirun process, batching, and bad inputs in one line."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_files import tiny_controlnet, write_all_formats
from engine_helpers import init_images, max_diff, pixels
from hydra import compose, initialize_config_dir
from lora_files import make_lora
from PIL import Image, ImageDraw
from test_bad_config import _one_error_line
from test_inpaint import make_masks
from test_parity import assert_same_image
from test_run import ROOT, SMALL, manifest, run_cli

from sdbatch.cli.runner import RunResult, run
from sdbatch.config.guidance_schema import parse_preprocess
from sdbatch.config.resolve import resolve
from sdbatch.config.schema import register_configs
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.guide.hints import hint_image
from sdbatch.engine.models.export import save_controlnet, save_single_file
from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.errors import ConfigError, SdbatchError
from sdbatch.prompts.png_info import parse_infotext

torch.set_num_threads(1)
register_configs()

CONF = ROOT / "conf"
BASE = ["model=tiny", "prompt=a cat", "seed=5", "width=64", "height=64", "sampler.steps=3", "perf.progress=false"]
TINY_CN = "guidance.models=[builtin:tiny]"
CHANGED = 8  # grey levels: "the ControlNet changes the image" (the tiny models' images differ by far more)


# ---------------------------------------------------------------- helpers and fixtures


def _guide(path: Path, seed: int, size: int = 64) -> Path:
    """A guide image with shapes at seeded places on black: canny finds their edges."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, size // 2, size=2))
    draw.rectangle([x, y, x + size // 3, y + size // 3], fill=(255, 255, 255))
    cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, size=2))
    draw.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], outline=(200, 120, 40), width=3)
    image.save(path)
    return path


@pytest.fixture(autouse=True)
def _tiny_cache(cache_dir, monkeypatch) -> None:
    """In-process runs build model=tiny and builtin:tiny in the same private cache as the command-line runs."""
    monkeypatch.setenv("SDBATCH_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def guides(tmp_path_factory) -> Path:
    """A folder of four guide images; natural order g1, g2, g3, g10 (a plain sort would put g10 second)."""
    folder = tmp_path_factory.mktemp("guides")
    for i, name in enumerate(["g1", "g2", "g3", "g10"]):
        _guide(folder / f"{name}.png", i)
    return folder


@pytest.fixture(scope="module")
def cn_files(tmp_path_factory, sd1_components, sd2_components) -> dict[str, Path]:
    """Two tiny SD1 ControlNets (a in every format, b original) and one SD2 ControlNet."""
    folder = tmp_path_factory.mktemp("cn")
    unet = sd1_components[0]
    files = {f"a_{kind}": path for kind, path in
             write_all_formats(tiny_controlnet(unet, seed=1), unet, folder / "a").items()}
    for sub in ("b", "sd2"):
        (folder / sub).mkdir()
    files["b"] = save_controlnet(tiny_controlnet(unet, seed=2), folder / "b" / "cn-b.safetensors")
    files["sd2"] = save_controlnet(tiny_controlnet(sd2_components[0], seed=1), folder / "sd2" / "cn-sd2.safetensors")
    return files


def cn(guide: Path | str, models: str = TINY_CN) -> list[str]:
    return ["guidance=controlnet", models, f"guidance.guide_image={guide}"]


def compose_spec(*overrides: str) -> RunSpec:
    """What `python run.py BASE... OVERRIDES...` resolves to (later overrides win)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return resolve(compose("config", overrides=[*BASE, *overrides]))


def run_lines(run_dir: Path, *overrides: str) -> tuple[RunResult, list[dict]]:
    """Run in-process into run_dir; the result and every manifest line, in (index, file) order."""
    result = run(compose_spec(*overrides), run_dir)
    return result, sorted(manifest(run_dir), key=lambda line: (line["index"], line["file"]))


def finals(run_dir: Path, *overrides: str) -> tuple[list[np.ndarray], list[dict]]:
    """Run in-process; the final images (no stage-1 or hint files) and their manifest lines."""
    _, lines = run_lines(run_dir, *overrides)
    lines = [line for line in lines if "stage" not in line and "hint" not in line]
    return [pixels(run_dir / line["file"]) for line in lines], lines


def guide_names(line: dict) -> list[str]:
    return [Path(unit["guide_image"]).name for unit in line["guidance"]["units"]]


# ---------------------------------------------------------------- 1. the README command


def test_readme_command_records_guides_units_and_infotext(guides, cache_dir, tmp_path) -> None:
    edges = tmp_path / "edges"
    edges.mkdir()
    for name, source in (("e1", "g1"), ("e2", "g2"), ("e10", "g3")):  # natural order: image k gets file k % 3
        (edges / f"{name}.png").write_bytes((guides / f"{source}.png").read_bytes())
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny", "guidance=controlnet", "guidance.models=[builtin:tiny]",
                    "guidance.guide_image=edges/", "guidance.preprocess=[canny]", "prompt=a cat", "images_per_prompt=4",
                    "seed=5", f"hydra.run.dir={run_dir}", *SMALL], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = manifest(run_dir)
    assert sorted(p.name for p in run_dir.glob("*.png")) == sorted(line["file"] for line in lines)
    assert len(lines) == 4
    assert [guide_names(line) for line in sorted(lines, key=lambda x: x["index"])] == [
        ["e1.png"], ["e2.png"], ["e10.png"], ["e1.png"]]
    for line in lines:
        record = line["guidance"]
        assert (record["name"], record["combine"], record["guess_mode"]) == ("controlnet", "sum", False)
        [unit] = record["units"]
        assert (unit["model"], unit["preprocess"], unit["weight"], unit["start"], unit["ratio"]) == (
            "builtin:tiny", "canny", 1.0, 0.0, 1.0)
        assert unit["name"] == "tiny-controlnet-v1" and re.fullmatch(r"[0-9a-f]{10}", unit["hash"])
        assert Path(unit["file"]).is_file()
        text = Image.open(run_dir / line["file"]).text
        assert json.loads(text["sdbatch"]) == line
        expected = (f'ControlNet 0: "Module: canny, Model: tiny-controlnet-v1 [{unit["hash"][:8]}], Weight: 1.0, '
                    'Guidance Start: 0.0, Guidance End: 1.0"')
        assert expected in text["parameters"]
        assert parse_infotext(text["parameters"])["Seed"] == str(line["seed"]), "the rest of the infotext parses"
    ordered = sorted(lines, key=lambda x: x["index"])
    got = [pixels(run_dir / line["file"]) for line in ordered]
    plain, _ = finals(tmp_path / "plain", "images_per_prompt=4")
    assert all(max_diff([a], [b]) > CHANGED for a, b in zip(got, plain, strict=True))


# ---------------------------------------------------------------- 2. two models: sum and alternate


def test_two_models_summed_and_alternated(guides, cn_files, tmp_path) -> None:
    two = [*cn(guides, f"guidance.models=[{cn_files['a_original']},{cn_files['b']}]"), "images_per_prompt=4",
           "guidance.preprocess=[canny,invert]", "guidance.weights=[0.8,0.5]"]
    summed, lines = finals(tmp_path / "sum", *two)
    alternated, alt_lines = finals(tmp_path / "alt", *two, "guidance.combine=alternate")
    names = ["g1.png", "g2.png", "g3.png", "g10.png"]
    for k, line in enumerate(lines):  # c=2 models, 4 guide images: image k gets [2(k%2), 2(k%2)+1]
        assert guide_names(line) == [names[2 * (k % 2)], names[2 * (k % 2) + 1]]
        units = line["guidance"]["units"]
        assert [(u["name"], u["preprocess"], u["weight"]) for u in units] == [
            ("cn", "canny", 0.8), ("cn-b", "invert", 0.5)]
        info = Image.open(tmp_path / "sum" / line["file"]).text["parameters"]
        assert 'ControlNet 0: "Module: canny, Model: cn [' in info and "Weight: 0.8" in info
        assert 'ControlNet 1: "Module: invert, Model: cn-b [' in info and "Weight: 0.5" in info
    assert [line["guidance"]["combine"] for line in alt_lines] == ["alternate"] * 4
    assert [guide_names(a) for a in alt_lines] == [guide_names(s) for s in lines]
    assert max_diff(summed, alternated) > CHANGED
    plain, _ = finals(tmp_path / "plain", "images_per_prompt=4")
    assert max_diff(alternated, plain) > CHANGED and max_diff(summed, plain) > CHANGED


# ---------------------------------------------------------------- 3, 4. Highres. fix and save_hints

HIGHRES = ["width=128", "height=128", "sampler.steps=4", "highres=on", "highres.steps=3", "highres.strength=0.5",
           "highres.save_first_stage=true"]


def _stage_one(run_dir: Path) -> list[np.ndarray]:
    return [pixels(run_dir / line["file"]) for line in sorted(manifest(run_dir), key=lambda x: x["index"])
            if line.get("stage") == 1]


def _first_file(run_dir: Path) -> Path:
    [line] = [line for line in manifest(run_dir) if line.get("stage") == 1]
    return run_dir / line["file"]


def test_highres_with_and_without_controlnet_in_stage_two(guides, tmp_path) -> None:
    on, on_lines = finals(tmp_path / "on", *HIGHRES, *cn(guides / "g1.png"))
    off, off_lines = finals(tmp_path / "off", *HIGHRES, *cn(guides / "g1.png"), "highres.disable_controlnet=true")
    none, _ = finals(tmp_path / "none", *HIGHRES)
    assert off_lines[0]["highres"]["disable_controlnet"] is True
    assert on_lines[0]["highres"]["disable_controlnet"] is False
    assert off_lines[0]["guidance"]["units"][0]["guide_image"].endswith("g1.png")
    assert max_diff(_stage_one(tmp_path / "on"), _stage_one(tmp_path / "off")) == 0, "stage 1 has ControlNet both times"
    assert max_diff(_stage_one(tmp_path / "on"), _stage_one(tmp_path / "none")) > CHANGED
    assert max_diff(on, off) > CHANGED and max_diff(off, none) > CHANGED
    # stage 2 is img2img of the stage-1 image at the final size: without ControlNet when it is disabled ...
    img2img = ["width=128", "height=128", "sampler.steps=4", "strength=0.5"]
    plain_stage2, _ = finals(tmp_path / "i2i-off", *img2img, f"init_image={_first_file(tmp_path / 'off')}")
    assert max_diff(plain_stage2, off) <= 1
    # ... and with the same hint (at the final size) when it is not
    cn_stage2, _ = finals(tmp_path / "i2i-on", *img2img, *cn(guides / "g1.png"),
                          f"init_image={_first_file(tmp_path / 'on')}")
    assert max_diff(cn_stage2, on) <= 1


def test_save_hints_at_the_final_size_and_resume(guides, tmp_path) -> None:
    two = [*cn(guides, "guidance.models=[builtin:tiny,builtin:tiny]"), "guidance.preprocess=[canny,invert]",
           "guidance.save_hints=true", "images_per_prompt=2", "batch_size=2"]
    run_dir = tmp_path / "run"
    first, lines = run_lines(run_dir, *HIGHRES, *two)
    hints = [line for line in lines if "hint" in line]
    assert sorted(line["file"] for line in hints) == ["00000-5-hint0.png", "00000-5-hint1.png", "00001-6-hint0.png",
                                                      "00001-6-hint1.png"]
    for line in hints:
        image = Image.open(run_dir / line["file"])
        assert image.size == (128, 128), "the hints of the final size, not of stage 1"
        assert (line["width"], line["height"]) == (128, 128)
        guide = line["guidance"]["units"][line["hint"]]["guide_image"]
        prep = parse_preprocess(["canny", "invert"][line["hint"]], "test")
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(hint_image(guide, prep, 128, 128, "t")))
    assert {guide_names(line)[0] for line in hints} == {"g1.png", "g3.png"}
    canny = np.asarray(Image.open(run_dir / "00000-5-hint0.png").convert("L"))
    assert set(np.unique(canny)) <= {0, 255} and (canny == 255).any(), "canny: one-pixel white edges on black"
    written = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.png")}
    assert len(written) == 2 * (1 + 1 + 2) and len(first.written) == len(written)
    again, _ = run_lines(run_dir, *HIGHRES, *two)
    assert again.written == [] and again.skipped == 2
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.png")} == written
    assert len(manifest(run_dir)) == len(written)


def test_resume_gives_a_new_image_its_own_guide(guides, tmp_path) -> None:
    """Image k takes guide k % n of the whole run, also when earlier images are already done."""
    run_dir = tmp_path / "run"
    run_lines(run_dir, *cn(guides), "images_per_prompt=2")
    result, lines = run_lines(run_dir, *cn(guides), "images_per_prompt=3")
    assert [p.name for p in result.written] == [lines[2]["file"]] and guide_names(lines[2]) == ["g3.png"]
    fresh, _ = finals(tmp_path / "fresh", *cn(guides), "images_per_prompt=3")
    assert max_diff([pixels(run_dir / lines[2]["file"])], fresh[2:]) == 0


def test_interactive_lines_take_the_guides_in_turn(guides, tmp_path) -> None:
    run(compose_spec(*cn(guides), "interactive=true", "no_preview=true"), tmp_path / "run",
        io.StringIO("a cat\na dog\n"))
    lines = sorted(manifest(tmp_path / "run"), key=lambda line: line["index"])
    assert [line["index"] for line in lines] == [0, 1]
    assert [guide_names(line) for line in lines] == [["g1.png"], ["g2.png"]]


# ---------------------------------------------------------------- 5. the guidance.weights grid axis


def test_grid_of_weights(guides, tmp_path) -> None:
    grid, lines = finals(tmp_path / "grid", *cn(guides), "images_per_prompt=2", "grid.x='guidance.weights:0,1'")
    assert len(lines) == 4 and (tmp_path / "grid" / "grid.png").is_file()
    weights = [line["guidance"]["units"][0]["weight"] for line in lines]
    assert weights == [0.0, 1.0, 0.0, 1.0]
    for line, weight in zip(lines, weights, strict=True):
        assert f"Weight: {weight}, " in Image.open(tmp_path / "grid" / line["file"]).text["parameters"]
    assert [line["seed"] for line in lines] == [5, 5, 6, 6]
    assert [guide_names(line) for line in lines] == [["g1.png"], ["g1.png"], ["g2.png"], ["g2.png"]], \
        "every cell of an image shares its guide image"
    plain, _ = finals(tmp_path / "plain", "images_per_prompt=2")
    full, _ = finals(tmp_path / "full", *cn(guides), "images_per_prompt=2")
    assert max_diff(grid[0::2], plain) == 0, "weight 0: exactly the image without ControlNet"
    assert max_diff(grid[1::2], full) <= 1
    assert max_diff(grid[1::2], plain) > CHANGED
    # two models: a cell value holds one weight per model ("0;0"), or sets the first models' only ("0.5")
    two = [*cn(guides, "guidance.models=[builtin:tiny,builtin:tiny]"), "guidance.weights=[1,0.7]"]
    cells, cell_lines = finals(tmp_path / "grid2", *two, "grid.x='guidance.weights:0;0,0.5'")
    assert [[u["weight"] for u in line["guidance"]["units"]] for line in cell_lines] == [[0.0, 0.0], [0.5, 0.7]]
    assert max_diff(cells[:1], plain[:1]) == 0
    direct, _ = finals(tmp_path / "direct", *two, "guidance.weights=[0.5,0.7]")
    assert max_diff(cells[1:], direct) <= 1


# ---------------------------------------------------------------- 6. with the other features


@pytest.fixture(scope="module")
def inpaint9_file(tmp_path_factory) -> Path:
    components = build_tiny_components("sd1", 0, unet={"in_channels": 9})
    path = tmp_path_factory.mktemp("inpaint9") / "tiny-sd1-inpainting.safetensors"
    return save_single_file(path, *components, "sd1")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pictures")
    [init] = init_images(folder, [1])
    return {"init": init, "mask": make_masks(folder)[0]}


LORA = ["network=lora", "network.loras=[{path: 'builtin:tiny-lora', mul: 0.8}]"]
COMBINED = {
    "img2img": ["strength=0.7", "sampler.steps=6"],
    "inpaint4": ["strength=0.9", "sampler.steps=6"],
    "inpaint9": ["strength=0.9", "sampler.steps=6"],
    "lora_hooked": [*LORA, "network.mode=hooked"],
    "lora_merge": [*LORA, "network.mode=merge"],
    "lora_precalc": [*LORA, "network.mode=precalc"],
    "deep_shrink": ["width=128", "height=128", "deep_shrink.depth_1=1", "deep_shrink.timesteps_1=500"],
    "gradual_latent": ["width=128", "height=128", "sampler=euler_a", "sampler.steps=6", "gradual_latent.timesteps=900",
                       "gradual_latent.ratio=0.5", "gradual_latent.every_n_steps=2", "gradual_latent.ratio_step=0.25"],
}


@pytest.mark.parametrize("case", list(COMBINED))
def test_controlnet_acts_in_combined_runs(case, guides, cn_files, pictures, inpaint9_file, tmp_path) -> None:
    overrides = list(COMBINED[case])
    if case.startswith(("img2img", "inpaint")):
        overrides.append(f"init_image={pictures['init']}")
    if case.startswith("inpaint"):
        overrides.append(f"mask_image={pictures['mask']}")
    models = TINY_CN
    if case == "inpaint9":  # a ControlNet of the 4-channel UNet: it sees the plain latents, not the 9 channels
        overrides.append(f"model.checkpoint={inpaint9_file}")
        models = f"guidance.models=[{cn_files['a_original']}]"
    plain, _ = finals(tmp_path / "plain", *overrides)
    guided, lines = finals(tmp_path / "cn", *overrides, *cn(guides / "g2.png", models))
    assert lines[0]["guidance"]["units"][0]["hash"] and guide_names(lines[0]) == ["g2.png"]
    assert plain[0].shape == guided[0].shape
    assert max_diff(guided, plain) > CHANGED
    if case in ("deep_shrink", "gradual_latent"):  # the feature is really on alongside the ControlNet
        key = "deep_shrink" if case == "deep_shrink" else "gradual_latent"
        assert lines[0][key] is not None
        without = [o for o in overrides if not o.startswith(key)]
        alone, _ = finals(tmp_path / "alone", *without, *cn(guides / "g2.png", models))
        assert max_diff(guided, alone) > CHANGED


def test_lora_modes_agree_with_a_difference_controlnet(guides, cn_files, sd1_single_file, sd1_components,
                                                       tmp_path) -> None:
    """A difference ControlNet is built on the pristine UNet even when a LoRA is merged into it."""
    lora = make_lora(tmp_path / "style.safetensors", sd1_components[0], sd1_components[2])
    model = f"model.checkpoint={sd1_single_file}"
    model_spec = compose_spec(model)
    engine = get_engine(model_spec.model, model_spec.perf)
    images = {}
    for fmt, mode in [("a_original", "hooked"), ("a_difference", "hooked"), ("a_difference", "merge"),
                      ("a_difference", "precalc")]:
        engine.bundle.controlnets.clear()  # load it afresh in this run's session (before the LoRA merges)
        images[fmt, mode], _ = finals(
            tmp_path / f"{fmt}-{mode}", model, *cn(guides / "g1.png", f"guidance.models=[{cn_files[fmt]}]"),
            "network=lora", f"network.loras=[{{path: '{lora}', mul: 0.8}}]", f"network.mode={mode}")
    for key, got in images.items():
        assert max_diff(got, images["a_original", "hooked"]) <= 1, key
    no_lora, _ = finals(tmp_path / "no-lora", model,
                        *cn(guides / "g1.png", f"guidance.models=[{cn_files['a_original']}]"))
    assert max_diff(no_lora, images["a_original", "hooked"]) > CHANGED


# ---------------------------------------------------------------- 7, 8. multirun loads, batching


@pytest.mark.slow  # a subprocess run (default pytest stays under 10 min)
def test_multirun_loads_the_controlnet_once(guides, cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "model=tiny", "prompt=a cat", "seed=1,2", *cn(guides), f"hydra.sweep.dir={sweep}", *SMALL],
                   cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert len(re.findall(r"Loaded ControlNet tiny-controlnet-v1 ", output)) == 1, output
    lines = [manifest(sweep / str(n))[0] for n in range(2)]
    assert [line["seed"] for line in lines] == [1, 2]
    assert all(line["guidance"]["units"][0]["name"] == "tiny-controlnet-v1" for line in lines)


def test_a_batch_of_three_guides_equals_one_by_one(guides, tmp_path) -> None:
    overrides = [*cn(guides, "guidance.models=[builtin:tiny]"), "guidance.preprocess=[canny]", "images_per_prompt=3",
                 "sampler=euler_a"]
    together, lines = finals(tmp_path / "b3", *overrides, "batch_size=3")
    alone, _ = finals(tmp_path / "b1", *overrides, "batch_size=1")
    assert [guide_names(line) for line in lines] == [["g1.png"], ["g2.png"], ["g3.png"]]
    for a, b in zip(together, alone, strict=True):
        assert_same_image(a, b)
    assert max_diff(together[:1], together[1:2]) > CHANGED, "the three guide images differ in effect"


# ---------------------------------------------------------------- 9. bad inputs: one line naming the key


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, cn_files) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    good = cn_files["b"]
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"these bytes are no PNG image" * 8)
    one = _guide(folder / "one.png", 7)
    nocv = folder / "nocv"  # a sitecustomize that makes `import cv2` fail, as if OpenCV were not installed
    nocv.mkdir()
    (nocv / "sitecustomize.py").write_text("import sys\nsys.modules['cv2'] = None\n")
    return {"truncated": truncated, "garbage": garbage, "one": one, "nocv": nocv,
            "missing": folder / "nope.safetensors"}


G = "GUIDES"  # placeholders, filled in per case
# (id, overrides after model=tiny prompt=a cat, text the one error line must contain); all found before any model loads
BAD = [
    ("missing-model", ["guidance=controlnet", "guidance.models=[MISSING]", f"guidance.guide_image={G}"],
     "guidance.models[0]: no such file or folder"),
    ("missing-guide", [*cn("NOWHERE/nope.png")], "guidance.guide_image NOWHERE/nope.png does not exist"),
    ("garbage-guide", [*cn("GARBAGE")], "guidance.guide_image GARBAGE is not a readable image"),
    ("fewer-guides-than-models", [*cn("ONE", "guidance.models=[builtin:tiny,builtin:tiny]")],
     "guidance.guide_image=ONE holds 1 image(s) for 2 models"),
    ("weights-axis-more-values-than-models", [*cn(G), "grid.x='guidance.weights:0;1,1'"],
     "grid.x: guidance.weights value '0;1' gives more weights than the 1 model(s)"),
    ("unknown-preprocess", [*cn(G), "guidance.preprocess=[sobel]"], "guidance.preprocess[0]='sobel'"),
    ("weights-length", [*cn(G), "guidance.weights=[1,0.5]"], "guidance.weights has 2 value(s) for 1 model(s)"),
    ("ratios-length", [*cn(G), "guidance.ratios=[1,0.5]"], "guidance.ratios has 2 value(s) for 1 model(s)"),
    ("preprocess-length", [*cn(G), "guidance.preprocess=[canny,none]"], "guidance.preprocess has 2 value(s)"),
    ("start-not-below-ratio", [*cn(G), "guidance.start=[0.5]", "guidance.ratios=[0.5]"],
     "guidance.start[0]=0.5 must be below guidance.ratios[0]=0.5"),
    ("models-with-guidance-none", ["guidance.models=[builtin:tiny]"], "guidance.models is set but guidance=none"),
    ("disable-controlnet-with-guidance-none", ["highres=on", "highres.disable_controlnet=true"],
     "highres.disable_controlnet=true needs guidance=controlnet"),
    ("controlnet-without-models", ["guidance=controlnet", f"guidance.guide_image={G}"],
     "guidance=controlnet needs guidance.models"),
    ("weights-axis-without-controlnet", ["grid.x='guidance.weights:0,1'"],
     "grid.x=guidance.weights needs guidance=controlnet"),
    ("canny-without-opencv", [*cn(G), "guidance.preprocess=[canny]"],
     "guidance.preprocess[0]=canny: canny needs OpenCV; pip install 'sdbatch[controlnet]'"),
]


def _cli(args: list[str], cache: Path, cwd: Path, without_opencv: Path | None = None) -> subprocess.CompletedProcess:
    """test_run.run_cli, optionally with a sitecustomize on PYTHONPATH that hides OpenCV."""
    if without_opencv is None:
        return run_cli(args, cache, cwd)
    env = {**os.environ, "SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(without_opencv), os.environ.get("PYTHONPATH")] if p)}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _fill(overrides: list[str], guides: Path, bad: dict, tmp: Path) -> list[str]:
    places = {"GUIDES": str(guides), "MISSING": str(bad["missing"]), "NOWHERE": str(tmp / "nowhere"),
              "GARBAGE": str(bad["garbage"]), "ONE": str(bad["one"])}
    return [re.sub("|".join(places), lambda m: places[m[0]], o) for o in overrides]


@pytest.mark.parametrize(("case", "overrides", "needle"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_naming_the_key(case, overrides, needle, guides, bad_files, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["model=tiny", "prompt=a cat", *SMALL, *_fill(overrides, guides, bad_files, tmp_path),
            f"hydra.run.dir={run_dir}"]
    proc = _cli(args, cache_dir, tmp_path, without_opencv=bad_files["nocv"] if case == "canny-without-opencv"
                else None)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert _fill([needle], guides, bad_files, tmp_path)[0] in line, line
    assert "Loaded" not in proc.stderr, "the mistake is found before any model loads"
    assert not list(run_dir.glob("*.png")), "nothing is generated"


def test_a_failing_run_keeps_the_images_already_made(guides, bad_files, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    _, lines = run_lines(run_dir, *cn(guides), "images_per_prompt=2")
    before = {p.name: p.read_bytes() for p in run_dir.glob("*.png")}
    text = (run_dir / "manifest.jsonl").read_text()
    bad_folder = tmp_path / "bad-guides"
    bad_folder.mkdir()
    (bad_folder / "g1.png").write_bytes((guides / "g1.png").read_bytes())
    (bad_folder / "g2.png").write_bytes(bad_files["garbage"].read_bytes())
    proc = run_cli(["model=tiny", "prompt=a cat", "seed=5", "images_per_prompt=4", *SMALL, *cn(bad_folder),
                    f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "g2.png is not a readable image" in _one_error_line(proc.stderr)
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.png")} == before and len(before) == len(lines) == 2
    assert (run_dir / "manifest.jsonl").read_text() == text


def test_controlnets_that_do_not_load_fail_in_one_line(guides, cn_files, bad_files, sd1_single_file,
                                                     tmp_path) -> None:
    """Found when the models load (in-process, for time: the command line prints any SdbatchError as its one line,
    as the table above shows for the errors found earlier)."""
    cases = [
        ([*cn(guides, f"guidance.models=[{bad_files['truncated']}]")],
         f"guidance.models[0]: {bad_files['truncated']} is not a valid safetensors file"),
        ([*cn(guides, f"guidance.models=[{cn_files['a_original']},{cn_files['sd2']}]")],
         f"guidance.models[1]={cn_files['sd2']} is a ControlNet for SD2"),
        ([f"model.checkpoint={sd1_single_file}", *cn(guides)],
         "guidance.models[0]: builtin:tiny is the tiny ControlNet"),
        ([*cn(guides, "guidance.models=[builtin:tiny,builtin:nosuch]")],
         "guidance.models[1]=builtin:nosuch is unknown"),
    ]
    for overrides, needle in cases:
        with pytest.raises(SdbatchError) as caught:
            run(compose_spec(*overrides), tmp_path / "run")
        assert needle in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
        assert not list((tmp_path / "run").glob("*.png"))


def test_an_unknown_builtin_controlnet_is_refused_before_any_model_loads(guides) -> None:
    with pytest.raises(ConfigError, match=r"guidance\.models\[0\].*builtin:tiny2"):
        compose_spec(*cn(guides, "guidance.models=[builtin:tiny2]"))

"""img2img inputs: folders in natural order, sizes, prompts read back from metadata, naming and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from engine_helpers import spec
from PIL import Image, PngImagePlugin

from sdbatch.errors import ConfigError
from sdbatch.plan.planner import plan
from sdbatch.plan.stage import prompt_lines as _prompt_lines
from sdbatch.prompts.init_images import list_images, pair_with_images, prompt_from_image
from sdbatch.prompts.sources import PromptLine


def _png(path: Path, size=(64, 64), **text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    Image.new("RGB", size, (200, 30, 30)).save(path, pnginfo=info)
    return path


def test_folder_is_read_in_natural_order(tmp_path) -> None:
    for name in ("10.png", "2.png", "1.png", "notes.txt"):
        _png(tmp_path / name) if name.endswith(".png") else (tmp_path / name).write_text("x")
    assert [p.name for p in list_images(str(tmp_path))] == ["1.png", "2.png", "10.png"]


@pytest.mark.parametrize(("setup", "message"), [("missing", "does not exist"), ("empty", "holds no images"),
                                               ("garbage", "not a readable image")])
def test_bad_init_images_fail_naming_the_file(setup, message, tmp_path) -> None:
    target = tmp_path / "in"
    if setup == "empty":
        target.mkdir()
    if setup == "garbage":
        target = tmp_path / "in.png"
        target.write_bytes(b"not an image")
    run_spec = spec("x.safetensors", init_image=str(target))
    with pytest.raises(ConfigError, match=message):
        plan(run_spec, _prompt_lines(run_spec, None), base_seed=0)


def test_one_prompt_runs_over_every_image_and_records_its_order(tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for n in (1, 2, 3):
        _png(folder / f"{n}.png")
    run_spec = dataclasses.replace(spec("x.safetensors", init_image=str(folder)), width=None, height=None)
    jobs = plan(run_spec, _prompt_lines(run_spec, None), base_seed=0)
    assert [Path(j.init_image).name for j in jobs] == ["1.png", "2.png", "3.png"]
    assert all(j.strength == 0.8 and j.prompt == "x" for j in jobs)


def test_prompts_cycle_over_fewer_images(caplog) -> None:
    lines = [PromptLine(f"p{i}", "", f"prompt[{i}]") for i in range(3)]
    pairs = pair_with_images(lines, [Path("a.png"), Path("b.png")])
    assert [(line.text, image.name) for line, image in pairs] == [("p0", "a.png"), ("p1", "b.png"), ("p2", "a.png")]
    assert "used in turn" in caplog.text


def test_size_comes_from_the_image_rounded_down(tmp_path, caplog) -> None:
    image = _png(tmp_path / "odd.png", size=(70, 45))
    run_spec = dataclasses.replace(spec("x.safetensors", init_image=str(image)), width=None, height=None)
    (job,) = plan(run_spec, _prompt_lines(run_spec, None), base_seed=0)
    assert (job.width, job.height) == (64, 40) and "odd.png is 70x45; using 64x40" in caplog.text
    sized = dataclasses.replace(run_spec, width=128, height=96)
    assert plan(sized, _prompt_lines(sized, None), base_seed=0)[0].width == 128


def test_original_naming_keeps_names_unique(tmp_path) -> None:
    image = _png(tmp_path / "photo.png")
    run_spec = spec("x.safetensors", init_image=str(image), images_per_prompt=2,
                    output=dataclasses.replace(spec("x").output, naming="original"))
    jobs = plan(run_spec, _prompt_lines(run_spec, None), base_seed=0)
    assert [j.file_name for j in jobs] == ["photo.png", "photo-1.png"]


def test_prompt_read_back_from_each_metadata_format(tmp_path) -> None:
    ours = {"prompt": "a cat", "negative_prompt": "dog", "width": 64, "height": 48, "steps": 7, "cfg_scale": 5.0,
            "seed": 42}
    a1111 = "a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64"
    sdbatch_line = prompt_from_image(_png(tmp_path / "s.png", sdbatch=json.dumps(ours)), "")
    assert sdbatch_line.text == "a cat --w 64 --h 48 --s 7 --l 5.0 --d 42" and sdbatch_line.negative == "dog"
    a1111_line = prompt_from_image(_png(tmp_path / "a.png", parameters=a1111), "")
    assert (a1111_line.text, a1111_line.negative) == ("a red fox", "blurry")
    kohya = prompt_from_image(_png(tmp_path / "k.png", prompt="a bird", **{"negative-prompt": "ugly"}), "")
    assert (kohya.text, kohya.negative) == ("a bird", "ugly")
    assert prompt_from_image(_png(tmp_path / "plain.png"), "") is None


def test_no_prompt_and_no_metadata_is_an_error(tmp_path) -> None:
    run_spec = spec("x.safetensors", prompt=None, init_image=str(_png(tmp_path / "plain.png")))
    with pytest.raises(ConfigError, match="carries no prompt"):
        _prompt_lines(run_spec, None)


def test_strength_out_of_range_is_a_config_error() -> None:
    from sdbatch.config.resolve import _check

    with pytest.raises(ConfigError, match="strength must be in"):
        _check(dataclasses.replace(spec("x"), strength=1.5))

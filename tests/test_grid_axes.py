"""Fused grids: axes parse and validate, jobs expand per cell and share batches, the labelled sheet is written."""

from __future__ import annotations

import dataclasses

import pytest
from engine_helpers import pixels, spec

from sdbatch.config.grid_axes import grid_axes, parse_axis
from sdbatch.config.spec import GridConfig
from sdbatch.errors import ConfigError
from sdbatch.plan.batching import make_batches
from sdbatch.plan.grid import expand, sheets
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine


def _grid_spec(x=None, y=None, z=None, **changes):
    return spec("x.safetensors", grid=GridConfig(x=x, y=y, z=z), **changes)


def test_cells_expand_every_planned_image_x_fastest() -> None:
    run_spec = _grid_spec("sampler.cfg_scale:5,7,9", "seed:1,2")
    jobs = expand(plan(run_spec, [PromptLine("a red car", "", "p")], 0), grid_axes(run_spec), "default")
    assert [(j.seed, j.cfg_scale) for j in jobs] == [(1, 5.0), (1, 7.0), (1, 9.0), (2, 5.0), (2, 7.0), (2, 9.0)]
    assert [j.index for j in jobs] == list(range(6)) and len({j.file_name for j in jobs}) == 6
    assert len(make_batches(jobs, batch_size=8)) == 1, "seed and CFG cells share one UNet batch"


def test_prompt_search_replace_and_samplers() -> None:
    run_spec = _grid_spec("prompt_sr:red,blue,green", "sampler:euler_a,dpmpp_2m_karras")
    jobs = expand(plan(run_spec, [PromptLine("a red car", "", "p")], 0), grid_axes(run_spec), "default")
    assert [j.prompt for j in jobs[:3]] == ["a red car", "a blue car", "a green car"]
    assert (jobs[3].sampler, jobs[3].schedule) == ("dpmpp_2m_karras", "karras")


def test_prompt_search_replace_changes_the_negative_too_and_needs_the_word() -> None:
    run_spec = _grid_spec("prompt_sr:red,blue")
    jobs = expand(plan(run_spec, [PromptLine("a car", "red haze", "p"), PromptLine("a ball", "", "q")], 0),
                  grid_axes(run_spec), "default")
    assert [(j.prompt, j.negative_prompt) for j in jobs] == [
        ("a car", "red haze"), ("a car", "blue haze"), ("a ball", ""), ("a ball", "")]
    with pytest.raises(ConfigError, match="grid.x=prompt_sr: the word 'red' .* is in no prompt"):
        expand(plan(run_spec, [PromptLine("a car", "", "p")], 0), grid_axes(run_spec), "default")


def test_sheets_lay_out_rows_and_z_pages() -> None:
    run_spec = _grid_spec("seed:1,2", "steps:3,4", "prompt_sr:red,blue")
    base = plan(dataclasses.replace(run_spec, images_per_prompt=2), [PromptLine("a red car", "", "p")], 0)
    jobs = expand(base, grid_axes(run_spec), "default")
    pages = sheets(jobs, grid_axes(run_spec), base_count=2)
    assert [p.name for p in pages] == ["grid-z1.png", "grid-z2.png"] and pages[1].title == "prompt_sr: blue"
    assert len(pages[0].rows) == 4 and pages[0].y_labels[0] == "#1 steps: 3"
    assert pages[0].rows[0] == [jobs[0].file_name, jobs[1].file_name]


@pytest.mark.parametrize(("x", "y", "z", "message"), [
    ("colour:1,2", None, None, "unknown axis key 'colour'"),
    ("seed", None, None, "give values after a colon"),
    ("seed:1,x", None, None, "'x' is not a valid seed value"),
    ("width:100", None, None, "multiple of 8"),
    ("sampler:nope", None, None, "unknown sampler 'nope'"),
    (None, "seed:1", None, "need grid.x first"),
])
def test_bad_axes_fail_before_loading(x, y, z, message) -> None:
    with pytest.raises(ConfigError, match=message):
        grid_axes(_grid_spec(x, y, z))


def test_fused_grid_run_writes_labelled_sheet(sd1_single_file, tmp_path) -> None:
    from sdbatch.cli.runner import run

    run_spec = spec(sd1_single_file, prompt="a red car", steps=2, grid=GridConfig(x="sampler.cfg_scale:3,7",
                                                                                    y="seed:1,2,3"))
    result = run(run_spec, tmp_path)
    assert len(result.written) == 6
    sheet = pixels(tmp_path / "grid.png")
    assert sheet.shape[0] > 3 * 64 and sheet.shape[1] > 2 * 64, "labels add margins around 3 rows × 2 columns"
    assert parse_axis("sampler.cfg_scale:1,2", "x").labels == ["cfg_scale: 1", "cfg_scale: 2"]


def test_key_and_values_form_equals_the_string_form() -> None:
    structured = _grid_spec({"key": "sampler.cfg_scale", "values": [5, 7.5]}, {"key": "seed", "values": [1, 2]})
    assert grid_axes(structured) == grid_axes(_grid_spec("sampler.cfg_scale:5,7.5", "seed:1,2"))
    muls = grid_axes(_grid_spec({"key": "network_muls", "values": [[0.5, 1], 0]}))[0]
    assert muls.values == ("0.5;1", "0"), "a list value is one cell's multipliers, as 0.5;1 in the string form"
    words = grid_axes(_grid_spec({"key": "prompt_sr", "values": ["red", "ink, pen", "<lora:s:0.5>"]}))[0]
    assert words.values == ("red", "ink, pen", "<lora:s:0.5>"), "values may hold commas and colons"


@pytest.mark.parametrize(("x", "message"), [
    ({"key": "seed", "values": None}, r"grid.x.values is not set: give the axis's values"),
    ({"key": None, "values": [1]}, r"grid.x.key is not set"),
    ({"key": "sed", "values": [1]}, r"unknown axis key 'sed'"),
    ({"key": "seed", "values": []}, r"grid.x: no values for seed"),
    ({"key": "width", "values": [100]}, r"multiple of 8"),
    (["seed", 1], r"give grid.x.key=KEY 'grid.x.values=\[V1,V2\]'"),
])
def test_bad_key_and_values_axes_name_the_key(x, message) -> None:
    with pytest.raises(ConfigError, match=message):
        grid_axes(_grid_spec(x))


def test_unset_axes_are_no_grid() -> None:
    assert grid_axes(_grid_spec({"key": None, "values": None}, None, "")) == []
    with pytest.raises(ConfigError, match="need grid.x first"):
        grid_axes(_grid_spec({"key": None, "values": None}, {"key": "seed", "values": [1]}))

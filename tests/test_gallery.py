"""Gallery pages without a browser: the HTML/JSON writer (escaping, relative paths, atomic writes), thumbnails,
the reproducing command, page data for runs, fused grids and sweeps, and the pages a real run leaves."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from engine_helpers import pixels
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image
from test_outputs import make_params, small_image

from sdbatch.cli.gallery import main as gallery_main
from sdbatch.outputs.gallery import RunGallery, rebuild
from sdbatch.outputs.gallery_data import run_page_data, sweep_page_data
from sdbatch.outputs.gallery_page import PAGE, embed_json, render, url
from sdbatch.outputs.reproduce import command
from sdbatch.outputs.run_dir import RunDir
from sdbatch.outputs.sweep_index import JobRecord
from sdbatch.outputs.thumbnails import thumbnail, thumbnail_name

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '<script>alert(1)</script> & "quotes" \u2028 </SCRIPT><!-- ${oc.env:HOME}'


def page_data(text: str) -> dict:
    """The JSON a page embeds, read back as the browser's JSON.parse would."""
    match = re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def make_run(path: Path, count: int = 3, **changes) -> RunDir:
    out = RunDir(path)
    for i in range(count):
        out.save(small_image(i * 40), make_params(i, **changes))
    return out


# ---------------------------------------------------------------- the writer


def test_embedded_json_cannot_end_its_script_element_and_reads_back() -> None:
    text = embed_json({"prompt": HOSTILE})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"prompt": HOSTILE}


def test_page_escapes_prompts_everywhere_and_keeps_them_as_data(tmp_path) -> None:
    make_run(tmp_path, prompt=HOSTILE, negative_prompt=HOSTILE)
    page = render(run_page_data(tmp_path, live=False))
    assert "<script>alert" not in page and "</SCRIPT>" not in page and "<!-- ${" not in page
    assert page.count("<script") == 2  # the data element and the page's own code, nothing from a prompt
    assert html.escape("<script>alert(1)</script>") in page  # the static list shows it as text
    assert page_data(page)["items"][0]["params"]["prompt"] == HOSTILE
    for asset in ("gallery.js", "gallery.css"):  # inlined as-is: they must not close their element
        text = (ROOT / "sdbatch" / "outputs" / asset).read_text()
        assert "</" not in text and "<!--" not in text and "<script" not in text


def test_page_paths_are_relative_and_percent_encoded(tmp_path) -> None:
    out = RunDir(tmp_path / "run")
    out.save(small_image(), make_params(0, file_name="a #1?.png"))
    page = render(run_page_data(tmp_path / "run", live=False))
    assert str(tmp_path) not in page  # the folder can be moved or zipped
    assert 'href="a%20%231%3F.png"' in page and url("thumbs/x y.webp") == "thumbs/x%20y.webp"
    assert page_data(page)["items"][0]["file"] == "a #1?.png"  # gallery.js encodes it the same way


def test_page_is_written_atomically(tmp_path, monkeypatch) -> None:
    make_run(tmp_path)
    gallery = RunGallery(tmp_path)
    gallery.finish()
    before = (tmp_path / PAGE).read_text()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sdbatch.outputs.gallery_page.render", lambda data: "x" * 10_000)
    monkeypatch.setattr("os.replace", broken)
    gallery.finish()  # warned, not raised: the run goes on
    assert (tmp_path / PAGE).read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_live_page_reloads_until_the_run_ends(tmp_path) -> None:
    gallery = RunGallery(tmp_path, interval=0)
    out = RunDir(tmp_path, on_save=gallery.saved)
    out.save(small_image(), make_params(0))
    live = (tmp_path / PAGE).read_text()
    assert page_data(live)["live"] is True and 'http-equiv="refresh"' in live  # also without JavaScript
    out.save(small_image(1), make_params(1))
    assert len(page_data((tmp_path / PAGE).read_text())["items"]) == 2  # rewritten after every image
    gallery.finish()
    done = (tmp_path / PAGE).read_text()
    assert page_data(done)["live"] is False and "refresh" not in done


def test_live_page_is_rewritten_at_most_every_interval(tmp_path) -> None:
    gallery = RunGallery(tmp_path, interval=3600)
    out = RunDir(tmp_path, on_save=gallery.saved)
    out.save(small_image(), make_params(0))
    out.save(small_image(1), make_params(1))
    assert len(page_data((tmp_path / PAGE).read_text())["items"]) == 1
    gallery.finish()  # the last write always happens
    assert len(page_data((tmp_path / PAGE).read_text())["items"]) == 2


def test_thumbnails_only_for_large_images(tmp_path) -> None:
    Image.new("RGB", (512, 256)).save(tmp_path / "small.png")
    Image.new("RGB", (768, 512), (200, 10, 10)).save(tmp_path / "large.png")
    assert thumbnail(tmp_path, "small.png") == "small.png" and not (tmp_path / "thumbs").exists()
    name = thumbnail(tmp_path, "large.png")
    assert name == thumbnail_name("large.png") and name.startswith("thumbs/")
    with Image.open(tmp_path / name) as thumb:
        assert max(thumb.size) <= 384 and thumb.size[0] > thumb.size[1]
    assert not [p for p in (tmp_path / "thumbs").iterdir() if p.name.endswith(".tmp")]
    assert thumbnail(tmp_path, "missing.png") == "missing.png"  # the page shows it as missing


# ---------------------------------------------------------------- the command


def _words(line: str) -> dict[str, str]:
    """{key: value as Hydra reads it} of a command line, after bash's word splitting."""
    parser = OverridesParser.create()
    words = shlex.split(line)
    assert words[0] == "sdbatch"
    return {o.key_or_group: o.value() for o in map(parser.parse_override, words[1:])}


def test_command_keeps_run_settings_and_gives_the_image_its_own() -> None:
    record = make_params(3, prompt="a cat, (red:1.2) <lora:x:0.5>", negative_prompt="it's 123",
                         raw_prompt="{a|b} cat --w 512 --d 7,8 --n neg --am 0.5 --f out.png")
    line = command(record, ["model=tiny", "seed=1", "prompt_file=p.txt", "images_per_prompt=4", "sampler=euler",
                            "grid.x='seed:1,2'", "network=lora", "hydra.run.dir=x"])
    words = _words(line)
    assert words["model"] == "tiny" and words["sampler"] == "euler" and words["network"] == "lora"
    assert words["prompt"] == "a cat, (red:1.2) <lora:x:0.5> --w 512 --am 0.5"  # its line's options, not d/n/f
    assert words["negative_prompt"] == "it's 123" and words["seed"] == 1003 and words["images_per_prompt"] == 1
    assert not {"prompt_file", "grid.x", "hydra.run.dir"} & set(words)


def test_command_of_a_grid_cell_sets_the_cell_values() -> None:
    record = {**make_params(0, prompt="a cat"), "guidance": {"units": [{"weight": 0.5}, {"weight": 1.0}]}}
    words = _words(command(record, ["sampler=euler", "sampler.cfg_scale=3", "sampler.steps=9"],
                           {"sampler": "ddim", "cfg_scale": "9", "network_muls": "0.5;1", "seed": "4",
                            "guidance.weights": "0.5"}))
    assert words["sampler"] == "euler" and words["sampler.name"] == "ddim"  # the grid's sampler, its own schedule
    assert words["sampler.schedule"] == "default"
    assert words["sampler.cfg_scale"] == 9 and words["sampler.steps"] == 9  # the axis alias; each key once
    assert words["guidance.weights"] == [0.5, 1.0]  # every model's weight, from the image's record
    assert words["prompt"] == "a cat --am 0.5,1" and words["seed"] == 1000


# ---------------------------------------------------------------- page data


def test_fused_grid_cells_come_from_the_planned_index(tmp_path) -> None:
    out = make_run(tmp_path, 6)
    out.write_config({"grid": {"x": {"key": "sampler.cfg_scale", "values": [3, 9]}, "y": "seed:1,2,3",
                      "z": {"key": None, "values": None}}}, {})
    data = run_page_data(tmp_path, live=False)
    assert data["dims"] == [{"key": "sampler.cfg_scale", "values": ["3", "9"]},
                            {"key": "seed", "values": ["1", "2", "3"]}]
    assert [item["cell"]["sampler.cfg_scale"] for item in data["items"]] == ["3", "9"] * 3
    assert [item["cell"]["seed"] for item in data["items"]] == ["1", "1", "2", "2", "3", "3"]
    assert "sampler.cfg_scale=9" in data["items"][1]["command"]


def test_sweep_data_has_swept_keys_as_dims_and_failed_jobs_with_their_error(tmp_path) -> None:
    for num in (0, 1):
        make_run(tmp_path / str(num), 2)
    jobs = [JobRecord(0, ["seed=1", "width=64"], "0", "completed"),
            JobRecord(1, ["seed=2", "width=64"], "1", "completed"),
            JobRecord(2, ["seed=1", "width=100"], "2", "failed", error="width must be a multiple of 8")]
    data = sweep_page_data(tmp_path, jobs)
    assert [d["key"] for d in data["dims"]] == ["seed", "width", "image"]
    assert data["dims"][1]["values"] == ["64", "100"] and data["failed"] == 1
    assert data["items"][2]["file"] == "1/00000-1000.png" and data["items"][2]["cell"]["seed"] == "2"
    assert data["items"][-1]["file"] is None and "multiple of 8" in data["items"][-1]["error"]
    page = render(data)
    assert "job 2 failed: width must be a multiple of 8" in page and "3 jobs · 4 images · 1 failed" in page


def test_rebuild_names_a_folder_that_is_neither_run_nor_sweep(tmp_path, capsys) -> None:
    make_run(tmp_path / "run")
    assert gallery_main([str(tmp_path / "run")]) == 0 and (tmp_path / "run" / PAGE).exists()
    assert gallery_main([str(tmp_path / "nothing"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("sdbatch-gallery: ") for line in err)
    assert "is not a directory" in err[0] and "holds neither manifest.jsonl" in err[1]
    assert rebuild(tmp_path / "run") == tmp_path / "run" / PAGE


# ---------------------------------------------------------------- real runs


def run_command(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """A command as a user runs it: the tiny model's cache, no hub, and this Python's scripts (`sdbatch`) on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": path}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_run_page_and_its_command_remake_the_image(cache_dir, tmp_path) -> None:
    """A run leaves a finished page; the command of its third image, run in bash, makes that image again."""
    run = tmp_path / "run"
    args = ["model=tiny", "prompt=a red cube --s 3", "images_per_prompt=3", "seed=11", "width=64", "height=64",
            "sampler.steps=4", "perf.progress=false", f"hydra.run.dir={run}"]
    proc = run_command([sys.executable, str(ROOT / "run.py"), *args], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = page_data((run / PAGE).read_text())
    assert data["live"] is False and [i["params"]["seed"] for i in data["items"]] == [11, 12, 13]
    line = data["items"][2]["command"]
    assert "seed=13 images_per_prompt=1" in line and "--s 3" in line
    again = tmp_path / "again"
    script = line.replace("sdbatch", f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'run.py'))}", 1)
    proc = run_command(["bash", "-c", f"{script} hydra.run.dir={again}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (made,) = sorted(again.glob("*.png"))
    assert np.array_equal(pixels(made), pixels(run / data["items"][2]["file"]))


def test_gallery_off_writes_no_page(cache_dir, tmp_path) -> None:
    run = tmp_path / "run"
    proc = run_command([sys.executable, str(ROOT / "run.py"), "model=tiny", "prompt=a cat", "width=64", "height=64",
                        "sampler.steps=2", "perf.progress=false", "output.gallery=false", f"hydra.run.dir={run}"],
                       cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "manifest.jsonl").exists() and not (run / PAGE).exists()
    # a page made afterwards
    proc = run_command([sys.executable, "-m", "sdbatch.gallery", str(run)], cache_dir, tmp_path)
    assert proc.returncode == 0 and (run / PAGE).exists() and str(run / PAGE) in proc.stdout

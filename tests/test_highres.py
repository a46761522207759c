"""Highres. fix: stage 1 = plain txt2img at the small size, final size, pixel/latent/plug-in upscale, stage 2 =
img2img of the stage-1 image, first-stage files and manifest, A1111 infotext keys, config errors, end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import max_diff, ours_img2img, spec
from PIL import Image
from test_run import ROOT, manifest, run_cli

from sdbatch.cli.runner import run
from sdbatch.config.highres_schema import check, first_stage_size
from sdbatch.config.spec import HighresConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.errors import ConfigError
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.png_info import parse_infotext, read_png_params
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [11, 12345]
ON = HighresConfig(name="on", scale=0.5, steps=3, strength=0.5)


def nearest_double(images, size):
    """A highres.upscaler plug-in for the tests: nearest-neighbour resize of PIL images."""
    return [image.resize(size, Image.Resampling.NEAREST) for image in images]


def jobs_of(run_spec):
    lines = [PromptLine(p, "", "test") for p in PROMPTS]
    return tuple(dataclasses.replace(job, seed=seed) for job, seed in
                 zip(plan(run_spec, lines, base_seed=0), SEEDS, strict=True))


def highres(run_spec):
    jobs = jobs_of(run_spec)
    engine = get_engine(run_spec.model, run_spec.perf)
    return engine.run_highres(Batch(BatchKey.of(jobs[0]), jobs))


def test_first_stage_size_rounds_down_to_multiples_of_8() -> None:
    assert first_stage_size(128, 200, 0.5) == (64, 96)
    assert first_stage_size(512, 768, 0.7) == (352, 536)
    with pytest.raises(ConfigError, match="highres.scale"):
        first_stage_size(64, 64, 0.1)


@pytest.mark.parametrize("latent", [False, True])
def test_stage_one_is_plain_txt2img_and_final_has_the_final_size(latent, sd1_single_file) -> None:
    cfg = dataclasses.replace(ON, latent_upscale=latent, latent_mode="bicubic")
    first, final = highres(spec(sd1_single_file, steps=4, width=128, height=128, highres=cfg))
    plain_spec = spec(sd1_single_file, steps=3, width=64, height=64)
    plain_jobs = jobs_of(plain_spec)
    plain = get_engine(plain_spec.model, plain_spec.perf).run_batch(Batch(BatchKey.of(plain_jobs[0]), plain_jobs))
    assert max_diff([np.asarray(im) for im in first], [np.asarray(im) for im in plain]) == 0
    assert [im.size for im in final] == [(128, 128)] * 2
    upscaled = [np.asarray(im.resize((128, 128), Image.Resampling.LANCZOS)).astype(int) for im in first]
    assert all(np.abs(np.asarray(f).astype(int) - u).mean() > 1 for f, u in zip(final, upscaled, strict=True))


def test_pixel_stage_two_is_img2img_of_the_first_stage_image(sd1_single_file, tmp_path) -> None:
    first, final = highres(spec(sd1_single_file, steps=4, width=128, height=128, highres=ON))
    paths = []
    for i, image in enumerate(first):
        paths.append(tmp_path / f"first-{i}.png")
        image.save(paths[-1])
    again = ours_img2img(spec(sd1_single_file, steps=4, width=128, height=128), PROMPTS, SEEDS, paths, ON.strength)
    assert max_diff(again, [np.asarray(im) for im in final]) == 0


def test_upscaler_plugin_is_used_and_bad_paths_name_the_key(sd1_single_file) -> None:
    cfg = dataclasses.replace(ON, upscaler="test_highres:nearest_double")
    _, with_plugin = highres(spec(sd1_single_file, steps=4, width=128, height=128, highres=cfg))
    _, lanczos = highres(spec(sd1_single_file, steps=4, width=128, height=128, highres=ON))
    assert max_diff([np.asarray(im) for im in with_plugin], [np.asarray(im) for im in lanczos]) > 0
    for bad in ("no_such_module:f", "test_highres:missing", "no-colon"):
        with pytest.raises(ConfigError, match="highres.upscaler"):
            check(dataclasses.replace(ON, upscaler=bad))
    with pytest.raises(ConfigError, match="highres.latent_mode"):
        check(dataclasses.replace(ON, latent_mode="nearest"))


def test_save_first_stage_files_manifest_and_infotext(sd1_single_file, tmp_path) -> None:
    cfg = dataclasses.replace(ON, save_first_stage=True)
    run_spec = spec(sd1_single_file, steps=4, width=128, height=128, highres=cfg, seed=7, prompt="x")
    result = run(run_spec, tmp_path)
    lines = {line["file"]: line for line in manifest(tmp_path)}
    assert set(lines) == {"00000-7.png", "00000-7-first.png"}
    assert lines["00000-7-first.png"]["stage"] == 1 and lines["00000-7-first.png"]["width"] == 64
    assert lines["00000-7-first.png"]["highres"] is None and lines["00000-7.png"]["highres"]["stage2_seed"] == 7
    assert Image.open(tmp_path / "00000-7-first.png").size == (64, 64)
    assert [p.name for p in result.written] == ["00000-7-first.png", "00000-7.png"]
    info = parse_infotext(read_png_params(tmp_path / "00000-7.png")["parameters"])
    assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"]) == ("2", "4", "Lanczos")
    assert (info["Denoising strength"], info["Steps"], info["Size-1"]) == ("0.5", "3", "64")
    first_info = parse_infotext(read_png_params(tmp_path / "00000-7-first.png")["parameters"])
    assert "Hires upscale" not in first_info and "Denoising strength" not in first_info


def test_end_to_end_highres_command(cache_dir, tmp_path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    proc: subprocess.CompletedProcess = run_cli(
        ["model=tiny", "highres=on", "highres.scale=0.5", "width=128", "height=128", "prompt=x", "sampler.steps=4",
         "highres.steps=3", "highres.latent_upscale=true", "seed=3", "perf.progress=false",
         f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (png,) = run_dir.glob("*.png")
    assert Image.open(png).size == (128, 128)
    params = json.loads(Image.open(png).text["sdbatch"])
    assert params["highres"]["first_width"] == 64 and params["highres"]["latent_upscale"] is True
    assert parse_infotext(Image.open(png).text["parameters"])["Hires upscaler"] == "Latent"


def test_end_to_end_config_errors(cache_dir, tmp_path) -> None:  # noqa: F811
    for args, key in ((["highres=on", "highres.upscaler=nope:f"], "highres.upscaler"),
                      (["sampler=pndm", "sampler.steps=3"], "sampler.steps")):
        proc = run_cli(["model=tiny", "prompt=x", f"hydra.run.dir={tmp_path / 'r'}", *args], cache_dir, tmp_path)
        assert proc.returncode != 0 and key in proc.stderr, proc.stderr
    assert Path(ROOT / "conf" / "highres" / "on.yaml").is_file()


def test_second_stage_alone_from_a_saved_first_stage_image(sd1_single_file, tmp_path) -> None:
    """img2img on NAME-first.png without a prompt, at the final size and strength, remakes the final image."""
    cfg = dataclasses.replace(ON, save_first_stage=True)
    run(spec(sd1_single_file, steps=4, width=128, height=128, highres=cfg, seed=7, prompt="a red cube"),
        tmp_path / "hr")
    again = spec(sd1_single_file, steps=4, width=128, height=128, prompt=None, seed=0, strength=ON.strength,
                 init_image=str(tmp_path / "hr" / "00000-7-first.png"))
    (path,) = run(again, tmp_path / "second").written
    assert read_png_params(path)["sdbatch"]["prompt"] == "a red cube"
    final = np.asarray(Image.open(tmp_path / "hr" / "00000-7.png"))
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), final)

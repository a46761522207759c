"""Tests for sdbatch.outputs.run_dir: A1111 infotext, PNG metadata, manifest, atomic writes and resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from sdbatch import __version__
from sdbatch.errors import OutputError
from sdbatch.outputs.metadata import image_params, infotext, reference_keys
from sdbatch.outputs.run_dir import RunDir
from sdbatch.plan.jobs import ImageJob, ModelInfo
from sdbatch.prompts.png_info import parse_infotext, read_png_params

MODEL = ModelInfo(name="v1-5-pruned-emaonly", hash="6ce0161689", family="sd1", v_prediction=False,
                  clip_skip=1, precision="fp32")
CONTRACT_FIELDS = {"file", "prompt", "negative_prompt", "seed", "width", "height", "steps", "sampler",
                   "cfg_scale", "strength", "networks", "clip_skip"}


def make_job(index: int = 0, **changes) -> ImageJob:
    fields = dict(index=index, file_name=f"{index:05d}-{1000 + index}.png", prompt="a red cube, studio light",
                  negative_prompt="blurry", seed=1000 + index, width=512, height=768, steps=20,
                  sampler="dpmpp_2m", schedule="karras", cfg_scale=7.0, eta=0.0, origin="prompt")
    fields.update(changes)
    return ImageJob(**fields)


def make_params(index: int = 0, model: ModelInfo = MODEL, **changes) -> dict:
    return image_params(make_job(index, **changes), model, "0.1.0")


def small_image(value: int = 0) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, 128, 255 - value))


# ---------------------------------------------------------------- image_params


def test_image_params_holds_contract_fields_and_is_json():
    params = make_params(3)
    assert CONTRACT_FIELDS <= params.keys()
    assert params["file"] == "00003-1003.png"
    assert params["strength"] is None and params["networks"] == []
    assert params["model_hash"] == "6ce0161689" and params["sdbatch_version"] == "0.1.0"
    assert params["origin"] == "prompt" and params["index"] == 3
    assert json.loads(json.dumps(params)) == params


def test_image_params_records_schedule_implied_by_sampler_name():
    params = make_params(sampler="dpmpp_2m_karras", schedule="default")
    assert params["schedule"] == "karras"
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in infotext(params)


# ---------------------------------------------------------------- infotext


def test_infotext_exact_with_negative_karras_and_clip_skip():
    model = replace(MODEL, clip_skip=2)
    text = infotext(make_params(model=model))
    assert text == (
        "a red cube, studio light\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1000, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, Version: sdbatch 0.1.0"
    )


def test_infotext_exact_without_negative_default_schedule():
    params = make_params(negative_prompt="", sampler="euler_a", schedule="default", cfg_scale=7.5)
    assert infotext(params) == (
        "a red cube, studio light\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 1000, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Version: sdbatch 0.1.0"
    )


def test_infotext_vae_strength_and_quoting():
    model = replace(MODEL, name="my,model", vae_name="vae-ft-mse", vae_hash="abcdef0123")
    params = {**make_params(model=model, sampler="ddim", schedule="default"), "strength": 0.75, "init_image": "in.png"}
    text = infotext(params)
    assert text.endswith(
        'Model hash: 6ce0161689, Model: "my,model", VAE hash: abcdef0123, VAE: vae-ft-mse, '
        "Denoising strength: 0.75, RNG: CPU, Version: sdbatch 0.1.0"
    )
    parsed = parse_infotext(text)
    assert parsed["Model"] == "my,model" and parsed["VAE"] == "vae-ft-mse"
    assert parsed["Denoising strength"] == "0.75" and parsed["Sampler"] == "DDIM"


def test_infotext_multiline_prompt_round_trip():
    prompt = "masterpiece, (red:1.2) cube\nsecond line, with: colon"
    params = make_params(prompt=prompt, negative_prompt="lowres, bad anatomy", seed=4294967295)
    parsed = parse_infotext(infotext(params))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == "lowres, bad anatomy"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "7" and parsed["Seed"] == "4294967295"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert parsed["Model hash"] == "6ce0161689" and parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Clip skip"] == "1" and parsed["Version"] == "sdbatch 0.1.0"


def test_parse_infotext_a1111_sample_and_edge_cases():
    sample = (
        "cat\nNegative prompt: dog\nnegative more\n"
        "Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x768, "
        'Lora hashes: "add_detail: 7c6bad76eb54"'
    )
    parsed = parse_infotext(sample)
    assert parsed["Prompt"] == "cat" and parsed["Negative prompt"] == "dog\nnegative more"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    # a last line with fewer than 3 key: value pairs is prompt text
    only_prompt = parse_infotext("a photo\nStyle: noir, Light: soft")
    assert only_prompt["Prompt"] == "a photo\nStyle: noir, Light: soft" and "Style" not in only_prompt


def test_infotext_non_latin_prompt_round_trip(tmp_path):
    params = make_params(prompt="猫, 桜", negative_prompt="")
    run = RunDir(tmp_path)
    path = run.save(small_image(), params)
    read = read_png_params(path)
    assert parse_infotext(read["parameters"])["Prompt"] == "猫, 桜"
    assert read["sdbatch"] == params


# ---------------------------------------------------------------- save, manifest, config


def test_save_writes_png_chunks_manifest_and_no_temp_files(tmp_path):
    run = RunDir(tmp_path / "run")
    all_params = [make_params(i) for i in range(2)]
    for i, params in enumerate(all_params):
        path = run.save(small_image(i * 50), params)
        assert path == tmp_path / "run" / params["file"]
        with Image.open(path) as image:
            expected = {"parameters": infotext(params), **reference_keys(params), "sdbatch": json.dumps(params)}
            assert image.text == expected
            assert image.size == (8, 8)
        assert b"tEXtparameters\x00" in path.read_bytes() and b"tEXtsdbatch\x00" in path.read_bytes()
    lines = (tmp_path / "run" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == all_params
    assert all(CONTRACT_FIELDS <= json.loads(line).keys() for line in lines)
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_read_png_params_on_foreign_png(tmp_path):
    path = tmp_path / "plain.png"
    small_image().save(path)
    assert read_png_params(path) == {"parameters": None, "sdbatch": None}
    with pytest.raises(OutputError, match="not-an-image"):
        (tmp_path / "not-an-image.png").write_text("hello")
        read_png_params(tmp_path / "not-an-image.png")


def test_write_config(tmp_path):
    run = RunDir(tmp_path)
    resolved = OmegaConf.create({"prompt": "a, b: c", "width": 512, "sampler": {"name": "ddim", "steps": 50}})
    path = run.write_config(resolved, {"/models/v1-5.safetensors": "6ce0161689"})
    loaded = OmegaConf.to_container(OmegaConf.load(path))
    assert loaded == {"prompt": "a, b: c", "width": 512, "sampler": {"name": "ddim", "steps": 50},
                      "sdbatch_version": __version__,
                      "model_hashes": {"/models/v1-5.safetensors": "6ce0161689"}}


# ---------------------------------------------------------------- resume


def _interrupted_run(path: Path) -> list[ImageJob]:
    """Two complete images, a third whose manifest line was cut, a fourth PNG with no manifest line."""
    jobs = [make_job(i) for i in range(5)]
    run = RunDir(path)
    for job in jobs[:2]:
        run.save(small_image(), image_params(job, MODEL, "0.1.0"))
    third = image_params(jobs[2], MODEL, "0.1.0")
    run.save(small_image(), third)
    manifest = path / "manifest.jsonl"
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text[: len(text) - 40], encoding="utf-8")  # killed in the middle of line 3
    small_image().save(path / jobs[3].file_name)  # PNG renamed, killed before its manifest line
    return jobs


def test_resume_skips_only_complete_images(tmp_path):
    jobs = _interrupted_run(tmp_path)
    run = RunDir(tmp_path)
    assert [run.is_done(job) for job in jobs] == [True, True, False, False, False]
    for job in jobs[2:]:
        run.save(small_image(), image_params(job, MODEL, "0.1.0"))
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [job.file_name for job in jobs]
    assert all(RunDir(tmp_path).is_done(job) for job in jobs)


def test_resume_needs_png_on_disk(tmp_path):
    jobs = [make_job(i) for i in range(2)]
    run = RunDir(tmp_path)
    for job in jobs:
        run.save(small_image(), image_params(job, MODEL, "0.1.0"))
    (tmp_path / jobs[1].file_name).unlink()
    assert [RunDir(tmp_path).is_done(job) for job in jobs] == [True, False]


def test_manifest_complete_last_line_without_newline_is_kept(tmp_path):
    jobs = [make_job(i) for i in range(2)]
    RunDir(tmp_path).save(small_image(), image_params(jobs[0], MODEL, "0.1.0"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(manifest.read_text().rstrip("\n"))
    run = RunDir(tmp_path)
    assert run.is_done(jobs[0])
    run.save(small_image(), image_params(jobs[1], MODEL, "0.1.0"))
    files = [json.loads(line)["file"] for line in manifest.read_text().splitlines()]
    assert files == [job.file_name for job in jobs]


def test_no_resume_keeps_lines_and_overwrites(tmp_path):
    job = make_job(0)
    RunDir(tmp_path).save(small_image(0), image_params(job, MODEL, "0.1.0"))
    run = RunDir(tmp_path, resume=False)
    assert not run.is_done(job)
    path = run.save(small_image(200), image_params(job, MODEL, "0.1.0"))
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == (200, 128, 55)


def test_unwritable_directory_is_output_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    with pytest.raises(OutputError, match="hydra.run.dir") as err:
        RunDir(target)
    assert str(target) in str(err.value) and "\n" not in str(err.value)


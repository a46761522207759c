"""Images other tools read and images of other tools (issue 13 §3-§4): output.format=jpg|webp with A1111's EXIF
UserComment, output.sidecar, and init images from A1111 (JPEG) and ComfyUI (PNG node graph) read back."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import pytest
from engine_helpers import spec
from PIL import Image, PngImagePlugin

from sdbatch.cli.runner import run
from sdbatch.config.spec import GridConfig, OutputConfig
from sdbatch.errors import ConfigError
from sdbatch.outputs.image_formats import intact_image
from sdbatch.outputs.metadata import infotext
from sdbatch.plan.planner import plan
from sdbatch.plan.stage import plan_run, prompt_lines
from sdbatch.prompts.exif_comment import decode_comment, exif_with_comment, read_comment
from sdbatch.prompts.init_images import prompt_from_image
from sdbatch.prompts.png_info import parse_infotext, read_png_params
from sdbatch.prompts.sources import PromptLine

PROMPT = 'a "cat", (red:1.2)\nsecond line, über'
NEGATIVE = "blurry, lowres"
A1111_TEXT = ("a fox in the snow, (masterpiece:1.2)\nNegative prompt: lowres, bad anatomy\n"
              "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, "
              "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")


def small(checkpoint, **top):
    """A 64x64, 2-step run spec on the tiny model."""
    return spec(checkpoint, steps=2, **top)


def manifest(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- EXIF UserComment


def test_user_comment_is_written_as_piexif_and_a1111_write_it() -> None:
    piexif = pytest.importorskip("piexif")
    helper = pytest.importorskip("piexif.helper")
    raw = piexif.load(exif_with_comment(PROMPT))["Exif"][piexif.ExifIFD.UserComment]
    assert raw == helper.UserComment.dump(PROMPT, encoding="unicode")  # bytes (UNDEFINED), UNICODE + UTF-16BE
    assert helper.UserComment.load(raw) == PROMPT


def test_user_comment_codes_are_decoded() -> None:
    assert decode_comment(b"UNICODE\x00" + "a cät".encode("utf-16-be")) == "a cät"
    assert decode_comment(b"UNICODE\x00" + "a cät".encode("utf-16-le")) == "a cät"  # some tools write LE
    assert decode_comment(b"UNICODE\x00" + "a cät".encode("utf-16")) == "a cät"  # with a byte-order mark
    assert decode_comment(b"ASCII\x00\x00\x00a cat") == "a cat"
    assert decode_comment(b"\x00" * 8 + "a cät".encode()) == "a cät"  # undefined code: A1111 reads UTF-8


@pytest.mark.parametrize("kind", ["JPEG", "WEBP"])
def test_user_comment_survives_pillow_save_and_load(kind) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format=kind, exif=exif_with_comment(PROMPT))
    buffer.seek(0)
    with Image.open(buffer) as image:
        assert read_comment(image) == PROMPT
    with Image.new("RGB", (8, 8)) as plain:
        assert read_comment(plain) is None


# ---------------------------------------------------------------- output.format, quality, sidecar


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_output_format_round_trips_through_our_reader_sd_parsers_and_resume(fmt, sd1_single_file, tmp_path) -> None:
    output = OutputConfig(format=fmt, quality=90, sidecar=True)
    run_spec = small(sd1_single_file, prompt=PROMPT.replace("\n", " "), negative_prompt=NEGATIVE, seed=5,
                     images_per_prompt=2, output=output)
    result = run(run_spec, tmp_path / "run")
    lines = manifest(tmp_path / "run")
    assert [p.name for p in result.written] == ["00000-5." + fmt, "00001-6." + fmt]
    for path, line in zip(result.written, lines, strict=True):
        with Image.open(path) as image:
            assert image.format == {"jpg": "JPEG", "webp": "WEBP"}[fmt] and image.size == (64, 64)
        meta = read_png_params(path)
        assert meta["parameters"] == infotext(line) and meta["sdbatch"] == line  # record from the manifest
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == infotext(line) + "\n"
        info = parse_infotext(meta["parameters"])
        assert (info["Prompt"], info["Negative prompt"], info["Seed"]) == (line["prompt"], NEGATIVE, str(line["seed"]))
        assert intact_image(path)
    again = run(run_spec, tmp_path / "run")
    assert (again.written, again.skipped) == ([], 2)
    sd_parsers = pytest.importorskip("sd_parsers")
    parsed = sd_parsers.ParserManager().parse(str(result.written[0])).samplers[0]
    assert (parsed.name, parsed.prompts[0].value, parsed.negative_prompts[0].value) == ("DDIM", lines[0]["prompt"],
                                                                                         NEGATIVE)
    assert (parsed.parameters["seed"], parsed.parameters["steps"], parsed.parameters["cfg_scale"]) == ("5", "2", "7.5")
    assert (parsed.model.name, parsed.model.hash) == (lines[0]["model"], lines[0]["model_hash"])


def test_names_take_the_format_suffix_also_for_f_names_and_grid_cells() -> None:
    webp = OutputConfig(format="webp")
    jobs = plan(spec("x.safetensors", images_per_prompt=2, output=webp),
                [PromptLine("a cat --f portrait.png", "", "p"), PromptLine("a dog", "", "q")], base_seed=7)
    assert [job.file_name for job in jobs] == ["portrait.webp", "portrait-1.webp", "00002-9.webp", "00003-10.webp"]
    sequential = dataclasses.replace(webp, naming="sequential", format="jpg")
    grid = plan_run(spec("x.safetensors", prompt="a cat", output=sequential, grid=GridConfig(x="seed:1,2")), 0)
    assert [job.file_name for job in grid.jobs] == ["im_000001.jpg", "im_000002.jpg"]


def test_sidecar_is_off_by_default_and_png_stays_png(sd1_single_file, tmp_path) -> None:
    (path,) = run(small(sd1_single_file, prompt="a cat", seed=1), tmp_path / "run").written
    assert path.name == "00000-1.png" and not path.with_suffix(".txt").exists()
    with Image.open(path) as image:
        assert image.format == "PNG" and "sdbatch" in image.text


@pytest.mark.parametrize(("name", "cut"), [("a.jpg", 1), ("a.webp", 1), ("a.webp", -1)])
def test_resume_sees_a_cut_jpeg_or_webp(name, cut, tmp_path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="JPEG" if name.endswith("jpg") else "WEBP")
    data = buffer.getvalue()
    (tmp_path / name).write_bytes(data)
    assert intact_image(tmp_path / name)
    (tmp_path / name).write_bytes(data[:-cut] if cut > 0 else data + b"\x00")
    assert not intact_image(tmp_path / name)


def test_quality_sets_the_jpeg_size(sd1_single_file, tmp_path) -> None:
    sizes = []
    for quality in (20, 100):
        output = OutputConfig(format="jpg", quality=quality)
        (path,) = run(small(sd1_single_file, prompt="a cat", seed=3, output=output), tmp_path / str(quality)).written
        sizes.append(path.stat().st_size)
    assert sizes[0] < sizes[1]


# ---------------------------------------------------------------- an A1111 JPEG as init image


def a1111_jpeg(path: Path, text: str) -> Path:
    """A JPEG as A1111's save_image_with_geninfo writes one: saved at jpeg_quality 80, then piexif.insert of the
    UserComment (piexif.helper, encoding="unicode")."""
    piexif = pytest.importorskip("piexif")
    helper = pytest.importorskip("piexif.helper")
    Image.new("RGB", (64, 64), (90, 120, 200)).save(path, format="JPEG", quality=80)
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: helper.UserComment.dump(text, encoding="unicode")}})
    piexif.insert(exif, str(path))
    return path


def test_a1111_jpeg_as_init_image_brings_its_prompt(sd1_single_file, tmp_path) -> None:
    image = a1111_jpeg(tmp_path / "fox.jpg", A1111_TEXT)
    run_spec = small(sd1_single_file, prompt=None, init_image=str(image), strength=0.5, seed=9)
    (written,) = run(run_spec, tmp_path / "run").written
    (line,) = manifest(tmp_path / "run")
    assert (line["prompt"], line["negative_prompt"]) == ("a fox in the snow, (masterpiece:1.2)", "lowres, bad anatomy")
    assert line["init_image"] == str(image) and line["origin"] == "fox.jpg:metadata"
    assert written.exists()


# ---------------------------------------------------------------- ComfyUI PNGs as init images


def comfyui_graphs(positive: str, negative: str) -> tuple[dict, dict]:
    """ComfyUI's default text-to-image graph as it saves it: the `prompt` (API) graph and the editor's
    `workflow` (nodes with widget values, links [id, from node, from slot, to node, to slot, type])."""
    prompt = {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }

    def node(nid, kind, inputs, widgets):
        return {"id": nid, "type": kind, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": nid, "mode": 0,
                "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs], "outputs": [],
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets}

    workflow = {
        "last_node_id": 9, "last_link_id": 9, "groups": [], "config": {}, "extra": {}, "version": 0.4,
        "nodes": [
            node(3, "KSampler", [("model", "MODEL", 1), ("positive", "CONDITIONING", 4),
                                 ("negative", "CONDITIONING", 6), ("latent_image", "LATENT", 2)],
                 [156680208700286, "randomize", 20, 8, "euler", "normal", 1]),
            node(4, "CheckpointLoaderSimple", [], ["v1-5-pruned-emaonly.safetensors"]),
            node(5, "EmptyLatentImage", [], [512, 512, 1]),
            node(6, "CLIPTextEncode", [("clip", "CLIP", 3)], [positive]),
            node(7, "CLIPTextEncode", [("clip", "CLIP", 5)], [negative]),
            node(8, "VAEDecode", [("samples", "LATENT", 7), ("vae", "VAE", 8)], []),
            node(9, "SaveImage", [("images", "IMAGE", 9)], ["ComfyUI"]),
        ],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
                  [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
                  [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
    }
    return prompt, workflow


def comfyui_png(path: Path, prompt: dict | None, workflow: dict | None) -> Path:
    """A PNG as ComfyUI's SaveImage writes it: `prompt` and `workflow` tEXt chunks holding JSON."""
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if workflow is not None:
        info.add_text("workflow", json.dumps(workflow))
    Image.new("RGB", (64, 64), (200, 80, 40)).save(path, pnginfo=info)
    return path


POSITIVE = "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"
COMFY_NEGATIVE = "text, watermark"


def test_comfyui_png_as_init_image_brings_its_sampler_prompts(sd1_single_file, tmp_path) -> None:
    image = comfyui_png(tmp_path / "ComfyUI_00001_.png", *comfyui_graphs(POSITIVE, COMFY_NEGATIVE))
    run(small(sd1_single_file, prompt=None, init_image=str(image), strength=0.5, seed=4), tmp_path / "run")
    (line,) = manifest(tmp_path / "run")
    assert (line["prompt"], line["negative_prompt"]) == (POSITIVE, COMFY_NEGATIVE)
    assert line["origin"] == "ComfyUI_00001_.png:metadata"


def test_comfyui_workflow_alone_is_read_too(tmp_path) -> None:
    _, workflow = comfyui_graphs(POSITIVE, COMFY_NEGATIVE)
    line = prompt_from_image(comfyui_png(tmp_path / "w.png", None, workflow), "")
    assert (line.text, line.negative) == (POSITIVE, COMFY_NEGATIVE)


def test_comfyui_hires_pass_and_controlnet_are_followed(tmp_path) -> None:
    prompt, workflow = comfyui_graphs(POSITIVE, COMFY_NEGATIVE)
    prompt["10"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["11", 0], "image": ["12", 0], "strength": 1}}
    prompt["13"] = {"class_type": "KSampler", "inputs": {  # a second (hires) pass on the same conditioning
        **prompt["3"]["inputs"], "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["3", 0]}}
    line = prompt_from_image(comfyui_png(tmp_path / "c.png", prompt, workflow), "")
    assert (line.text, line.negative) == (POSITIVE, COMFY_NEGATIVE)


def ambiguous_graph() -> dict:
    """Two samplers with different prompts (a base and a refiner-like pass with its own text)."""
    prompt, _ = comfyui_graphs(POSITIVE, COMFY_NEGATIVE)
    prompt["14"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a different prompt", "clip": ["4", 1]}}
    prompt["13"] = {"class_type": "KSamplerAdvanced", "inputs": {**prompt["3"]["inputs"], "positive": ["14", 0]}}
    return prompt


def combined_graph() -> dict:
    prompt, _ = comfyui_graphs(POSITIVE, COMFY_NEGATIVE)
    prompt["14"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a different prompt", "clip": ["4", 1]}}
    prompt["15"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                     "conditioning_2": ["14", 0]}}
    prompt["3"]["inputs"]["positive"] = ["15", 0]
    return prompt


@pytest.mark.parametrize(("graph", "reason"), [(ambiguous_graph, "2 sampler nodes use different prompts"),
                                               (combined_graph, "ConditioningCombine node merges two different")])
def test_ambiguous_comfyui_graph_warns_and_the_configured_prompt_is_used(graph, reason, tmp_path, caplog) -> None:
    image = comfyui_png(tmp_path / "amb.png", graph(), None)
    with caplog.at_level(logging.WARNING):
        assert prompt_from_image(image, "") is None
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(image) in record.getMessage() and reason in record.getMessage()
    with_prompt = spec("x.safetensors", prompt="a configured prompt", init_image=str(image))
    (line,) = prompt_lines(with_prompt, None)
    assert line.text == "a configured prompt" and line.init_image == str(image)
    with pytest.raises(ConfigError, match="carries no prompt"):
        prompt_lines(dataclasses.replace(with_prompt, prompt=None), None)


def test_comfyui_json_is_never_taken_as_the_reference_prompt_key(tmp_path) -> None:
    image = comfyui_png(tmp_path / "odd.png", {"1": {"class_type": "LoadImage", "inputs": {}}}, None)
    assert prompt_from_image(image, "") is None  # no sampler: warned, and the JSON is no prompt text
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "[1, 2]")
    Image.new("RGB", (8, 8)).save(tmp_path / "list.png", pnginfo=info)
    assert prompt_from_image(tmp_path / "list.png", "") is None

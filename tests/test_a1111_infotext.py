"""sdbatch's infotext as AUTOMATIC1111 reads it back: every sampler and schedule, RNG, eta, Hires resize, <lora:>
tags, and the reference tool's PNG keys (issue 13 §3)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from PIL import Image

from sdbatch.config.sampler_registry import SAMPLERS, a1111_name, effective_schedule
from sdbatch.outputs.metadata import image_params, infotext, lora_tags
from sdbatch.outputs.run_dir import RunDir
from sdbatch.plan.jobs import ImageJob, ModelInfo, NetworkRef
from sdbatch.prompts.extra_networks import tags
from sdbatch.prompts.init_images import prompt_from_image

MODEL = ModelInfo(name="v1-5-pruned-emaonly", hash="6ce0161689", family="sd1", v_prediction=False,
                  clip_skip=1, precision="fp32")

# ---------------------------------------------------------------- A1111, re-implemented from its sources
# modules/infotext_utils.py parse_generation_parameters (the key/value part and the defaults it fills in),
# modules/sd_samplers*.py sampler labels, modules/sd_schedulers.py schedule labels, and
# modules/sd_samplers.py get_sampler_and_scheduler.

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
A1111_SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
                  "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
                  "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"]
A1111_SCHEDULES = [("automatic", "Automatic", []), ("uniform", "Uniform", []), ("karras", "Karras", []),
                   ("exponential", "Exponential", []), ("polyexponential", "Polyexponential", []),
                   ("sgm_uniform", "SGM Uniform", ["SGMUniform"]), ("kl_optimal", "KL Optimal", []),
                   ("align_your_steps", "Align Your Steps", []), ("simple", "Simple", []), ("normal", "Normal", []),
                   ("ddim", "DDIM", []), ("beta", "Beta", [])]
NOT_IN_A1111 = {"DPM-Solver 2M", "DEIS"}  # diffusers' first-order-data DPM-Solver and DEIS (README, run directory)


def a1111_parse(text: str) -> dict[str, str]:
    """modules/infotext_utils.py parse_generation_parameters: key/value regex, prompt lines, filled-in defaults."""
    res: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res["Prompt"], res["Negative prompt"] = prompt, negative
    res.setdefault("Clip skip", "1")
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    return res


def a1111_sampler_and_scheduler(sampler_name: str, scheduler_name: str) -> tuple[str, str]:
    """modules/sd_samplers.py get_sampler_and_scheduler(convert_automatic=False): an unknown name is its default."""
    by_key = {key: label for name, label, aliases in A1111_SCHEDULES for key in (name, label, *aliases)}
    found = by_key.get(scheduler_name, "Automatic")
    name = sampler_name
    for sched, label, aliases in A1111_SCHEDULES:
        option = next((o for o in (label, sched, *aliases) if name.endswith(" " + o)), None)
        if option:
            found, name = label, name[:-(len(option) + 1)]
            break
    return (name if name in A1111_SAMPLERS else A1111_SAMPLERS[0]), found


# ---------------------------------------------------------------- helpers


def make_params(model: ModelInfo = MODEL, **changes) -> dict:
    fields = dict(index=0, file_name="00000-1000.png", prompt="a red cube, studio light", negative_prompt="blurry",
                  seed=1000, width=512, height=768, steps=20, sampler="euler", schedule="default", cfg_scale=7.0,
                  eta=0.0, origin="prompt")
    fields.update(changes)
    return image_params(ImageJob(**fields), model, "0.1.0")


EXPECTED_SCHEDULE = {"karras": "Karras", "exponential": "Exponential"}
CASES = [(name, schedule) for name, entry in SAMPLERS.items() for schedule in ("default", *entry.schedules[1:])]


# ---------------------------------------------------------------- every sampler and schedule


@pytest.mark.parametrize(("sampler", "schedule"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_a1111_reads_back_every_sampler_and_schedule(sampler, schedule) -> None:
    params = make_params(sampler=sampler, schedule=effective_schedule(sampler, schedule))
    res = a1111_parse(infotext(params))
    ran = params["schedule"]
    label = a1111_name(sampler)
    own = "Automatic" if label in {"DDIM", "PLMS", "UniPC"} else "Uniform"
    assert res["Schedule type"] == EXPECTED_SCHEDULE.get(ran, own)  # written, never left to mean "Automatic"
    assert "Schedule type: " in infotext(params)
    assert (res["Sampler"], res["Steps"], res["CFG scale"], res["Seed"]) == (label, "20", "7", "1000")
    assert (res["Size-1"], res["Size-2"], res["RNG"], res["Clip skip"]) == ("512", "768", "CPU", "1")
    assert (res["Prompt"], res["Negative prompt"]) == ("a red cube, studio light", "blurry")
    assert res["Model"] == "v1-5-pruned-emaonly" and res["Model hash"] == "6ce0161689"
    if label in NOT_IN_A1111:
        assert label not in A1111_SAMPLERS
    else:  # A1111 finds the sampler by this label and keeps the schedule as written
        assert a1111_sampler_and_scheduler(res["Sampler"], res["Schedule type"]) == (label, res["Schedule type"])


def test_sampler_labels_are_a1111_names_except_the_documented_ones() -> None:
    labels = {a1111_name(name) for name in SAMPLERS}
    assert labels - set(A1111_SAMPLERS) == NOT_IN_A1111
    assert a1111_name("dpmsingle") == "DPM++ 2S a" and a1111_name("dpmsolver++") == "DPM++ 2M"


# ---------------------------------------------------------------- eta


def test_ddim_eta_is_written_as_eta_ddim_only_when_not_zero() -> None:
    res = a1111_parse(infotext(make_params(sampler="ddim", eta=0.5)))
    assert res["Eta DDIM"] == "0.5" and "Eta" not in res
    assert "Eta" not in infotext(make_params(sampler="ddim", eta=0.0))


def test_ancestral_samplers_run_at_a1111_default_eta_and_dpmsingle_writes_eta_zero() -> None:
    for name in ("euler_a", "dpm_2_a", "dpmpp_2m_sde", "euler", "dpmpp_2m"):
        assert "Eta" not in infotext(make_params(sampler=name, eta=0.3))  # sampler.eta only reaches DDIM
    res = a1111_parse(infotext(make_params(sampler="dpmsingle")))
    assert res["Sampler"] == "DPM++ 2S a" and res["Eta"] == "0"  # deterministic DPM-Solver++(2S)


# ---------------------------------------------------------------- Highres. fix size


def _hires(first_width: int, first_height: int) -> dict:
    return {"first_width": first_width, "first_height": first_height, "steps": 10, "strength": 0.5,
            "upscaler_name": "Latent"}


def test_hires_upscale_when_a1111_rebuilds_the_size_from_it() -> None:
    params = {**make_params(), "highres": _hires(256, 384)}
    res = a1111_parse(infotext(params))
    assert res["Hires upscale"] == "2" and "Hires resize-1" not in res
    assert (res["Size-1"], res["Size-2"], res["Steps"], res["Hires steps"]) == ("256", "384", "10", "20")


def test_hires_resize_when_scale_times_first_size_is_not_the_final_size() -> None:
    params = {**make_params(width=200, height=136), "highres": _hires(96, 64)}
    res = a1111_parse(infotext(params))
    assert (res["Hires resize-1"], res["Hires resize-2"]) == ("200", "136") and "Hires upscale" not in res
    assert (res["Size-1"], res["Size-2"]) == ("96", "64")


# ---------------------------------------------------------------- LoRA tags

NETS = (NetworkRef("add_detail", "/l/add_detail.safetensors", "7c6bad76eb54"),
        NetworkRef("style", "/l/style.safetensors", "0123456789ab"),
        NetworkRef("tagged", "/l/tagged.safetensors", "ba5eba11ba5e"),
        NetworkRef("off", "/l/off.safetensors", "000000000000"))


def _lora_params() -> dict:
    return make_params(model=replace(MODEL, networks=NETS), prompt="a cat <lora:tagged:0.7>",
                       network_muls=(0.8, (0.5, 1.0), 0.7, 0.0))


def test_network_loras_become_prompt_tags_a1111_applies() -> None:
    params = _lora_params()
    res = a1111_parse(infotext(params))
    assert res["Prompt"] == "a cat <lora:tagged:0.7> <lora:add_detail:0.8> <lora:style:0.5:1>"
    assert tags(res["Prompt"], "test") == {"tagged": 0.7, "add_detail": 0.8, "style": (0.5, 1.0)}
    assert params["prompt"] == "a cat <lora:tagged:0.7>"  # the manifest keeps the prompt as written
    assert lora_tags(make_params()) == []


def test_read_back_of_own_image_does_not_add_the_tags(tmp_path) -> None:
    params = _lora_params()
    path = RunDir(tmp_path / "run").save(Image.new("RGB", (8, 8)), params)
    line = prompt_from_image(path, "")
    assert line is not None and line.text.startswith("a cat <lora:tagged:0.7> --w 512")
    assert "add_detail" not in line.text and line.negative == "blurry"


# ---------------------------------------------------------------- the reference tool's PNG keys


def test_reference_keys_are_written_and_read_back_by_the_reference_reading(tmp_path) -> None:
    params = make_params(sampler="k_euler_a", cfg_scale=7.5, negative_scale=5.0, raw_prompt="a red cube --n blurry")
    path = RunDir(tmp_path / "run").save(Image.new("RGB", (8, 8)), params)
    with Image.open(path) as image:
        text = dict(image.text)
    assert {k: text[k] for k in ("prompt", "seed", "sampler", "steps", "scale", "negative-prompt",
                                 "negative-scale", "raw-prompt")} == {
        "prompt": "a red cube, studio light", "seed": "1000", "sampler": "k_euler_a", "steps": "20",
        "scale": "7.5", "negative-prompt": "blurry", "negative-scale": "5.0", "raw-prompt": "a red cube --n blurry"}
    assert "clip-prompt" not in text
    only_reference = tmp_path / "ref.png"
    Image.new("RGB", (8, 8)).save(only_reference, pnginfo=_keys_only(text, ("prompt", "negative-prompt", "seed")))
    line = prompt_from_image(only_reference, "")
    assert line is not None and (line.text, line.negative) == ("a red cube, studio light", "blurry")


def _keys_only(text: dict, keys: tuple[str, ...]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key in keys:
        info.add_text(key, text[key])
    return info


# ---------------------------------------------------------------- third-party readers


def test_sd_parsers_reads_the_fields_sdbatch_recorded(tmp_path) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    params = make_params(sampler="dpmpp_2m", schedule="karras")
    path = RunDir(tmp_path / "run").save(Image.new("RGB", (8, 8)), params)
    info = sd_parsers.ParserManager().parse(str(path))
    assert info is not None
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["scheduler"] == "Karras"
    assert (sampler.parameters["cfg_scale"], sampler.parameters["seed"], sampler.parameters["steps"]) == (
        "7", "1000", "20")
    assert sampler.prompts[0].value == "a red cube, studio light"
    assert sampler.negative_prompts[0].value == "blurry"
    assert (sampler.model.name, sampler.model.hash) == ("v1-5-pruned-emaonly", "6ce0161689")


def _prompt_reader():
    """sd-prompt-reader's parsing core (its GUI needs tkinter and pins pillow 10.3; .ci/setup installs it with
    --no-deps, and the core needs only Pillow and piexif)."""
    return pytest.importorskip("sd_prompt_reader.image_data_reader",
                               reason="sd-prompt-reader is installed by .ci/setup test (pip --no-deps)")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_sd_prompt_reader_reads_the_fields_sdbatch_recorded(suffix, tmp_path) -> None:
    reader_module = _prompt_reader()
    params = {**make_params(sampler="dpmpp_2m", schedule="karras"), "file": "00000-1000" + suffix}
    path = RunDir(tmp_path / "run").save(Image.new("RGB", (8, 8)), params)
    reader = reader_module.ImageDataReader(str(path))
    assert reader.status.name == "READ_SUCCESS"
    assert "A1111" in reader.tool  # a PNG says "ComfyUI (A1111 compatible)": it sees the reference tool's `prompt`
    assert (reader.positive, reader.negative) == ("a red cube, studio light", "blurry")
    assert reader.raw == infotext(params)
    assert reader.setting == infotext(params).splitlines()[-1]
    assert reader.parameter == {"model": "v1-5-pruned-emaonly", "sampler": "DPM++ 2M", "seed": "1000", "cfg": "7",
                                "steps": "20", "size": "512x768"}
    assert (reader.width, reader.height) == ("512", "768")

"""`sdbatch-gen-img`: gen_img.py's flags → sdbatch overrides (unit), the same images as the equivalent `sdbatch`
run (in-process, tiny model), --print-overrides and --save-config reproducing the run, the reference README's
command lines, unsupported flags in one line each, and gen_img-style `--from_module` prompters."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import init_images, pixels
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from test_run import ROOT, manifest

from sdbatch.cli import gen_img
from sdbatch.cli.gen_img import command_line, hydra_value, override_text, overrides_for
from sdbatch.cli.main import prepare
from sdbatch.cli.runner import run
from sdbatch.config.gen_img_flags import BY_NAME, FLAGS, UNSUPPORTED, reference_args
from sdbatch.config.resolve import resolve
from sdbatch.config.schema import register_configs
from sdbatch.config.spec import RunSpec
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.stage import plan_run
from sdbatch.prompts.module import load_prompter

register_configs()

CONF = ROOT / "conf"
REFERENCE = ROOT.parent / "shared" / "reference" / "gen_img_README-en.md"  # beside the checkout, where there is one
# what these tests read of it (its flags and command lines), kept in the repository for a clean clone's CI
REFERENCE_EXTRACT = Path(__file__).with_name("gen_img_reference.md")
TINY = ["--ckpt", "builtin:tiny", "--W", "64", "--H", "64", "--steps", "2", "--seed", "7"]
# sdbatch's spelling of TINY: the reference's fp32 and DDIM spelled out
TINY_SDBATCH = ["model.checkpoint=builtin:tiny", "model.precision=fp32", "width=64", "height=64",
                "sampler.steps=2", "seed=7"]
QUIET = ["perf.progress=false"]


@pytest.fixture(autouse=True)
def _tiny_cache(cache_dir, monkeypatch) -> None:
    monkeypatch.setenv("SDBATCH_CACHE", str(cache_dir))


def translated(*argv: str) -> list[str]:
    return [override_text(o) for o in overrides_for(list(argv))]


def compose_spec(overrides: list[str], config_name: str = "config") -> RunSpec:
    """What `sdbatch OVERRIDES` resolves to (hydra.* overrides left out: the run directory is the caller's)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return resolve(compose(config_name, overrides=[o for o in overrides if not o.startswith("hydra.")]))


def images(overrides: list[str], run_dir: Path, stdin: str | None = None) -> list[np.ndarray]:
    """Run in-process; the final images in (index, file) order."""
    run(compose_spec([*overrides, *QUIET]), run_dir, io.StringIO(stdin) if stdin is not None else None)
    lines = sorted(manifest(run_dir), key=lambda line: (line["index"], line["file"]))
    return [pixels(run_dir / line["file"]) for line in lines if "stage" not in line]


def assert_same_run(gen_argv: list[str], sdbatch_overrides: list[str], tmp_path: Path,
                    stdin: str | None = None) -> list[np.ndarray]:
    ours = images(translated(*gen_argv), tmp_path / "gen_img", stdin)
    theirs = images(sdbatch_overrides, tmp_path / "sdbatch", stdin)
    assert ours and len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a, b)
    return ours


def _main_error(argv: list[str], capsys) -> list[str]:
    """Run the console entry expecting exit status 2; its stderr lines."""
    with pytest.raises(SystemExit) as info:
        gen_img.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------- translation (no model)


@pytest.mark.parametrize(("argv", "expected"), [
    # the reference's defaults are spelled out where sdbatch's differ: fp32, 512×512, 50 steps, DDIM, 7.5
    ([], ["model.precision=fp32", "width=512", "height=512", "sampler=ddim", "sampler.steps=50",
          "sampler.cfg_scale=7.5"]),
    (["--fp16", "--bf16"], ["model.precision=fp16"]),
    (["--bf16", "--sdpa"], ["model.precision=bf16", "perf.attention=sdpa"]),
    (["--sdpa", "--xformers"], ["perf.attention=xformers"]),
    (["--sampler", "k_euler_a", "--scale", "12.5"], ["sampler=k_euler_a", "sampler.cfg_scale=12.5"]),
    (["--sampler", "dpmsolver++"], ["sampler=dpmsolver++"]),
    (["--v2", "--v_parameterization"], ["model.v2=true", "model.v_parameterization=true"]),
    (["--vae", "vae.safetensors", "--clip_skip", "2"], ["model.vae=vae.safetensors", "model.clip_skip=2"]),
    (["--textual_inversion_embeddings", "a.pt", "b.safetensors"], ["model.textual_inversion=[a.pt,b.safetensors]"]),
    (["--outdir", "out dir"], ['hydra.run.dir="out dir"']),
    (["--sequential_file_name"], ["output.naming=sequential"]),
    (["--use_original_file_name"], ["output.naming=original"]),
    (["--images_per_prompt", "4", "--n_iter", "2", "--batch_size", "2"],
     ["images_per_prompt=4", "n_iter=2", "batch_size=2"]),
    (["--iter_same_seed", "--shuffle_prompts", "--seed", "3"], ["iter_same_seed=true", "shuffle_prompts=true",
                                                                "seed=3"]),
    (["--max_embeddings_multiples", "3", "--emb_normalize_mode", "abs", "--negative_scale", "4"],
     ["max_embeddings_multiples=3", "emb_normalize_mode=abs", "sampler.negative_scale=4.0"]),
    (["--image_path", "in/", "--strength", "0.6", "--n_iter", "2"], ["init_image=in/", "strength=0.6", "n_iter=2"]),
    (["--image_path", "in/", "--mask_path", "m.png"], ["mask_image=m.png"]),
    (["--image_path", "a.png", "--mask_image", "m.png"], ["mask_image=m.png"]),  # the README's name
    (["--highres_fix_scale", "0.5"], ["highres=on", "highres.scale=0.5", "highres.steps=28",
                                      "highres.strength=0.8"]),
    (["--highres_fix_scale", "0.5", "--strength", "0.6", "--highres_fix_steps", "10", "--highres_fix_save_1st",
      "--highres_fix_latents_upscaling", "--highres_fix_disable_control_net"],
     ["highres.strength=0.6", "highres.steps=10", "highres.save_first_stage=true", "highres.latent_upscale=true",
      "highres.latent_mode=bicubic", "highres.disable_controlnet=true"]),
    (["--ds_depth_1", "3", "--ds_timesteps_1", "700", "--ds_depth_2", "1", "--ds_timesteps_2", "500",
      "--ds_ratio", "0.6"], ["deep_shrink.depth_1=3", "deep_shrink.timesteps_1=700", "deep_shrink.depth_2=1",
                             "deep_shrink.timesteps_2=500", "deep_shrink.ratio=0.6"]),
    (["--gradual_latent_timesteps", "750", "--gradual_latent_ratio_every_n_steps", "2",
      "--gradual_latent_unsharp_params", "3,0.5,0.5,1"],
     ["gradual_latent.timesteps=750", "gradual_latent.every_n_steps=2", "gradual_latent.unsharp=[3.0,0.5,0.5,1.0]"]),
    (["--network_module", "networks.lora", "lycoris.kohya", "--network_weights", "a.safetensors", "b.safetensors",
      "--network_mul", "0.4"],
     ["network=lora", "network.loras=[{path: a.safetensors, mul: 0.4},{path: b.safetensors, mul: 1.0}]"]),
    (["--network_module", "networks.lora", "--network_weights", "a.safetensors", "--network_merge"],
     ["network.mode=merge"]),
    (["--network_module", "networks.lora", "--network_weights", "a.safetensors", "--network_pre_calc",
      "--network_show_meta"], ["network.mode=precalc", "network.show_meta=true"]),
    # a mask with unmerged networks is the regional LoRA mask, and pre-calc is off there (gen_img's rules)
    (["--network_module", "networks.lora", "--network_weights", "a.safetensors", "--network_pre_calc",
      "--mask_path", "m.png", "--network_regional_mask_max_color_codes", "3"],
     ["network.regional=true", "regions.mask=m.png", "regions.max_color_codes=3"]),
    (["--control_net_models", "a.pth", "b.pth", "--guide_image_path", "g/", "--control_net_preps", "canny", "none",
      "--control_net_weights", "1.0", "0.5", "--control_net_ratios", "1", "0.8"],
     ["guidance=controlnet", "guidance.models=[a.pth,b.pth]", "guidance.guide_image=g/",
      "guidance.preprocess=[canny,none]", "guidance.weights=[1.0,0.5]", "guidance.ratios=[1.0,0.8]",
      "guidance.combine=alternate"]),
    (["--vae_batch_size", "0.5", "--batch_size", "4", "--vae_slices", "16", "--no_half_vae", "--opt_channels_last"],
     ["perf.vae_batch_size=2", "perf.vae_slices=16", "model.no_half_vae=true", "perf.channels_last=true"]),
    (["--from_module", "p.py", "--prompter_module_args", "x=1"], ["prompt_module=p.py", 'prompts.module_args="x=1"']),
    (["--interactive", "--no_preview"], ["interactive=true", "no_preview=true"]),
])
def test_flags_become_overrides(argv, expected) -> None:
    got = translated("--ckpt", "m.safetensors", *(argv or ["--prompt", "x"]), *(
        [] if {"--prompt", "--interactive", "--from_module"} & set(argv) or "--image_path" in argv else
        ["--prompt", "x"]))
    assert got[0] == "model.checkpoint=m.safetensors"
    missing = [o for o in expected if o not in got]
    assert not missing, got


def test_priorities_and_img2img_size(capsys) -> None:
    got = translated("--ckpt", "m", "--prompt", "p", "--from_file", "f.txt", "--from_module", "m.py")
    assert "prompt_file=f.txt" in got and not any(o.startswith(("prompt=", "prompt_module=")) for o in got)
    got = translated("--ckpt", "m", "--interactive", "--prompt", "p", "--n_iter", "3")
    assert "interactive=true" in got and not any(o.startswith(("prompt=", "n_iter")) for o in got)
    # img2img keeps each image's size unless both --W and --H are given
    assert not any(o.startswith("width") for o in translated("--ckpt", "m", "--image_path", "a.png", "--W", "64"))
    assert {"width=64", "height=32"} <= set(translated("--ckpt", "m", "--image_path", "a.png", "--W", "64",
                                                       "--H", "32"))
    with pytest.raises(SystemExit) as info:
        gen_img.main(["--ckpt", "m", "--prompt", "p", "--from_file", "f.txt", "--tokenizer_cache_dir", "c",
                      "--print-overrides"])
    assert info.value.code == 0
    err = capsys.readouterr().err
    assert "note: --prompt is not used: --from_file comes first" in err
    assert "note: --tokenizer_cache_dir has no effect in sdbatch" in err


def test_unsupported_flags_fail_one_line_each(capsys) -> None:
    lines = _main_error(["--ckpt", "m", "--prompt", "p", "--sdxl", "--network_args", "a=1",
                         "--clip_guidance_scale", "100"], capsys)
    assert len(lines) == 3 and all(line.startswith("sdbatch-gen-img: error: --") for line in lines)
    assert [line.split()[2] for line in lines] == ["--sdxl", "--network_args", "--clip_guidance_scale"]
    every = [flag for flag in FLAGS if flag.status == UNSUPPORTED]
    for flag in every:  # each alone: its own line names it
        value = [] if flag.type is None else ["1"] * (int(flag.nargs) if (flag.nargs or "").isdigit() else 1)
        lines = _main_error(["--ckpt", "m", "--prompt", "p", f"--{flag.name}", *value], capsys)
        assert len(lines) == 1 and f"--{flag.name} is not supported" in lines[0]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--prompt", "p"], "--ckpt is required"),
    (["--ckpt", "m"], "no prompt"),
    (["--ckpt", "m", "--prompt", "p", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--ckpt", "m", "--prompt", "p", "--steps", "many"], "--steps: invalid int value"),
    (["--ckpt", "m", "--prompt", "p", "--sampler", "k_eular_a"], "unknown sampler 'k_eular_a'"),
    (["--ckpt", "m", "--prompt", "p", "--network_module", "networks.oft", "--network_weights", "a"],
     "--network_module networks.oft is not supported"),
    (["--ckpt", "m", "--prompt", "p", "--network_module", "networks.lora"], "one file per --network_module"),
    (["--ckpt", "m", "--prompt", "p", "--network_weights", "a"], "--network_weights needs --network_module"),
    (["--ckpt", "m", "--prompt", "p", "--network_module", "networks.lora", "--network_weights", "a",
      "--network_merge", "--network_pre_calc"], "cannot be used together"),
    (["--ckpt", "m", "--prompt", "p", "--control_net_models", "a.pth"], "--guide_image_path: give one"),
    (["--ckpt", "m", "--prompt", "p", "--save-config", "dir/config.yaml"], "whose name is not 'config'"),
])
def test_mistakes_are_one_line(argv, needle, capsys) -> None:
    lines = _main_error(argv, capsys)
    assert len(lines) == 1 and needle in lines[0], lines


def extract_reference(text: str) -> str:
    """tests/gen_img_reference.md from the reference README: the flags it names, its ```batchfile examples."""
    flags = sorted(set(re.findall(r"--([A-Za-z][\w]*)", text)))
    lines = ["# Extracted from ../shared/reference/gen_img_README-en.md (kohya-ss gen_img.py's README) by",
             "# tests/test_gen_img.py::extract_reference: the flags it names and its command-line examples.",
             "# tests/test_gen_img.py checks this file against the reference wherever ../shared is present.", "",
             "flags: " + " ".join(f"--{flag}" for flag in flags), ""]
    for block in re.findall(r"```batchfile\n(.*?)```", text, re.S):
        lines += ["```batchfile", block.rstrip("\n"), "```", ""]
    return "\n".join(lines)


@pytest.mark.skipif(not REFERENCE.is_file(), reason="the reference README lives beside the checkout, not in it")
def test_the_reference_extract_is_current() -> None:
    assert REFERENCE_EXTRACT.read_text(encoding="utf-8") == extract_reference(REFERENCE.read_text(encoding="utf-8"))


def test_every_reference_flag_is_known() -> None:
    """Every command-line flag of the reference (its README, and the 94 of gen_img.py) parses."""
    prompt_options = {"n", "w", "h", "s", "d", "l", "t", "nl", "am", "c", "x", "f", "glt", "glr", "gls", "gle",
                      "dsd1", "dst1", "dsd2", "dst2", "dsr"}
    documented = set(re.findall(r"--([A-Za-z][\w]*)", REFERENCE_EXTRACT.read_text(encoding="utf-8"))) - prompt_options
    known = {name for flag in FLAGS for name in (flag.name, *flag.aliases)}
    assert documented - known == set()
    assert len({flag.name for flag in FLAGS} - {"XTI_embeddings", "clip_guidance_scale", "clip_image_guidance_scale",
                                                "vgg16_guidance_scale", "vgg16_guidance_layer"}) == 94


def test_readme_table_maps_every_flag() -> None:
    """README's "Migrating from gen_img.py" table has a row naming every flag, and that row names its key."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Migrating from gen_img.py")[1]
    rows = [line for line in section.split("\n## ")[0].splitlines() if line.startswith("| `--")]
    for flag in FLAGS:
        row = [line for line in rows if f"`--{flag.name}`" in line.split(" | ")[0]]
        assert len(row) == 1, flag.name
        if flag.key and flag.status in ("key", "rule"):
            assert f"`{flag.key}" in row[0], row[0]


# ---------------------------------------------------------------- quoting


@settings(max_examples=40, deadline=None, database=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30))
def test_hydra_quoting_round_trips(text) -> None:
    parsed = OverridesParser.create().parse_overrides([f"prompt={hydra_value(text)}"])[0].value()
    assert parsed == text.replace("${", "\\${")  # the escaped interpolation; OmegaConf reads it back as ${


def test_printed_command_is_copy_pasteable_and_composes_the_same(capsys) -> None:
    prompt = "masterpiece, (red:1.2) it's a \"cube\" {a|b} ${x} \\ --n blurry"
    argv = ["--ckpt", "builtin:tiny", "--prompt", prompt, "--W", "64", "--H", "64", "--network_module",
            "networks.lora", "--network_weights", "builtin:tiny-lora", "--network_mul", "0.5"]
    with pytest.raises(SystemExit):
        gen_img.main([*argv, "--print-overrides"])
    printed = capsys.readouterr().out.strip()
    words = shlex.split(printed)  # what bash hands sdbatch
    assert words[0] == "sdbatch" and words[1:] == translated(*argv)
    spec = compose_spec(words[1:])
    assert spec.prompt == prompt and spec.network.loras[0].mul == 0.5
    assert command_line(overrides_for(argv)) == printed


# ---------------------------------------------------------------- the same images as the sdbatch run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gen_img_inputs")
    (folder / "prompts.txt").write_text("a red cube --n blurry --l 5\n# comment\na blue ball --w 48 --d 11,12\n",
                                        encoding="utf-8")
    init = init_images(folder, [1])[0]
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle([16, 16, 48, 48], fill=255)
    mask.save(folder / "mask.png")
    return {"prompts": folder / "prompts.txt", "init": init, "mask": folder / "mask.png"}


CASES = {
    "txt2img": (["--prompt", "a castle --n fog", "--images_per_prompt", "2", "--batch_size", "2",
                 "--sampler", "k_euler", "--scale", "6"],
                ["prompt=a castle --n fog", "images_per_prompt=2", "batch_size=2", "sampler=euler",
                 "sampler.cfg_scale=6"]),
    "from_file": (["--from_file", "{prompts}", "--n_iter", "2", "--iter_same_seed"],
                  ["prompt_file={prompts}", "n_iter=2", "iter_same_seed=true"]),
    "img2img": (["--image_path", "{init}", "--strength", "0.5", "--prompt", "an oil painting", "--W", "64",
                 "--H", "64"], ["init_image={init}", "strength=0.5", "prompt=an oil painting"]),
    "inpaint": (["--image_path", "{init}", "--mask_path", "{mask}", "--prompt", "a door"],
                ["init_image={init}", "mask_image={mask}", "prompt=a door"]),
    "lora": (["--prompt", "a castle --am 0.3", "--network_module", "networks.lora", "--network_weights",
              "builtin:tiny-lora", "--network_mul", "0.8", "--network_pre_calc"],
             ["prompt=a castle --am 0.3", "network=lora", "network.loras=[{{path: builtin:tiny-lora, mul: 0.8}}]",
              "network.mode=precalc"]),
    "highres": (["--prompt", "a castle", "--highres_fix_scale", "0.5", "--highres_fix_steps", "2"],
                ["prompt=a castle", "highres=on", "highres.steps=2", "highres.strength=0.8"]),
    "deep_shrink": (["--prompt", "a castle", "--ds_depth_1", "1", "--ds_timesteps_1", "500", "--ds_ratio", "0.5"],
                    ["prompt=a castle", "deep_shrink.depth_1=1", "deep_shrink.timesteps_1=500"]),
    "gradual_latent": (["--prompt", "a castle", "--sampler", "euler_a", "--gradual_latent_timesteps", "900",
                        "--gradual_latent_every_n_steps", "1"],
                       ["prompt=a castle", "sampler=euler_a", "gradual_latent.timesteps=900",
                        "gradual_latent.every_n_steps=1"]),
    "controlnet": (["--prompt", "a box", "--control_net_models", "builtin:tiny", "--guide_image_path", "{mask}",
                    "--control_net_ratios", "0.5"],
                   ["prompt=a box", "guidance=controlnet", "guidance.models=[builtin:tiny]",
                    "guidance.guide_image={mask}", "guidance.ratios=[0.5]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_images_as_the_sdbatch_run(case, inputs, tmp_path) -> None:
    gen_argv, ours = CASES[case]
    fill = {name: str(path) for name, path in inputs.items()}
    made = assert_same_run([*TINY, *(a.format(**fill) for a in gen_argv)],
                           [*TINY_SDBATCH, *(o.format(**fill) for o in ours)], tmp_path)
    assert all(image.shape[2] == 3 for image in made)


def test_interactive_piped_same_images(tmp_path) -> None:
    made = assert_same_run([*TINY, "--interactive"], [*TINY_SDBATCH, "interactive=true"], tmp_path,
                           stdin="a cat\na dog --w 48\n")
    assert [image.shape[:2] for image in made] == [(64, 64), (64, 48)]


def test_saved_config_reproduces_the_run(tmp_path, monkeypatch, capsys) -> None:
    argv = [*TINY, "--prompt", "masterpiece, (red:1.2) cube ${x}", "--outdir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        gen_img.main([*argv, "--save-config", str(tmp_path / "cfg" / "mine.yaml")])
    assert info.value.code == 0 and "--config-name mine" in capsys.readouterr().err
    monkeypatch.setenv("SDBATCH_CONFIG_DIR", str(tmp_path / "cfg"))
    prepare()  # SDBATCH_CONFIG_DIR joins the search path, as for `sdbatch --config-dir`
    saved = compose_spec([], config_name="mine")
    assert saved == compose_spec(translated(*argv))
    assert saved.prompt == "masterpiece, (red:1.2) cube ${x}"
    run(compose_spec(QUIET, config_name="mine"), tmp_path / "saved")
    same = images(translated(*argv), tmp_path / "direct")
    assert np.array_equal(pixels(next((tmp_path / "saved").glob("*.png"))), same[0])


@pytest.mark.slow  # three processes (~20 s each on 2 cores): the slow stage of .ci/run
def test_console_entry_and_saved_config_in_processes(tmp_path) -> None:
    """The real command runs into --outdir; its --save-config file, run by `python run.py --config-dir DIR
    --config-name NAME` into another folder, makes the same image."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    entry = [sys.executable, "-c", "from sdbatch.cli.gen_img import main; main()", *TINY,
             "--prompt", "a cat, (red:1.2)", "--sampler", "k_euler_a"]
    out, saved = tmp_path / "out", tmp_path / "cfg" / "cat.yaml"
    for extra in (["--outdir", str(out)], ["--save-config", str(saved)]):
        proc = subprocess.run([*entry, *extra], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
    assert [line["file"] for line in manifest(out)] == ["00000-7.png"]
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config-dir", str(saved.parent), "--config-name",
                           "cat", f"hydra.run.dir={again}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(pixels(again / "00000-7.png"), pixels(out / "00000-7.png"))


# ---------------------------------------------------------------- the reference README's command lines


def reference_commands() -> list[list[str]]:
    """Every `python gen_img.py ...` command of the reference README, continuation lines joined."""
    text = REFERENCE_EXTRACT.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```batchfile\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\s*\n", " ", block)
        for line in joined.splitlines():
            if "gen_img.py" in line:
                commands.append(shlex.split(line.split("gen_img.py", 1)[1].replace("\\", "/")))
    return commands


def _tiny(argv: list[str]) -> list[str]:
    """The command with the tiny model, 64×64, 2 steps, at most 2 images, on the CPU (no xformers, fp32)."""
    small = {"--ckpt": "builtin:tiny", "--W": "64", "--H": "64", "--steps": "2", "--images_per_prompt": "2",
             "--highres_fix_steps": "2", "--batch_size": "2"}
    out, skip = [f for flag in ("--W", "--H", "--steps") if flag not in argv for f in (flag, small[flag])], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word in ("--xformers", "--fp16", "--bf16"):
            continue
        out.append(word)
        if word in small and i + 1 < len(argv):
            out.append(small[word])
            skip = True
    return out


def _placeholder(flag: str, word: str) -> str:
    """A value for the README's `<model_name>`-style placeholders: a number for numeric flags."""
    return "2" if BY_NAME[flag.lstrip("-")].type in (int, float) else "x"


def test_reference_readme_commands_translate() -> None:
    commands = reference_commands()
    assert len(commands) >= 10
    refused = []
    for argv in commands:
        argv = [_placeholder(argv[i - 1], word) if word.startswith("<") else word for i, word in enumerate(argv)]
        if not {"--prompt", "--from_file", "--interactive", "--image_path"} & set(argv):
            argv += ["--interactive"]
        try:
            got = translated(*argv)
        except ConfigError as ex:
            refused.append(str(ex))
            continue
        assert got[0].startswith("model.checkpoint=")
    # only gen_img_diffusers.py's guided generation is refused, one line naming the flag
    assert refused and all(re.fullmatch(r"--(clip|clip_image|vgg16)_guidance_scale is not supported.*", r)
                           for r in refused), refused


# 64 images of one prompt; TI and LoRA, interactive (slow stage); Highres. fix, interactive
@pytest.mark.parametrize("index", [3, pytest.param(5, marks=pytest.mark.slow), 7])
def test_reference_readme_commands_run(index, tmp_path) -> None:
    argv = _tiny(reference_commands()[index])
    argv = [w for w in argv if w not in ("goodembed.safetensors", "negprompt.pt")]
    if "--textual_inversion_embeddings" in argv:  # the example's TI files and LoRAs → none, the tiny LoRA
        argv.remove("--textual_inversion_embeddings")
        argv = [("builtin:tiny-lora" if w.startswith("model") and w.endswith(".safetensors") else w) for w in argv]
    made = images(translated(*argv), tmp_path / "run", stdin="a lighthouse --n fog\n")
    assert made and all(image.shape == (64, 64, 3) for image in made)


# ---------------------------------------------------------------- gen_img-style --from_module


def _module(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "prompter.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


PROMPTER = """
    def get_prompter(args, pipe, networks):
        subjects = args.prompter_module_args.split(",")
        def prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step):
            if prompt_index >= len(subjects):
                return None
            return f"a {subjects[prompt_index]} --w {args.W // 2} --d {prompt_index + global_step}"
        return prompter
"""


def test_from_module_prompter_reads_args(tmp_path) -> None:
    path = _module(tmp_path, PROMPTER)
    spec = compose_spec(translated(*TINY, "--from_module", str(path), "--prompter_module_args", "cat,dog",
                                   "--images_per_prompt", "2"))
    lines = list(load_prompter(spec.prompt_module, spec, None))
    assert [(line.text, line.origin) for line in lines] == [("a cat --w 32 --d 0", "prompter.py:#1"),
                                                            ("a dog --w 32 --d 3", "prompter.py:#2")]
    args = reference_args(spec)
    assert args["W"] == 64 and args["steps"] == 2 and args["sampler"] == "ddim" and args["fp16"] is False
    assert args["network_module"] is None and args["interactive"] is False


def test_from_module_runs_like_the_prompt_file(tmp_path) -> None:
    path = _module(tmp_path, PROMPTER)
    lines = tmp_path / "lines.txt"
    lines.write_text("a cat --w 32 --d 0\na dog --w 32 --d 2\n", encoding="utf-8")  # --d: index + global step
    assert_same_run([*TINY, "--from_module", str(path), "--prompter_module_args", "cat,dog"],
                    [*TINY_SDBATCH, f"prompt_file={lines}"], tmp_path)


@pytest.mark.parametrize(("body", "needle"), [
    ("def get_prompter(args, pipe, networks):\n    pipe.unet.eval()\n    return lambda *a: None\n",
     "(prompter.py, line 2) uses pipe.unet"),
    ("def get_prompter(args, pipe, networks):\n    def p(*a):\n        networks[0].set_multiplier(0.5)\n"
     "    return p\n", "(prompter.py, line 3) uses networks[0]"),
    ("def get_prompter(args, pipe, networks):\n    return ['a list']\n", "wants a callable prompter"),
    ("def get_prompter(a, b, c, d):\n    return None\n", "or gen_img's three"),
])
def test_from_module_reaching_into_the_pipeline_is_one_line(body, needle, tmp_path) -> None:
    path = _module(tmp_path, body)
    spec = compose_spec(translated(*TINY, "--from_module", str(path), "--network_module", "networks.lora",
                                   "--network_weights", "builtin:tiny-lora"))
    with pytest.raises(PromptError) as info:
        list(load_prompter(spec.prompt_module, spec, None))
    assert "\n" not in str(info.value) and needle in str(info.value), str(info.value)


def test_flag_table_names_are_unique() -> None:
    names = [name for flag in FLAGS for name in (flag.name, *flag.aliases)]
    assert len(names) == len(set(names)) and BY_NAME["W"].key == "width"


def test_from_module_seed_random_follows_the_run_seed(tmp_path) -> None:
    """seed_random is seeded with the run's base seed, drawn ones included, so a resumed run gets its lines back."""
    path = _module(tmp_path, """
        def get_prompter(args, pipe, networks):
            def prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step):
                return None if prompt_index == 2 else f"a cat {seed_random.randint(0, 999)}"
            return prompter
    """)
    spec = compose_spec(translated("--ckpt", "builtin:tiny", "--from_module", str(path)))
    assert spec.seed is None
    texts = {seed: [job.prompt for job in plan_run(spec, seed).jobs] for seed in (5, 6)}
    assert texts[5] == [job.prompt for job in plan_run(spec, 5).jobs] and texts[5] != texts[6]

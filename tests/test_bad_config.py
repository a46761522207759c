"""Every bad config or grid value is one line naming the key (exit 2, no traceback) before any model loads;
booleans for choice keys, seed=-1 and sizes up to perf.max_pixels work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image
from test_run import SMALL, manifest, run_cli

from sdbatch.config.resolve import resolve
from sdbatch.config.schema import register_configs
from sdbatch.config.spec import RunSpec
from sdbatch.errors import ConfigError, SdbatchError
from sdbatch.plan.stage import plan_run

CONF = Path(__file__).resolve().parents[1] / "conf"
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
register_configs()

LORA = "network=lora"
TINY_LORA = "network.loras=[{path: 'builtin:tiny-lora'}]"
GL = ["sampler=euler_a", "gradual_latent.timesteps=700"]

# (overrides after model=tiny, text the one error line must contain)
BAD = [
    # numbers must be finite and in range
    (["sampler.cfg_scale=inf"], "sampler.cfg_scale must be a finite number, got inf"),
    (["sampler.cfg_scale=nan"], "sampler.cfg_scale must be a finite number, got nan"),
    (["sampler.eta=-5"], "sampler.eta must be in [0, 1]"),
    (["sampler.eta=2"], "sampler.eta must be in [0, 1]"),
    (["sampler.negative_scale=nan"], "sampler.negative_scale must be a finite number"),
    ([LORA, "network.loras=[{path: 'builtin:tiny-lora', mul: nan}]"], "network.loras[0].mul must be a finite number"),
    ([LORA, "network.loras=[{path: 'builtin:tiny-lora', mul: inf}]"], "network.loras[0].mul must be a finite number"),
    ([LORA, TINY_LORA, "network.muls=[0.5,nan]"], "network.muls[1] must be a finite number"),
    (["strength=nan"], "strength must be a finite number"),
    (["highres=on", "highres.scale=nan"], "highres.scale must be a finite number"),
    (["highres=on", "highres.strength=nan"], "highres.strength must be a finite number"),
    (["deep_shrink.depth_1=1", "deep_shrink.ratio=nan"], "deep_shrink.ratio must be a finite number"),
    ([*GL, "gradual_latent.ratio=nan"], "gradual_latent.ratio must be a finite number"),
    ([*GL, "gradual_latent.ratio_step=nan"], "gradual_latent.ratio_step must be a finite number"),
    ([*GL, "gradual_latent.s_noise=inf"], "gradual_latent.s_noise must be a finite number"),
    ([*GL, "gradual_latent.s_noise=-1"], "gradual_latent.s_noise must be >= 0"),
    ([*GL, "gradual_latent.unsharp=[nan,0.5,0.5]"], "gradual_latent.unsharp[0] must be a finite number"),
    # seeds: [0, 2**32), -1 = random
    (["seed=-2"], "seed must be from 0 to 4294967295"),
    (["seed=4294967296"], "seed must be from 0 to 4294967295"),
    (["seed=18446744073709551616"], "seed must be from 0 to 4294967295"),
    # sizes: within perf.max_pixels
    # model=tiny: height defaults to its 128 (model.default_size)
    (["width=200000"], "width=200000: 200000x128 is 25600000 pixels per image, over perf.max_pixels=16777216"),
    (["width=4096", "height=4104"], "raise the bound with perf.max_pixels=16809984"),
    (["perf.max_pixels=0"], "perf.max_pixels must be a positive number"),
    (["prompt='a cat --w 8192 --h 4096'"], "prompt: 8192x4096 is 33554432 pixels per image, over perf.max_pixels"),
    # grid cells get the checks of the keys they stand for, naming the axis and the value
    (["grid.x='sampler.steps:0,1'"], "grid.x: sampler.steps 0 is not valid"),
    (["grid.x='sampler:plms,ddim'", "sampler.steps=2"], "grid.x=sampler:plms: sampler plms needs steps >= 4, got 2"),
    (["grid.x='seed:1,2'", "grid.y='sampler:ddim,pndm'", "grid.z='steps:2,4'"],
     "grid.y=sampler:pndm, grid.z=steps:2: sampler pndm needs steps >= 4"),
    (["grid.x=steps:-3"], "grid.x: steps -3 is not valid"),
    (["grid.x='cfg_scale:-5,nan'"], "grid.x: cfg_scale -5 is not valid"),
    (["grid.x='cfg_scale:5,nan'"], "grid.x: cfg_scale nan is not valid"),
    (["grid.x='sampler.cfg_scale:5,inf'"], "grid.x: sampler.cfg_scale inf is not valid"),
    (["grid.x=strength:5"], "grid.x: strength 5 is not valid; give a number in (0, 1]"),
    (["grid.x='strength:0.5,nan'"], "grid.x: strength nan is not valid"),
    (["grid.x=sampler:nosuch"], "grid.x: unknown sampler 'nosuch'"),
    (["grid.x='seed:1,2'", "grid.y='width:64,100'"], "grid.y: width 100 is not valid; give a positive multiple of 8"),
    (["grid.x='width:64,200000'"], "grid.x=width:200000: 200000x128 is 25600000 pixels per image, over perf.max"),
    (["grid.x=width:8192", "grid.y='height:512,4096'"], "grid.x=width:8192, grid.y=height:4096: 8192x4096"),
    (["grid.x='seed:1,-1'"], "grid.x: seed -1 is not valid; give a seed from 0 to 4294967295"),
    (["grid.x='seed:4294967296'"], "grid.x: seed 4294967296 is not valid"),
    ([LORA, TINY_LORA, "grid.x='network_muls:0.5,nan'"], "grid.x: 'nan' is not a valid network_muls value"),
    (["highres=on", "highres.steps=2", "grid.x='sampler:ddim,plms'"], "grid.x=sampler:plms: sampler plms needs hig"),
    # output files
    (["output.format=gif"], "output.format='gif' is not valid; choose one of: png, webp, jpg"),
    (["output.quality=0"], "output.quality must be from 1 to 100"),
    # the accelerators
    (["perf.tome_ratio=0.95"], "perf.tome_ratio must be from 0 (off) to 0.9 (A1111's bound), got 0.95"),
    (["perf.tome_ratio=-0.1"], "perf.tome_ratio must be from 0 (off) to 0.9"),
    (["perf.tome_ratio=nan"], "perf.tome_ratio must be"),
    (["perf.deepcache.interval=0"], "perf.deepcache.interval must be >= 1 (1 = off), got 0"),
    (["perf.deepcache.branch=-1"], "perf.deepcache.branch must be >= 0"),
    (["perf.deepcache.interval=3", "deep_shrink.depth_1=1"], "perf.deepcache.interval > 1 cannot be combined with "
                                                              "Deep Shrink"),
    (["perf.deepcache.interval=2", "perf.compile=true"], "perf.deepcache.interval cannot be combined with perf.comp"),
    (["perf.tome_ratio=0.5", LORA, TINY_LORA, "network.regional=true"],
     "perf.tome_ratio cannot be combined with network.regional"),
    # a cell that only fails with a prompt line's own options: named at planning, still before any model loads
    (["prompt='a cat --s 2'", "grid.x='sampler:ddim,plms'"], "grid.x=sampler:plms for prompt: sampler plms needs"),
    (["prompt='a cat --h 4096'", "grid.x='width:64,8192'"], "grid.x=width:8192 for prompt: 8192x4096 is"),
    # a prompt line's options get the run's checks too
    (["prompt='a cat --s 2'", "sampler=plms"], "prompt: sampler plms needs steps >= 4, got 2"),
    (["prompt='a cat --l -5'"], "prompt: cfg_scale must be a finite number >= 0, got -5.0"),
]


def _one_error_line(stderr: str) -> str:
    """The one `sdbatch: error:` line; anything else on stderr may only be log lines (`[time][logger]...`)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("sdbatch:")]
    assert len(errors) == 1 and errors[0].startswith("sdbatch: error: "), stderr
    assert all(line.startswith("[") for line in lines if line not in errors), stderr
    assert "Traceback" not in stderr
    return errors[0]


def _args(overrides: list[str]) -> list[str]:
    given = any(o.startswith("prompt=") for o in overrides)
    return ["model=tiny", *([] if given else ["prompt=a cat"]), *SMALL[3:], *overrides]


@pytest.mark.parametrize(("overrides", "needle"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_refused_naming_the_key(overrides, needle) -> None:
    """Every case in process: resolve, then plan (no model loads there), as `python run.py` does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=_args(overrides))
    with pytest.raises(SdbatchError) as caught:
        plan_run(resolve(cfg), base_seed=0)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


# the command line turns each kind of error into one line (exit 2): a resolve-time, a grid, a seed, a size, a
# LoRA and a planning-time case, through `python run.py` itself
CLI = [BAD[0], BAD[5], BAD[17], BAD[21], BAD[26], BAD[-2]]


@pytest.mark.parametrize(("overrides", "needle"), CLI, ids=[" ".join(o) for o, _ in CLI])
def test_bad_value_is_one_line_naming_the_key(overrides, needle, cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*_args(overrides), f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in _one_error_line(proc.stderr)
    assert "<sampler.name>" not in proc.stderr and "Loaded" not in proc.stderr, "no model loads before the error"
    assert not list(run_dir.glob("*.png")), "nothing is generated before the error"


def test_img2img_grid_strength_cell_leaving_no_step_is_refused(cache_dir, tmp_path) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    proc = run_cli(["model=tiny", "prompt=a cat", f"init_image={tmp_path / 'in.png'}", "sampler.steps=5",
                    "grid.x='strength:0.8,0.1'", f"hydra.run.dir={tmp_path / 'run'}", *SMALL[3:]], cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "grid.x=strength:0.1" in line and "leaves no denoising step" in line


def test_init_image_over_max_pixels_names_the_image(cache_dir, tmp_path) -> None:
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    proc = run_cli(["model=tiny", "prompt=a cat", f"init_image={tmp_path / 'in.png'}", "perf.max_pixels=1024",
                    f"hydra.run.dir={tmp_path / 'run'}", *SMALL[3:]], cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "in.png: 64x64 is 4096 pixels per image, over perf.max_pixels=1024" in line and "width and height" in line


def test_boolean_v_parameterization_runs_and_is_recorded(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny", "prompt=x", "model.v_parameterization=true", "model.v2=false", "sampler.steps=2",
                    "width=64", "height=64", "perf.progress=false", f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["model"]["v_parameterization"], config["model"]["v2"]) == ("true", "false")
    assert manifest(run_dir)[0]["v_prediction"] is True


def test_seed_minus_one_draws_a_random_recorded_seed(cache_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny", "prompt=x", "seed=-1", "images_per_prompt=2", f"hydra.run.dir={run_dir}", *SMALL],
                   cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    base = yaml.safe_load((run_dir / "config.yaml").read_text())["seed"]
    assert isinstance(base, int) and 0 <= base < 2**32
    assert [line["seed"] for line in manifest(run_dir)] == [base, (base + 1) % 2**32]
    json.dumps(manifest(run_dir), allow_nan=False)  # valid JSON: no NaN anywhere


# ---------------------------------------------------------------- in-process: what resolve makes of the values


def _spec(*overrides: str) -> RunSpec:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return resolve(compose("config", overrides=["model=tiny", "prompt=a cat", *overrides]))


@pytest.mark.parametrize(("override", "key", "expected"), [
    ("model.v2=true", "v2", "true"),
    ("model.v2=false", "v2", "false"),
    ("model.v2=True", "v2", "true"),
    ("model.v2=auto", "v2", "auto"),
    ("model.v2='false'", "v2", "false"),
    ("model.v_parameterization=true", "v_parameterization", "true"),
    ("model.v_parameterization=FALSE", "v_parameterization", "false"),
])
def test_booleans_for_choice_keys_become_their_choice(override, key, expected) -> None:
    assert getattr(_spec(override).model, key) == expected


def test_highres_name_as_a_boolean_is_on_or_off() -> None:
    # YAML reads an unquoted `name: off` as false; the str key then holds 'False'
    assert _spec("highres.name=false").highres.name == "off"
    assert _spec("highres=on", "highres.name=true").highres.name == "on"


def test_seed_minus_one_is_null_and_the_range_ends_are_kept() -> None:
    assert _spec("seed=-1").seed is None
    assert _spec("seed=0").seed == 0 and _spec("seed=4294967295").seed == 4294967295


def test_max_pixels_is_generous_and_can_be_raised() -> None:
    assert _spec("width=4096", "height=4096").perf.max_pixels == 4096 * 4096
    assert _spec("width=8192", "height=8192", "perf.max_pixels=67108864").width == 8192
    with pytest.raises(ConfigError, match="height=8192"):
        _spec("height=8192", "width=4096")
    assert _spec("grid.x='width:64,8192'", "perf.max_pixels=4194304").grid.x == "width:64,8192"


def test_good_values_still_resolve() -> None:
    spec = _spec("sampler.eta=1", "sampler.eta=0.5", "sampler.cfg_scale=0", "sampler.negative_scale=-2",
                 "grid.x='sampler:plms,ddim'", "grid.y='seed:0,4294967295'", "sampler.steps=4")
    assert (spec.sampler.eta, spec.sampler.negative_scale) == (0.5, -2.0)

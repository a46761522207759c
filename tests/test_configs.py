"""Every option of every config group composes and resolves; typos, wrong types and bad values fail clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sdbatch.cli.hydra_app import describe_config_error
from sdbatch.config.resolve import resolve
from sdbatch.config.sampler_registry import SAMPLERS
from sdbatch.config.schema import register_configs
from sdbatch.config.spec import GROUPS, RunSpec
from sdbatch.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _spec(*overrides: str) -> RunSpec:
    return resolve(_compose("model=tiny", "prompt=a cat", *overrides))


ANY_FILE = CONF / "config.yaml"  # an existing file where a LoRA path is only checked, not read
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option != "tiny":
        overrides.append("model.checkpoint=/models/x.safetensors")
    if group == "network" and option != "none":
        overrides.append(f"network.loras=[{{path: {ANY_FILE}}}]")
    if group == "guidance" and option != "none":
        overrides += [f"guidance.models=[{ANY_FILE}]", f"guidance.guide_image={ANY_FILE}"]
    if group == "guided" and option != "none":
        overrides.append(f"guided.{'vgg16_weights' if option == 'vgg16' else 'clip_model'}={ANY_FILE}")
        if option != "clip":  # clip steers toward text; the others toward an image
            overrides.append(f"guided.guide_image={ANY_FILE}")
    spec = resolve(_compose("model=tiny", "prompt=a cat", *overrides))
    assert isinstance(spec, RunSpec)
    assert getattr(spec, group).__class__ is GROUPS[group]


def test_every_registered_sampler_is_a_config_option() -> None:
    assert {p.stem for p in (CONF / "sampler").glob("*.yaml")} == set(SAMPLERS)


def test_spec_is_frozen_and_typed() -> None:
    spec = _spec("sampler=euler_a", "sampler.steps=12", "width=256", "seed=5")
    assert (spec.sampler.name, spec.sampler.steps, spec.width, spec.seed) == ("euler_a", 12, 256, 5)
    with pytest.raises(AttributeError):
        spec.width = 3  # type: ignore[misc]


def test_prompt_may_be_a_list() -> None:
    assert _spec("prompt=[a cat,a dog]").prompt == ["a cat", "a dog"]


def test_model_defaults_per_option() -> None:
    sd21 = resolve(_compose("model=sd21", "model.checkpoint=x.safetensors", "prompt=x"))
    assert (sd21.model.v2, sd21.model.v_parameterization) == ("true", "true")
    assert _spec().model.checkpoint == "builtin:tiny"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["sampler.stpes=3"], "sampler.stpes"),
        (["width=abc"], "key: width"),
        (["sampler=nope"], "available options in 'sampler': ddim"),
    ],
)
def test_compose_errors_are_one_line_with_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        _compose("model=tiny", "prompt=x", *overrides)
    message = describe_config_error(info.value)
    assert needle in message and "\n" not in message


def test_prompt_with_commas_gets_a_quoting_hint() -> None:
    with pytest.raises(HydraException) as info:
        _compose("prompt=a, b")
    assert "quote it for Hydra inside bash quotes: 'prompt=\"a, b\"'" in describe_config_error(info.value)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["+sampler.stpes=3"], "unknown key sampler.stpes (added with '+'); valid keys: name, steps"),
        (["+colour=red"], "unknown key colour"),
        (["width=100"], "width must be a multiple of 8, got 100"),
        (["height=0"], "height must be a positive number"),
        (["sampler.steps=0"], "sampler.steps must be a positive number"),
        (["sampler.name=nope"], "unknown sampler 'nope'"),
        (["sampler=euler_a", "sampler.schedule=karras"], "does not support schedule 'karras'"),
        (["model.precision=fp8"], "model.precision='fp8' is not valid"),
        (["perf.device=gpu"], "perf.device='gpu' is not valid"),
        (["perf.attention=flash"], "perf.attention='flash' is not valid"),
        (["prompt=null"], "no prompt"),
        (["prompt_sr=dawn"], "prompt_sr='dawn' replaces the first of prompt_sr_words, which is empty"),
        (["prompt_sr_words=[dusk,'']"], "prompt_sr_words must be non-empty words"),
        (["network=lora"], "network=lora needs at least one file"),
        (["perf.vae_slices=0"], "perf.vae_slices must be >= 1"),
        (["network.lora_dir=/nope/loras"], "network.lora_dir: /nope/loras is not a folder"),
        (["deep_shrink.depth_1=4"], "deep_shrink.depth_1 must be a down-block index from 0 to 3, got 4"),
        (["deep_shrink.ratio=0"], "deep_shrink.ratio must be in (0, 1]"),
        (["gradual_latent.timesteps=700"], "gradual_latent needs sampler=euler_a"),
        (["sampler=euler_a", "gradual_latent.timesteps=700", "gradual_latent.unsharp=[4,1,1]"], "ksize (odd)"),
        (["network.mode=fast"], "network.mode='fast' is not valid; choose one of: hooked, merge, precalc"),
        (["network.loras=[{path: a.safetensors}]"], "network.loras is set but network=none; add network=lora"),
        (["network=lora", "network.loras=[{mul: 2}]"], "network.loras[0].path is not set"),
        (["network=lora", f"network.loras=[{{path: {ANY_FILE}}}]", "network.muls=[]"], "network.muls=[] has no"),
        (["network=lora", "network.loras=[{path: nope.safetensors}]"], "network.loras[0].path: LoRA file nope."),
        (["network=lora", "network.loras=[{path: 'builtin:x'}]"], "the built-in LoRA (for model=tiny) is builtin:"),
    ],
)
def test_resolve_errors_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        _spec(*overrides)
    assert needle in str(info.value)


def test_missing_checkpoint_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.checkpoint is not set"):
        resolve(_compose("prompt=x"))


def test_quoted_prompt_keeps_commas_and_weights() -> None:
    assert _spec('prompt="masterpiece, (red:1.2) cube"').prompt == "masterpiece, (red:1.2) cube"


def test_grid_axis_key_and_values_compose_without_hydra_quotes() -> None:
    from sdbatch.config.grid_axes import grid_axes

    spec = _spec("grid.x.key=sampler.cfg_scale", "grid.x.values=[5,7,9]", "grid.y.key=prompt_sr",
                 'grid.y.values=[cat,"ink, pen"]', "prompt=a cat")
    assert [(a.key, a.values) for a in grid_axes(spec)] == [("sampler.cfg_scale", ("5", "7", "9")),
                                                            ("prompt_sr", ("cat", "ink, pen"))]
    quoted = _spec("grid.x='sampler.cfg_scale:5,7,9'")
    assert grid_axes(quoted)[0].values == ("5", "7", "9"), "the quoted string form keeps working"
    with pytest.raises((HydraException, OmegaConfBaseException), match="grid.x.kye"):
        _spec("grid.x.kye=seed")

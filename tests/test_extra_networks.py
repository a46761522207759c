"""A1111 <lora:NAME:WEIGHT> prompt tags: parsing, per-image weights, files from network.lora_dir, runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import max_diff, pixels, run_images, spec
from lora_files import make_lora
from test_run import manifest

from sdbatch.cli.runner import run
from sdbatch.config.spec import GridConfig, LoraConfig, NetworkConfig
from sdbatch.errors import PromptError
from sdbatch.plan.lora_tags import apply_tags
from sdbatch.plan.planner import plan
from sdbatch.prompts.extra_networks import strip_tags, tags
from sdbatch.prompts.png_info import read_png_params
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, sd1_components):
    folder = tmp_path_factory.mktemp("loras")
    unet, _, text_encoder = sd1_components
    make_lora(folder / "style.safetensors", unet, text_encoder, seed=1)
    make_lora(folder / "ink.safetensors", unet, None, seed=2)
    return folder


def test_tags_parse_and_strip() -> None:
    prompt = "a cat, <lora:style:0.7>, <lora:ink> oil <lora:style:-0.5>"
    assert tags(prompt, "p") == {"style": -0.5, "ink": 1.0}  # a later tag of a name wins
    assert strip_tags(prompt) == "a cat, ,  oil "
    for bad, needle in [("<lora:style:0.5:1:8>", "dynamic rank"), ("<lora:style:x>", "must be a number"),
                        ("<lora:>", "not a LoRA tag")]:
        with pytest.raises(PromptError, match=f"p:3: .*{needle}"):
            tags(f"a {bad}", "p:3")


def _jobs(lines: list[str], network: NetworkConfig):
    run_spec = dataclasses.replace(spec("x.safetensors"), network=network)
    return apply_tags(plan(run_spec, [PromptLine(t, "", f"f:{i}") for i, t in enumerate(lines)], 0), network)


def test_tags_add_files_and_set_each_images_weights(lora_dir) -> None:
    base = NetworkConfig(name="lora", loras=[LoraConfig(str(lora_dir / "style.safetensors"), 0.3)],
                         lora_dir=str(lora_dir))
    jobs, network = _jobs(["a <lora:ink:0.5>", "b <lora:style:0.9>", "c"], base)
    assert [lora.path for lora in network.loras] == [str(lora_dir / f"{n}.safetensors") for n in ("style", "ink")]
    assert [j.network_muls for j in jobs] == [(0.3, 0.5), (0.9, 0.0), (0.3, 0.0)]
    assert jobs[0].prompt == "a <lora:ink:0.5>", "the tag stays in the recorded prompt"
    no_config = NetworkConfig(lora_dir=str(lora_dir))
    jobs, network = _jobs(["a <lora:ink>", "b"], no_config)
    assert network.name == "lora" and [j.network_muls for j in jobs] == [(1.0,), (0.0,)]
    assert _jobs(["a", "b"], no_config) == (_jobs(["a", "b"], no_config)[0], no_config), "no tags: unchanged"


def test_tiny_lora_tag_names_the_built_in_demo_lora(lora_dir, tmp_path) -> None:
    jobs, network = _jobs(["a <lora:tiny-lora:0.8>", "b"], NetworkConfig())
    assert [lora.path for lora in network.loras] == ["builtin:tiny-lora"] and jobs[0].network_muls == (0.8,)
    configured = NetworkConfig(name="lora", loras=[LoraConfig("builtin:tiny-lora", 0.2)])
    jobs, network = _jobs(["a <lora:tiny-lora:0.8>", "b"], configured)
    assert len(network.loras) == 1 and [j.network_muls for j in jobs] == [(0.8,), (0.2,)], "the tag sets its weight"
    (tmp_path / "tiny-lora.safetensors").write_bytes((lora_dir / "ink.safetensors").read_bytes())
    _, network = _jobs(["a <lora:tiny-lora:0.8>"], NetworkConfig(lora_dir=str(tmp_path)))
    assert network.loras[0].path == str((tmp_path / "tiny-lora.safetensors").resolve()), "a file of that name wins"


def test_tag_errors_name_the_line(lora_dir) -> None:
    with pytest.raises(PromptError, match=r"f:1: <lora:nope>: no LoRA file named nope in network.lora_dir"):
        _jobs(["a", "b <lora:nope>"], NetworkConfig(lora_dir=str(lora_dir)))
    with pytest.raises(PromptError, match="network.lora_dir and paths.models are not set"):
        _jobs(["b <lora:ink>"], NetworkConfig())
    merged = NetworkConfig(name="lora", loras=[LoraConfig(str(lora_dir / "ink.safetensors"))], mode="merge",
                           lora_dir=str(lora_dir))
    with pytest.raises(PromptError, match="use network.mode=hooked or precalc"):
        _jobs(["b <lora:ink:0.5>"], merged)


def test_tagged_run_matches_the_config_run(sd1_single_file, lora_dir, tmp_path) -> None:
    tagged = spec(sd1_single_file, prompt=["a red cube <lora:style:0.8>", "a red cube"], seed=4, batch_size=2)
    tagged = dataclasses.replace(tagged, network=NetworkConfig(lora_dir=str(lora_dir)))
    images, lines = run_images(tagged, tmp_path / "tagged")
    configured = dataclasses.replace(spec(sd1_single_file, prompt="a red cube", seed=4), network=NetworkConfig(
        name="lora", loras=[LoraConfig(str(lora_dir / "style.safetensors"), 0.8)]))
    plain = spec(sd1_single_file, prompt="a red cube", seed=5)
    assert max_diff(images[:1], run_images(configured, tmp_path / "configured")[0]) <= 1
    assert max_diff(images[1:], run_images(plain, tmp_path / "plain")[0]) <= 1
    assert lines[0]["prompt"] == "a red cube <lora:style:0.8>" and lines[1]["networks"][0]["mul"] == 0.0
    infotext = read_png_params(tmp_path / "tagged" / lines[0]["file"])["parameters"]
    assert infotext.startswith("a red cube <lora:style:0.8>") and "Lora hashes: \"style: " in infotext
    assert "Lora hashes" not in read_png_params(tmp_path / "tagged" / lines[1]["file"])["parameters"]


def test_prompt_sr_over_tags_sweeps_lora_weights(sd1_single_file, lora_dir, tmp_path) -> None:
    """A1111 users' way of sweeping LoRA weights: Prompt S/R over the tag, here as a fused grid."""
    grid = GridConfig(x="prompt_sr:<lora:ink:0>,<lora:ink:1>")
    run_spec = spec(sd1_single_file, prompt="a red cube <lora:ink:0>", seed=4, batch_size=2, grid=grid)
    run_spec = dataclasses.replace(run_spec, network=NetworkConfig(lora_dir=str(lora_dir)))
    images, lines = run_images(run_spec, tmp_path / "grid")
    assert [line["networks"][0]["mul"] for line in lines] == [0.0, 1.0]
    assert max_diff(images[:1], run_images(spec(sd1_single_file, prompt="a red cube", seed=4), tmp_path / "p")[0]) <= 1
    assert max_diff(images[:1], images[1:]) > 8


def test_interactive_lines_bring_their_own_tags(sd1_single_file, lora_dir, tmp_path) -> None:
    import io

    run_spec = spec(sd1_single_file, prompt=None, interactive=True, no_preview=True, seed=4)
    run_spec = dataclasses.replace(run_spec, network=NetworkConfig(lora_dir=str(lora_dir)))
    run(run_spec, tmp_path / "i", stdin=io.StringIO("a red cube <lora:ink:1>\na red cube <lora:x:1>\na red cube\n"))
    lines = sorted(manifest(tmp_path / "i"), key=lambda x: x["index"])
    assert [[n["mul"] for n in line["networks"]] for line in lines] == [[1.0], []], "a bad tag skips only its line"
    plain = spec(sd1_single_file, prompt="a red cube", seed=lines[1]["seed"])
    assert max_diff([pixels(tmp_path / "i" / lines[1]["file"])], run_images(plain, tmp_path / "p")[0]) <= 1, "LoRA off"

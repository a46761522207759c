"""Planning and batching: seeds, repeats, names and whole-run grouping, on plain values (no torch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sdbatch.config.spec import ModelConfig, RunSpec, SamplerConfig
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.batching import BatchKey, make_batches
from sdbatch.plan.planner import file_name, plan
from sdbatch.prompts.sources import PromptLine, read_prompt_file, read_prompts


def _spec(**changes) -> RunSpec:
    from sdbatch.config.spec import GuidanceConfig, HighresConfig, NetworkConfig

    base = RunSpec(model=ModelConfig(checkpoint="builtin:tiny"), sampler=SamplerConfig(name="ddim"),
                   network=NetworkConfig(), guidance=GuidanceConfig(), highres=HighresConfig(), prompt="x")
    return dataclasses.replace(base, **changes)


LINES = [PromptLine("a cat", "", "prompt[0]"), PromptLine("a dog", "blurry", "prompt[1]")]


def test_seed_plus_k_over_iterations_and_images() -> None:
    jobs = plan(_spec(images_per_prompt=2, n_iter=2), LINES, base_seed=100)
    assert [j.seed for j in jobs] == list(range(100, 108))
    assert [j.prompt for j in jobs] == ["a cat", "a cat", "a dog", "a dog"] * 2
    assert [j.index for j in jobs] == list(range(8))
    assert jobs[2].negative_prompt == "blurry" and jobs[2].origin == "prompt[1]"


def test_names_are_deterministic_and_unique() -> None:
    jobs = plan(_spec(images_per_prompt=3), LINES, base_seed=7)
    assert [j.file_name for j in jobs][:2] == ["00000-7.png", "00001-8.png"]
    assert len({j.file_name for j in jobs}) == len(jobs)
    assert file_name("sequential", 0, 5) == "im_000001.png"


def test_seeds_wrap_into_32_bits() -> None:
    assert plan(_spec(images_per_prompt=2), LINES[:1], base_seed=2**32 - 1)[1].seed == 0


def test_batches_group_over_the_whole_run_and_keep_every_job() -> None:
    jobs = plan(_spec(images_per_prompt=3), LINES, base_seed=0)
    odd = [dataclasses.replace(j, width=256) if j.index % 2 else j for j in jobs]
    batches = make_batches(odd, batch_size=2)
    assert sorted(j.index for b in batches for j in b.jobs) == list(range(6))
    assert all(len({BatchKey.of(j) for j in b.jobs}) == 1 for b in batches)
    assert [len(b.jobs) for b in batches] == [2, 1, 2, 1]  # 3 at 512 px, 3 at 256 px, not interleaved


def test_cfg_scale_is_not_part_of_the_batch_key() -> None:
    a, b = plan(_spec(images_per_prompt=2), LINES[:1], base_seed=0)
    assert BatchKey.of(a) == BatchKey.of(dataclasses.replace(b, cfg_scale=3.0))


def test_prompt_file(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\ufeffa red cube\n\n# comment\n  a blue ball  \n", encoding="utf-8")
    lines = read_prompt_file(f, "ugly")
    assert [(pl.text, pl.negative, pl.origin) for pl in lines] == [("a red cube", "ugly", "p.txt:1"),
                                                                     ("a blue ball", "ugly", "p.txt:4")]
    assert [pl.text for pl in read_prompts(["x"], "", str(f))] == ["a red cube", "a blue ball", "x"]


def test_prompt_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(None, "", str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no prompt lines"):
        read_prompts(None, "", str(tmp_path / "empty.txt"))


@pytest.mark.parametrize(("line", "mode", "muls", "expected"), [
    ("a cat", "hooked", None, (0.5, 1.0)),
    ("a cat --am 0.2", "hooked", None, (0.2, 0.2)),  # the last value repeats
    ("a cat --am 0.2,0.3,0.4", "hooked", None, (0.2, 0.3)),  # extras dropped
    ("a cat --am 0.2", "precalc", [0.9], (0.2, 0.2)),
    ("a cat", "hooked", [0.9], (0.9, 0.9)),  # network.muls replaces each file's mul
    ("a cat --am 0.2", "merge", None, (0.5, 1.0)),  # merged once: --am cannot change it
])
def test_network_multipliers_per_image(line, mode, muls, expected) -> None:
    from sdbatch.config.spec import LoraConfig, NetworkConfig

    network = NetworkConfig(name="lora", loras=[LoraConfig("a.safetensors", 0.5), LoraConfig("b.safetensors")],
                            mode=mode, muls=muls)
    [job] = plan(_spec(network=network), [PromptLine(line, "", "p")], base_seed=0)
    assert job.network_muls == expected
    [plain] = plan(_spec(), [PromptLine(line, "", "p")], base_seed=0)
    assert plain.network_muls is None, "no networks, no multipliers (and --am is ignored with a warning)"


def test_and_prompts_are_planned_and_an_empty_part_names_its_line(caplog) -> None:
    """Issue 12 replaced the old "not supported yet" warning: AND prompts are Attention Couple prompts now."""
    jobs = plan(_spec(), [PromptLine("a cat AND a dog", "", "f:2"), PromptLine("ANDROID", "", "f:3")], base_seed=0)
    assert [job.prompt for job in jobs] == ["a cat AND a dog", "ANDROID"] and "AND" not in caplog.text
    with pytest.raises(PromptError, match="f:4: part 2 of the AND prompt is empty"):
        plan(_spec(), [PromptLine("a cat AND  AND a dog", "", "f:4")], base_seed=0)

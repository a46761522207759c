"""sampler.negative_scale / --nl: gcem156's separate negative-prompt scale, as a three-part CFG call."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import max_diff, ours, pipeline, reference, spec

from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.features.cfg import with_cfg
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

SEEDS = [11, 12345]


def _echo(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """A stand-in model whose prediction for a row is that row's embedding value (plus x)."""
    return x + cond.embeddings[:, :1, :1].view(-1, 1, 1, 1)


def _cond(text: float, negative: float, uncond: float | None, scales: list[float], ns: float | None) -> Conditioning:
    def rows(value):
        return torch.full((len(scales), 1, 1), value)

    return Conditioning(embeddings=rows(text), negative=rows(negative), cfg_scales=torch.tensor(scales),
                        uncond=None if uncond is None else rows(uncond), negative_scale=ns)


def test_three_parts_combine_as_gcem156() -> None:
    x = torch.zeros(2, 1, 1, 1)
    out = with_cfg(_echo)(x, torch.tensor(1), _cond(text=5.0, negative=2.0, uncond=1.0, scales=[7.0, 1.0], ns=3.0))
    assert out.flatten().tolist() == [1 + 7 * (5 - 1) - 3 * (2 - 1), 5.0]  # scale ≤ 1: the prompt's prediction
    two = with_cfg(_echo)(x, torch.tensor(1), _cond(text=5.0, negative=2.0, uncond=None, scales=[7.0, 7.0], ns=None))
    assert two.flatten().tolist() == [2 + 7 * (5 - 2)] * 2


def test_empty_negative_prompt_makes_it_plain_cfg(sd1_components, sd1_single_file, tmp_path) -> None:
    """negative == real unconditional: the negative scale drops out, diffusers' CFG image comes back."""
    run_spec = spec(sd1_single_file)
    run_spec = dataclasses.replace(run_spec, sampler=dataclasses.replace(run_spec.sampler, negative_scale=4.0))
    expected = reference(pipeline(sd1_components, tmp_path, "sd1", "ddim", False), ["a red cube"] * 2, SEEDS, 6, 7.5)
    assert max_diff(ours(run_spec, ["a red cube"] * 2, SEEDS), expected) <= 1


def test_empty_prompt_is_cfg_away_from_the_negative(sd1_components, sd1_single_file, tmp_path) -> None:
    """prompt == "": uncond − ns·(negative − uncond) is diffusers' CFG from the negative to "" at scale 1 + ns."""
    run_spec = spec(sd1_single_file, cfg=5.0)
    run_spec = dataclasses.replace(run_spec, sampler=dataclasses.replace(run_spec.sampler, negative_scale=2.0))
    pipe = pipeline(sd1_components, tmp_path, "sd1", "ddim", False)
    expected = reference(pipe, [""] * 2, SEEDS, 6, 3.0, negative="blurry, dark")
    got = ours(run_spec, [""] * 2, SEEDS, negative="blurry, dark")
    assert max_diff(got, expected) <= 1
    plain = ours(spec(sd1_single_file, cfg=5.0), [""] * 2, SEEDS, negative="blurry, dark")
    assert max_diff(plain, expected) > 1, "without the negative scale it is CFG at 5, another image"


@pytest.mark.parametrize(("option", "default", "expected"), [
    ("", None, None), ("", 2.5, 2.5), ("--nl 1.5", None, 1.5), ("--nl 1.5", 2.5, 1.5), ("--nl none", 2.5, None)])
def test_prompt_option_overrides_the_run_setting(option, default, expected) -> None:
    run_spec = spec("x.safetensors")
    run_spec = dataclasses.replace(run_spec, sampler=dataclasses.replace(run_spec.sampler, negative_scale=default))
    [job] = plan(run_spec, [PromptLine(f"a cat {option}", "", "p")], base_seed=0)
    assert job.negative_scale == expected

"""Deep Shrink: the timestep rule, the UNet patch (exact when it resizes nothing), runs, planning and config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from engine_helpers import max_diff, run_images, spec

from sdbatch.cli.runner import run
from sdbatch.config.deep_shrink_schema import DeepShrink
from sdbatch.config.spec import DeepShrinkConfig
from sdbatch.engine.features.deep_shrink import active_depth, shrunk
from sdbatch.errors import ModelError
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet4() -> UNet2DConditionModel:
    """A small UNet with SD's four down/up blocks (the tiny test model has two)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _call(unet, x, t=900):
    context = torch.randn(x.shape[0], 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor(t), encoder_hidden_states=context).sample


def test_timestep_rule() -> None:
    ds = DeepShrink(depth_1=3, timesteps_1=650, depth_2=1, timesteps_2=400, ratio=0.5)
    assert [active_depth(ds, t) for t in (999, 650, 649, 400, 399)] == [3, 3, 1, 1, None]
    assert active_depth(dataclasses.replace(ds, depth_2=None), 500) is None


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_patch_is_exact_when_nothing_is_resized_and_comes_off(unet4, depth) -> None:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = _call(unet4, x)
    with shrunk(unet4, depth, 1.0):  # our up-block forward and the pre-hook, with every size unchanged
        assert torch.equal(_call(unet4, x), plain)
    with shrunk(unet4, depth, 0.5):
        small = _call(unet4, x)
    assert small.shape == plain.shape and not torch.allclose(small, plain, atol=1e-3)
    assert all("forward" not in vars(block) for block in unet4.up_blocks)
    assert torch.equal(_call(unet4, x), plain), "hooks and forwards are gone after the block"


def test_the_chosen_block_sees_a_smaller_input(unet4) -> None:
    seen = []

    def width_at_block_2(x):  # hooks run in order: one added inside shrunk() sees Deep Shrink's result
        handle = unet4.down_blocks[2].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[-2:]), with_kwargs=True)
        try:
            _call(unet4, x)
        finally:
            handle.remove()

    x = torch.randn(1, 4, 24, 16)
    width_at_block_2(x)
    with shrunk(unet4, 2, 0.5):
        width_at_block_2(x)
    assert seen == [(6, 4), (3, 2)]  # 24×16 → 6×4 at block 2, then halved by Deep Shrink


def test_depth_beyond_the_model_is_one_clear_error(unet4) -> None:
    with pytest.raises(ModelError, match="Deep Shrink depth 4: this model's UNet has 4 down blocks"):
        with shrunk(unet4, 4, 0.5):
            pass


@pytest.mark.parametrize(("line", "run_ds", "expected"), [
    ("a cat", DeepShrinkConfig(), None),
    ("a cat --dsr 0.6", DeepShrinkConfig(), DeepShrink(3, 650, None, 650, 0.6)),  # the reference's default depth
    ("a cat --dst1 800", DeepShrinkConfig(depth_1=1), DeepShrink(1, 800, None, 650, 0.5)),
    ("a cat", DeepShrinkConfig(depth_1=0, depth_2=1, timesteps_2=300), DeepShrink(0, 650, 1, 300, 0.5)),
])
def test_line_options_over_the_run_settings(line, run_ds, expected) -> None:
    [job] = plan(dataclasses.replace(spec("x.safetensors"), deep_shrink=run_ds), [PromptLine(line, "", "p")], 0)
    assert job.deep_shrink == expected


def test_runs_with_deep_shrink(sd1_single_file, tmp_path) -> None:
    base = spec(sd1_single_file, prompt="a red cube", seed=3, width=128, height=128)
    plain, _ = run_images(base, tmp_path / "plain")
    by_line, lines = run_images(dataclasses.replace(base, prompt="a red cube --dsd1 1 --dst1 500"), tmp_path / "line")
    by_run, _ = run_images(dataclasses.replace(base, deep_shrink=DeepShrinkConfig(depth_1=1, timesteps_1=500)),
                           tmp_path / "run")
    assert max_diff(by_line, plain) > 8 and max_diff(by_line, by_run) == 0
    assert lines[0]["deep_shrink"] == {"depth_1": 1, "timesteps_1": 500, "depth_2": None, "timesteps_2": 650,
                                       "ratio": 0.5}
    never, _ = run_images(dataclasses.replace(base, prompt="a red cube --dsd1 1 --dst1 1000"), tmp_path / "never")
    assert max_diff(never, plain) == 0, "no step has t >= 1000: the plain image"
    with pytest.raises(ModelError, match="Deep Shrink depth 3"):
        run(dataclasses.replace(base, prompt="a red cube --dsr 0.5"), tmp_path / "deep")  # default depth 3

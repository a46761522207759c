"""The opt-in accelerators, token merging (perf.tome_ratio) and DeepCache (perf.deepcache.*): off is exact, the
models come back exactly, a batch equals its images alone, the price in pixels is bounded, images record them,
bad values are one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from engine_helpers import SIZE, init_images, max_diff, run_images, spec
from PIL import Image
from test_bad_config import _args, _one_error_line
from test_run import run_cli

from sdbatch.config.accelerators_schema import DeepCacheConfig
from sdbatch.config.spec import HighresConfig, LoraConfig, NetworkConfig, PerfConfig, RunSpec, SamplerConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.features.deepcache import skipped_modules, with_deepcache
from sdbatch.engine.features.token_merging import apply, matching
from sdbatch.engine.models.export import save_single_file
from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.errors import SdbatchError

torch.set_num_threads(1)

# the tiny SD1 model has no attention at full resolution, where token merging acts: this one has attention on
# both levels
ATTENTION_EVERYWHERE = {"down_block_types": ("CrossAttnDownBlock2D",) * 2,
                        "up_block_types": ("CrossAttnUpBlock2D",) * 2}
TOME = PerfConfig(tome_ratio=0.5)
DEEPCACHE = PerfConfig(deepcache=DeepCacheConfig(interval=3))
PROMPTS = ["a red cube", "a blue sphere on grass"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    components = build_tiny_components("sd1", 5, unet=ATTENTION_EVERYWHERE)
    return components, save_single_file(tmp_path_factory.mktemp("accel") / "accel.safetensors", *components, "sd1")


def _spec(model, perf: PerfConfig | None = None, **top) -> RunSpec:
    return spec(model[1], steps=6, perf=perf or PerfConfig(), **{"prompt": PROMPTS, "seed": 7, **top})


def _images(tmp_path, run_spec: RunSpec, name: str) -> tuple[list[np.ndarray], list[dict]]:
    return run_images(run_spec, tmp_path / name)


def _unet_state(unet: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in unet.state_dict().items()}


def _no_patches_left(unet: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m) for m in unet.modules())


def test_matching_at_ratio_0_gives_back_the_tokens_and_merges_into_cells() -> None:
    tokens = torch.randn(2, 63, 8, generator=torch.Generator().manual_seed(0))  # a 7×9 grid: odd edges
    merge, unmerge = matching(tokens, 7, 9, 0.0)
    assert torch.equal(unmerge(merge(tokens)), tokens)
    merge, unmerge = matching(tokens, 7, 9, 0.5)
    assert merge(tokens).shape == (2, 63 - 31, 8)
    twin = tokens.clone()
    twin[:, 1] = twin[:, 0]  # token 1 equals its cell's destination (token 0): it is merged into it first
    merge, unmerge = matching(twin, 7, 9, 0.02)
    assert torch.equal(unmerge(merge(twin))[:, :2], twin[:, :2])


def test_off_is_exact_and_the_run_restores_the_models(model, tmp_path) -> None:
    unet = get_engine(_spec(model).model, PerfConfig()).bundle.unet
    before = _unet_state(unet)
    plain, lines = _images(tmp_path, _spec(model), "plain")
    assert lines[0]["tome_ratio"] is None and lines[0]["deepcache"] is None, "unrecorded when off"
    off = PerfConfig(tome_ratio=0.0, deepcache=DeepCacheConfig(interval=1, branch=3))
    assert max_diff(_images(tmp_path, _spec(model, off), "off")[0], plain) == 0
    both = dataclasses.replace(TOME, deepcache=DEEPCACHE.deepcache)
    faster, _ = _images(tmp_path, _spec(model, both), "both")
    assert max_diff(faster, plain) > 0
    assert _no_patches_left(unet) and all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert max_diff(_images(tmp_path, _spec(model), "again")[0], plain) == 0, "the cached model is plain again"


@pytest.mark.parametrize("perf", [TOME, DEEPCACHE], ids=["tome", "deepcache"])
def test_a_batch_equals_its_images_alone_and_the_price_is_bounded(model, tmp_path, perf) -> None:
    exact, _ = _images(tmp_path, _spec(model), "exact")
    alone, _ = _images(tmp_path, _spec(model, perf), "alone")
    batched, lines = _images(tmp_path, _spec(model, perf, batch_size=2), "batched")
    assert max_diff(batched, alone) <= 1
    price = np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(alone, exact, strict=True)])
    assert 0 < price < 25, f"mean absolute difference {price:.2f} of 255"
    image = Image.open(tmp_path / "batched" / lines[0]["file"])
    text, record = image.text["parameters"], json.loads(image.text["sdbatch"])
    if perf.tome_ratio:
        assert "Token merging ratio: 0.5," in text and record["tome_ratio"] == 0.5 and record["deepcache"] is None
    else:
        assert 'DeepCache: "interval 3, branch 0"' in text and "Token merging" not in text
        assert record["deepcache"] == {"interval": 3, "branch": 0} and record["tome_ratio"] is None


@pytest.fixture(scope="module")
def unet4(model):
    """A small UNet with SD's four blocks and attention at full resolution."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def _steps(unet, model_fn, rows: int = 2, steps: int = 4) -> list[torch.Tensor]:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))[:rows]
    context = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))[:rows]
    with torch.no_grad():
        return [model_fn(x, torch.tensor(900 - 100 * i), Conditioning(context, step=i)) for i in range(steps)]


def _plain(unet):
    return lambda x, t, cond: unet(x, t, encoder_hidden_states=cond.embeddings).sample


def test_deepcache_branches_and_steps(unet4) -> None:
    # DeepCache's numbering: branch 0 keeps conv_in and the last up layer; 11 skips only the mid block
    assert len(skipped_modules(unet4, 0)) == 12 and skipped_modules(unet4, 11) == [unet4.mid_block]
    plain = _steps(unet4, _plain(unet4))
    assert all(torch.equal(a, b) for a, b in zip(_steps(unet4, with_deepcache(unet4, 1, 0)(_plain(unet4))), plain,
                                                     strict=True))
    cached = _steps(unet4, with_deepcache(unet4, 3, 0)(_plain(unet4)))
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[3], plain[3]), "steps 0 and 3 are full"
    assert not torch.allclose(cached[1], plain[1], atol=1e-4)
    alone = _steps(unet4, with_deepcache(unet4, 3, 0)(_plain(unet4)), rows=1)
    assert all(torch.allclose(a, b[:1], atol=1e-5) for a, b in zip(alone, cached, strict=True)), "by row"
    assert _no_patches_left(unet4)


def test_token_merging_acts_at_full_resolution_only_and_comes_off(unet4) -> None:
    merged_shapes = []
    handle = unet4.down_blocks[1].attentions[0].transformer_blocks[0].attn1.register_forward_hook(
        lambda m, a, out: merged_shapes.append(a[0].shape))
    plain = _steps(unet4, _plain(unet4), steps=1)[0]
    patch = apply(unet4, 0.5)
    merged = _steps(unet4, _plain(unet4), steps=1)[0]
    alone = _steps(unet4, _plain(unet4), rows=1, steps=1)[0]
    patch.restore()
    handle.remove()
    assert merged_shapes[0] == merged_shapes[1] == (2, 64, 32), "an 8×8 level is not merged"
    assert not torch.allclose(merged, plain, atol=1e-4) and torch.allclose(alone, merged[:1], atol=1e-5)
    assert _no_patches_left(unet4) and torch.equal(_steps(unet4, _plain(unet4), steps=1)[0], plain)


@pytest.mark.parametrize(("perf", "needle"), [
    (PerfConfig(deepcache=DeepCacheConfig(interval=2, branch=99)), "perf.deepcache.branch=99: this model's UNet has"),
    (PerfConfig(deepcache=DeepCacheConfig(interval=2)), "cannot be combined with Deep Shrink"),
], ids=["branch beyond the model", "a prompt's Deep Shrink"])
def test_refused_at_run_time_in_one_line(model, tmp_path, perf, needle) -> None:
    with pytest.raises(SdbatchError) as caught:
        _images(tmp_path, _spec(model, perf, prompt="a cat --dsd1 1" if perf.deepcache.branch == 0 else "a cat"), "r")
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    assert _no_patches_left(get_engine(_spec(model).model, PerfConfig()).bundle.unet)


@pytest.mark.slow
def test_the_command_line_refuses_in_one_line(cache_dir, tmp_path) -> None:
    proc = run_cli([*_args(["perf.deepcache.interval=2", "prompt='a cat --dsd1 1'"]), f"hydra.run.dir={tmp_path}/r"],
                   cache_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "perf.deepcache.interval > 1 cannot be combined with Deep Shrink" in _one_error_line(proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("perf", [TOME, DEEPCACHE], ids=["tome", "deepcache"])
def test_with_highres_negative_scale_lora_and_inpainting(model, tmp_path, perf) -> None:
    """Highres. fix (a second pass: a fresh cache), three CFG parts, hooked LoRA, and inpainting: each image of a
    batch of 2 as made alone, and the models plain afterwards."""
    lora = NetworkConfig(name="lora", loras=[LoraConfig(path="builtin:tiny-lora", mul=1.0)])
    highres = HighresConfig(name="on", scale=0.5, steps=3, strength=0.5)
    run = dataclasses.replace(_spec(model, perf, network=lora, highres=highres),
                              sampler=SamplerConfig(name="ddim", steps=4, negative_scale=3.0))
    alone, _ = _images(tmp_path, run, "alone")
    assert max_diff(_images(tmp_path, dataclasses.replace(run, batch_size=2), "batched")[0], alone) <= 1
    init, mask = init_images(tmp_path, [1])[0], tmp_path / "mask.png"
    mask_image = Image.new("L", (SIZE, SIZE), 0)
    mask_image.paste(255, (0, 0, SIZE // 2, SIZE))
    mask_image.save(mask)
    inpainted, _ = _images(tmp_path, _spec(model, perf, init_image=str(init), mask_image=str(mask)), "inpaint")
    assert len(inpainted) == 2
    assert _no_patches_left(get_engine(run.model, PerfConfig()).bundle.unet)


def test_token_merging_says_when_it_merged_nothing(sd1_single_file, tmp_path, caplog) -> None:
    """The tiny SD1 model has attention only below full resolution: the run warns instead of ignoring the key."""
    with caplog.at_level("WARNING"):
        run_images(spec(sd1_single_file, steps=2, perf=TOME, prompt="a cat"), tmp_path / "run")
    assert "token merging merged nothing in this run" in caplog.text and "<perf.tome_ratio=0.5>" in caplog.text

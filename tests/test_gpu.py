"""GPU checks (issue 15): the CPU suite's parity, fallback, attention, LoRA, launcher and memory tests on CUDA.

Marked `gpu`, so the default run leaves them out; `python -m pytest -q -m gpu tests/test_gpu.py` (bench/gpu.sh)
runs them, and without CUDA every one of them is skipped. The session fixtures (sd1_components, ...) are shared
CPU objects: they are deep-copied before being moved to CUDA or cast.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import warnings
from collections.abc import Callable

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import XFormersAttnProcessor
from engine_helpers import max_diff, ours, pipeline, reference, run_images, spec
from lora_files import make_lora
from test_networks_run import _with_lora
from test_sweeps import SMALL, index, run_cli
from test_vae_safety import _assert_same_weights, _fallback_warnings, _poison, _weights

from sdbatch.config.deep_shrink_schema import DeepShrinkConfig
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.models.loading import _xformers_available
from sdbatch.engine.vae.slicing import decode_sliced
from sdbatch.plan.batching import make_batches
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"),
]

PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [11, 12345]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = 2  # levels of 255: GPU kernels sum in other orders than the CPU's and than each other


def on(run_spec: RunSpec, device: str = "cuda", precision: str | None = None, **perf) -> RunSpec:
    """run_spec on ``device`` (perf.device), in ``precision`` (model.precision) if given, with these perf keys."""
    model = run_spec.model if precision is None else dataclasses.replace(run_spec.model, precision=precision)
    perf = dataclasses.replace(run_spec.perf, device=device, progress=False, **perf)
    return dataclasses.replace(run_spec, model=model, perf=perf)


def _no_tf32(monkeypatch) -> None:
    # TF32 convolutions (cuDNN's default on Ampere and later) round their inputs to 10 mantissa bits: not fp32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# ---------------------------------------------------------------- parity with diffusers in half precision


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_parity_with_diffusers(precision, sd1_components, sd1_single_file, tmp_path) -> None:
    # torch's own .to, as sdbatch's loader: diffusers' override warns about fp32-only modules it does not have
    components = tuple(torch.nn.Module.to(copy.deepcopy(m), "cuda", DTYPES[precision]) for m in sd1_components)
    pipe = pipeline(components, tmp_path, "sd1", "ddim", v_pred=False)
    pipe.set_progress_bar_config(disable=True)
    expected = reference(pipe, PROMPTS, SEEDS, steps=6, cfg=7.5, negative="blurry")
    run_spec = on(spec(sd1_single_file), precision=precision)
    got = ours(run_spec, PROMPTS, SEEDS, negative="blurry")
    unet = get_engine(run_spec.model, run_spec.perf).bundle.unet
    assert (unet.device.type, unet.dtype) == ("cuda", DTYPES[precision])
    assert max_diff(got, expected) <= TOLERANCE


# ---------------------------------------------------------------- fp32 redo of a NaN fp16 decode


def test_fp16_vae_nan_is_decoded_again_in_fp32(sd1_single_file, tmp_path, caplog) -> None:
    """As tests/test_vae_safety.py does it in bf16 on the CPU: image 0's decode gives NaN, is redone, recorded."""
    run_spec = on(spec(sd1_single_file, steps=2, seed=3, prompt="x", images_per_prompt=2, batch_size=2),
                  precision="fp16")
    vae = get_engine(run_spec.model, run_spec.perf).bundle.vae
    assert (vae.device.type, vae.dtype) == ("cuda", torch.float16)
    before = _weights(vae)
    handle = _poison(vae.decoder, rows=0)
    try:
        with caplog.at_level(logging.WARNING):
            images, lines = run_images(run_spec, tmp_path / "out")
    finally:
        handle.remove()
    assert [line["vae_fallback"] for line in lines] == ["fp32", None]
    assert all(image.max() > 0 for image in images), "no black image"
    assert len(_fallback_warnings(caplog)) == 1
    assert vae.dtype == torch.float16
    _assert_same_weights(vae, before)  # cast to fp32 and back on the GPU: bit-identical


# ---------------------------------------------------------------- attention, memory format, compile


@pytest.mark.skipif(torch.cuda.is_available() and not _xformers_available(),
                    reason="xformers is not installed (or does not import)")
def test_xformers_matches_sdpa(sd1_single_file) -> None:
    # the tiny UNet's heads have 8 channels, the VAE's one 64: multiples of 8, as xformers' kernels want
    sdpa_spec = on(spec(sd1_single_file), precision="fp16", attention="sdpa")
    sdpa = ours(sdpa_spec, PROMPTS, SEEDS)
    xformers_spec = on(sdpa_spec, attention="xformers")
    got = ours(xformers_spec, PROMPTS, SEEDS)
    bundle = get_engine(xformers_spec.model, xformers_spec.perf).bundle
    processors = [*bundle.unet.attn_processors.values(), *bundle.vae.attn_processors.values()]
    assert all(isinstance(p, XFormersAttnProcessor) for p in processors), "xformers really ran (no SDPA fallback)"
    assert max_diff(got, sdpa) <= TOLERANCE


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True},
                                     {"compile": True, "channels_last": True}],
                         ids=["channels_last", "compile", "compile+channels_last"])
def test_channels_last_and_compile_match_the_plain_engine(options, sd1_single_file, tmp_path) -> None:
    # compile replaces the cached UNet's forward for good: a copy of the file gets a model of its own
    path = shutil.copy(sd1_single_file, tmp_path / "own.safetensors")
    plain_spec = on(spec(path), precision="fp16")
    plain = ours(plain_spec, PROMPTS, SEEDS)
    tuned_spec = on(plain_spec, **options)
    got = ours(tuned_spec, PROMPTS, SEEDS)
    unet = get_engine(tuned_spec.model, tuned_spec.perf).bundle.unet
    assert ("forward" in vars(unet)) == options.get("compile", False), "torch.compile set the instance's forward"
    if options.get("channels_last"):
        weight = unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert max_diff(got, plain) <= TOLERANCE


def _own_syncs(run_spec: RunSpec) -> int:
    """How many synchronizing CUDA calls sdbatch's own code made while the engine ran the run's one batch."""
    engine = get_engine(run_spec.model, run_spec.perf)
    batch = make_batches(plan(run_spec, [PromptLine(PROMPTS[0], "", "test")], base_seed=SEEDS[0]), 1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.denoise(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) and "/sdbatch/" in w.filename for w in caught)


def test_no_host_sync_per_step_in_sdbatch_code(sd1_single_file) -> None:
    # diffusers' schedulers sync on their own; sdbatch's wrappers (CFG, Deep Shrink) must not add one per step
    shrink = DeepShrinkConfig(depth_1=1, timesteps_1=500)
    short, long = (on(spec(sd1_single_file, steps=steps, deep_shrink=shrink), precision="fp16") for steps in (4, 8))
    assert _own_syncs(short) == _own_syncs(long)


# ---------------------------------------------------------------- the same seeds, the same pixels on CPU and GPU


def test_per_image_seeds_give_the_same_pixels_on_cuda_and_cpu(sd1_single_file, monkeypatch) -> None:
    _no_tf32(monkeypatch)
    base = spec(sd1_single_file)  # fp32
    cpu = ours(on(base, device="cpu"), PROMPTS, SEEDS)
    gpu = ours(on(base), PROMPTS, SEEDS)
    assert max_diff(gpu, cpu) <= TOLERANCE


# ---------------------------------------------------------------- LoRA on the GPU


# Merging rounds W + the LoRA update to the model's precision once more than hooking does: measured 13 levels apart
# in bf16 on the CPU (8 significant bits); fp16 has 11, so about 2 levels are expected, 4 allowed.
LORA_TOLERANCE = {"fp32": TOLERANCE, "fp16": 4}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_lora_hooked_and_merged_agree(precision, sd1_components, sd1_single_file, tmp_path, monkeypatch) -> None:
    _no_tf32(monkeypatch)
    unet, _, text_encoder = sd1_components
    lora = make_lora(tmp_path / "style.safetensors", unet, text_encoder)
    base = on(spec(sd1_single_file, prompt=["a red cube", "a lighthouse"], seed=5, batch_size=2), precision=precision)
    plain = run_images(base, tmp_path / "plain")[0]
    hooked = run_images(_with_lora(base, lora, 0.8), tmp_path / "hooked")[0]
    merged = run_images(_with_lora(base, lora, 0.8, "merge"), tmp_path / "merge")[0]
    assert max_diff(hooked, plain) > 8, "the LoRA changes the images"
    assert max_diff(merged, hooked) <= LORA_TOLERANCE[precision]
    assert max_diff(run_images(base, tmp_path / "after")[0], plain) == 0, "merged weights are restored exactly"


# ---------------------------------------------------------------- the joblib launcher


def test_joblib_launcher_puts_two_jobs_on_cuda_0(cache_dir, tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher.joblib_launcher", reason="hydra-joblib-launcher")
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # one GPU: job n runs on cuda:(n % 1)
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=tiny", "prompt=a cat",
                    "width=64", *SMALL, "seed=1,2", f"hydra.sweep.dir={sweep}"], cache_dir, tmp_path,
                   CUDA_VISIBLE_DEVICES=first)
    assert proc.returncode == 0, proc.stderr
    assert [(job["status"], job["device"]) for job in index(sweep)] == [("completed", "cuda:0")] * 2


# ---------------------------------------------------------------- VAE slices: memory


def _peak_mib(fn: Callable[[], torch.Tensor]) -> float:
    """CUDA memory allocated at the peak of fn() above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize()
    assert out.shape[-2:] == (1024, 1024)
    return (torch.cuda.max_memory_allocated() - before) / (1 << 20)


def test_vae_slices_lower_the_peak_memory_of_a_1024px_decode(caplog) -> None:
    """SD1.5's VAE widths (random weights, as bench/txt2img.py --full builds it), fp16, one 1024x1024 image."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            norm_num_groups=32, sample_size=512)
    vae = vae.to("cuda", torch.float16).eval().requires_grad_(False)
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
    plain = _peak_mib(lambda: vae.decode(z, return_dict=False)[0])
    with caplog.at_level(logging.WARNING):
        sliced = _peak_mib(lambda: decode_sliced(vae, z, 8))
    assert not caplog.records, "decode_sliced fell back to a whole decode"
    assert sliced < plain / 2, f"peak {sliced:.0f} MiB with 8 slices, {plain:.0f} MiB plain"

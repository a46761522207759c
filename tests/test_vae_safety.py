"""Precision and memory safety (issue 10, section 5): the fp32 redo of a half-precision VAE decode that gives
NaN/inf, tiled decoding (perf.vae_tiling), and soft (grey) inpainting masks (inpaint.mask_threshold)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import SIZE, init_images, max_diff, ours, spec
from PIL import Image

from sdbatch.cli.runner import run
from sdbatch.config.spec import HighresConfig, InpaintConfig, PerfConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.features import img2img
from sdbatch.engine.features.inpaint import blend_hook, load_masks, paste_original, start
from sdbatch.engine.vae import decode as vae_mod
from sdbatch.engine.vae.decode import decode
from sdbatch.engine.vae.tiling import decode_tiled
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.png_info import read_png_params
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
HALF = (torch.float16, torch.bfloat16)


def _latents(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _assert_same_weights(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


def _poison(module: torch.nn.Module, rows: int | None = None):
    """A forward hook: NaN in output row `rows` (every row if None) while the module runs in fp16/bf16."""

    def hook(_module, _args, output):
        if output.dtype not in HALF:
            return output
        output = output.clone()
        output[slice(None) if rows is None else rows] = float("nan")
        return output

    return module.register_forward_hook(hook)


def _fallback_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "decoded again in fp32" in r.getMessage()]


# ---------------------------------------------------------------- fp32 redo of a NaN/inf half decode


@pytest.fixture
def bf16_vae(sd1_components):
    return copy.deepcopy(sd1_components[1]).to(torch.bfloat16)


def test_nan_decode_is_redone_in_fp32_for_that_image_only(bf16_vae, caplog) -> None:
    z = _latents(3, 8, 8)
    plain = _arrays(decode(bf16_vae, z))  # no NaN: the bf16 images
    fp32_copy = copy.deepcopy(bf16_vae).float()  # what the fallback computes: the same weights in fp32
    expected_redo = _arrays(decode(fp32_copy, z[1:2]))[0]
    before = _weights(bf16_vae)
    handle = _poison(bf16_vae.decoder, rows=1)
    try:
        redone: list[int] = []
        with caplog.at_level(logging.WARNING):
            images = _arrays(decode(bf16_vae, z, 0, None, False, ["a.png", "b.png", "c.png"], redone))
    finally:
        handle.remove()
    assert redone == [1]
    assert np.array_equal(images[0], plain[0]) and np.array_equal(images[2], plain[2])  # the others: untouched
    assert np.array_equal(images[1], expected_redo) and images[1].max() > 0  # not the black image of a NaN decode
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1 and "b.png" in warnings[0].getMessage() and "a.png" not in warnings[0].getMessage()
    assert bf16_vae.dtype == torch.bfloat16
    _assert_same_weights(bf16_vae, before)  # cast to fp32 and back: bit-identical


@pytest.mark.parametrize(("chunk", "slices", "tiling"), [(2, None, False), (0, 2, False), (0, None, True)],
                         ids=["vae_batch_size=2", "vae_slices=2", "vae_tiling"])
def test_fallback_in_every_decode_mode(bf16_vae, chunk, slices, tiling, caplog) -> None:
    """conv_out runs in every mode (whole, per band, per tile); each poisoned image is redone the same way."""
    z = _latents(3, 12, 12)  # 12 latents > the tiny VAE's 8-latent tile: tiling is really on
    expected = _arrays(decode(copy.deepcopy(bf16_vae).float(), z, chunk, slices, tiling))
    before = _weights(bf16_vae)
    handle = _poison(bf16_vae.decoder.conv_out)
    try:
        redone: list[int] = []
        with caplog.at_level(logging.WARNING):
            images = _arrays(decode(bf16_vae, z, chunk, slices, tiling, None, redone))
    finally:
        handle.remove()
    assert redone == [0, 1, 2]
    assert max(np.abs(a - b).max() for a, b in zip(images, expected, strict=True)) <= 1
    assert len(_fallback_warnings(caplog)) == 1  # one warning per decode call, not per chunk
    _assert_same_weights(bf16_vae, before)
    assert not bf16_vae.use_tiling


def test_no_fallback_for_nan_latents_or_an_fp32_vae(bf16_vae, sd1_components, caplog) -> None:
    z = _latents(2, 8, 8)
    z[0, 0, 0, 0] = float("nan")  # the UNet overflowed: an fp32 decode cannot help
    redone: list[int] = []
    with caplog.at_level(logging.WARNING):
        decode(bf16_vae, z, 0, None, False, None, redone)
    assert redone == [] and not _fallback_warnings(caplog)
    assert "latents of image 1 are NaN/inf" in caplog.text
    caplog.clear()
    vae = sd1_components[1]
    handle = _poison(vae.decoder)  # fires only in half precision: an fp32 VAE has nothing to fall back to
    try:
        with caplog.at_level(logging.WARNING):
            decode(vae, _latents(1, 8, 8), 0, None, False, None, redone)
    finally:
        handle.remove()
    assert redone == [] and not caplog.records


def test_run_records_vae_fallback_per_image(sd1_single_file, tmp_path, caplog) -> None:
    """bf16 on the CPU: the first image of the batch decodes to NaN, is redone in fp32 and recorded as such."""
    run_spec = spec(sd1_single_file, steps=2, seed=3, prompt="x", images_per_prompt=2, batch_size=2)
    run_spec = dataclasses.replace(run_spec, model=dataclasses.replace(run_spec.model, precision="bf16"))
    vae = get_engine(run_spec.model, run_spec.perf).bundle.vae
    assert vae.dtype == torch.bfloat16
    before = _weights(vae)
    handle = _poison(vae.decoder, rows=0)
    try:
        with caplog.at_level(logging.WARNING):
            result = run(run_spec, tmp_path / "out")
    finally:
        handle.remove()
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    lines.sort(key=lambda line: line["index"])
    assert [line["vae_fallback"] for line in lines] == ["fp32", None]  # the key is always there
    for path in result.written:
        params = read_png_params(path)["sdbatch"]
        assert params["vae_fallback"] == ("fp32" if params["index"] == 0 else None)
        assert np.asarray(Image.open(path)).max() > 0  # no black image
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1 and lines[0]["file"] in warnings[0].getMessage()
    _assert_same_weights(vae, before)
    assert vae.dtype == torch.bfloat16


def test_highres_first_stage_fallback_is_recorded_on_its_own_line(sd1_single_file, tmp_path) -> None:
    """Only the 64-pixel first stage's decode overflows: its saved image records the fallback, the final not."""
    highres = HighresConfig(name="on", scale=0.5, steps=2, strength=0.5, save_first_stage=True)
    run_spec = spec(sd1_single_file, steps=2, width=128, height=128, highres=highres, seed=7, prompt="x")
    run_spec = dataclasses.replace(run_spec, model=dataclasses.replace(run_spec.model, precision="bf16"))
    vae = get_engine(run_spec.model, run_spec.perf).bundle.vae

    def hook(_module, _args, output):
        return output.clone().fill_(float("nan")) if output.dtype in HALF and output.shape[-1] == 64 else output

    handle = vae.decoder.register_forward_hook(hook)
    try:
        run(run_spec, tmp_path / "out")
    finally:
        handle.remove()
    lines = {json.loads(line)["file"]: json.loads(line)
             for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()}
    assert {name: line["vae_fallback"] for name, line in lines.items()} == {"00000-7-first.png": "fp32",
                                                                            "00000-7.png": None}


# ---------------------------------------------------------------- tiled decode

TILE = 16  # latents (128 pixels) in the tests; SD's VAE config gives 64 (512 pixels)
# plain vs tiled decode of two tiny-model images, 256×256 (32×32 latents: 3×3 tiles of 16 latents, a quarter
# shared), in 8-bit levels; README.md ("Performance") quotes these
MEASURED_MAX, MEASURED_MEAN = 48, 3.98


def test_tiled_decode_is_the_plain_decode_within_one_tile(sd1_components) -> None:
    vae = sd1_components[1]
    for h, w in [(8, 8), (16, 12)]:
        z = _latents(2, h, w)
        with torch.no_grad():
            expected = vae.decode(z, return_dict=False)[0]
        assert torch.equal(decode_tiled(vae, z, tile=16), expected)


def test_tiled_decode_bounds_the_decoder_input_and_restores_the_vae(sd1_components) -> None:
    vae = sd1_components[1]
    settings = (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor)
    shapes: list[tuple[int, ...]] = []
    handle = vae.decoder.conv_in.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    try:
        pixels = decode_tiled(vae, _latents(1, 40, 24), tile=TILE)
    finally:
        handle.remove()
    assert pixels.shape == (1, 3, 320, 192) and torch.isfinite(pixels).all()
    assert len(shapes) == 4 * 2  # tiles start every 12 latents: rows 0, 12, 24, 36; columns 0, 12
    assert max(s[2] for s in shapes) <= TILE and max(s[3] for s in shapes) <= TILE
    assert (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor) == settings

    def fail(*_):
        raise RuntimeError("out of memory")

    handle = vae.decoder.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            decode_tiled(vae, _latents(1, 40, 24), tile=TILE)
    finally:
        handle.remove()
    assert (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor) == settings


def test_vae_tiling_run_differs_from_the_plain_decode_as_documented(sd1_single_file) -> None:
    base = spec(sd1_single_file, steps=3, width=256, height=256)
    tiled = dataclasses.replace(base, perf=PerfConfig(vae_tiling=True))
    prompts, seeds = ["a red cube", "a lighthouse"], [1, 2]
    plain = ours(base, prompts, seeds)
    # SD's VAE config tiles at 512 pixels: a 256-pixel image is one tile, so tiling changes nothing
    assert max_diff(ours(tiled, prompts, seeds), plain) == 0
    vae = get_engine(tiled.model, tiled.perf).bundle.vae
    saved = vae.tile_latent_min_size, vae.tile_sample_min_size
    vae.tile_latent_min_size, vae.tile_sample_min_size = TILE, TILE * 8
    try:
        got = ours(tiled, prompts, seeds)
    finally:
        vae.tile_latent_min_size, vae.tile_sample_min_size = saved
    diff = np.abs(np.stack(got).astype(int) - np.stack(plain).astype(int))
    print(f"tiled vs plain decode: max {diff.max()}, mean {diff.mean():.2f} levels")
    assert diff.max() == pytest.approx(MEASURED_MAX, abs=10) and diff.mean() == pytest.approx(MEASURED_MEAN, abs=1.5)
    assert not vae.use_tiling


def _cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("args", "needle"), [
    (["perf.vae_tiling=true", "perf.vae_slices=4"], "perf.vae_tiling=true and perf.vae_slices=4 cannot be combined"),
    (["inpaint.mask_threshold=1.5"], "inpaint.mask_threshold must be in (0, 1), or null for soft (grey) masks"),
    (["inpaint.mask_threshold=0"], "inpaint.mask_threshold must be in (0, 1)"),
])
def test_bad_settings_fail_in_one_line(args, needle, cache_dir, tmp_path) -> None:
    proc = _cli(["model=tiny", "prompt=x", *args, f"hydra.run.dir={tmp_path / 'run'}"], cache_dir, tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sdbatch:")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- soft inpainting masks


def _mask(path: Path, value: int | np.ndarray, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    array = np.full(size[::-1], value, np.uint8) if isinstance(value, int) else value
    Image.fromarray(array, mode="L").save(path)
    return path


def test_load_masks_keeps_grey_levels_or_binarizes(tmp_path) -> None:
    levels = np.repeat(np.array([0, 64, 128, 255], np.uint8), SIZE // 4)[None, :].repeat(SIZE, 0)
    path = _mask(tmp_path / "levels.png", levels)
    row = lambda threshold: load_masks([str(path)], SIZE, SIZE, threshold=threshold)[0, 0, 0, :: SIZE // 4]  # noqa: E731
    assert torch.allclose(row(None), torch.tensor([0, 64, 128, 255]) / 255)
    assert row(0.5).tolist() == [0, 0, 1, 1]  # diffusers' mask processor
    assert row(0.2).tolist() == [0, 1, 1, 1]
    half = np.zeros((48, 48), np.uint8)
    half[:, 20:] = 255
    resized = _mask(tmp_path / "binary-48.png", half)  # LANCZOS to 64 blurs and rings the edge: grey pixels
    soft = load_masks([str(resized)], SIZE, SIZE, threshold=None)
    assert torch.equal(soft, load_masks([str(resized)], SIZE, SIZE, threshold=0.5))  # a black/white file stays so
    assert soft.unique().tolist() == [0.0, 1.0]


def test_blend_weights_by_the_soft_mask() -> None:
    scheduler = make_scheduler("ddim", "default", False)
    scheduler.set_timesteps(4)
    original, noise, latents = _latents(1, 8, 8, 1), _latents(1, 8, 8, 2), _latents(1, 8, 8, 3)
    mask = torch.full((1, 1, 8, 8), 0.25)
    hook = blend_hook(scheduler, scheduler.timesteps, original, noise, mask)
    last = len(scheduler.timesteps) - 1  # the last step blends with the clean original
    torch.testing.assert_close(hook(last, scheduler.timesteps[last], latents), 0.75 * original + 0.25 * latents)


def _final_latents(engine, run_spec, image: Path, mask: Path, monkeypatch) -> torch.Tensor:
    """The 4-channel blend's final latents (what the VAE decodes) for one image, inside a session of run_spec."""
    decoded = []
    real = vae_mod.decode
    monkeypatch.setattr(vae_mod, "decode", lambda vae, latents, *rest: decoded.append(latents) or real(vae, latents,
                                                                                                      *rest))
    job = dataclasses.replace(plan(run_spec, [PromptLine("a door", "", "test")], base_seed=0)[0], seed=7,
                              init_image=str(image), mask_image=str(mask), strength=1.0)
    with engine.session(run_spec):
        engine.run_batch(Batch(BatchKey.of(job), (job,)))
    monkeypatch.setattr(vae_mod, "decode", real)
    return decoded[0]


def test_grey_mask_repaints_partly_and_mask_threshold_restores_binarization(sd1_single_file, tmp_path,
                                                                           monkeypatch) -> None:
    """A uniform 25% grey mask: soft keeps 3/4 of the original, threshold 0.5 keeps it all, 0.2 repaints it all."""
    image = init_images(tmp_path, [5])[0]
    mask = _mask(tmp_path / "grey.png", 64)  # 64/255 ≈ 0.25
    base = spec(sd1_single_file, sampler="euler", steps=4)
    engine = get_engine(base.model, base.perf)
    original = img2img.encode(engine.bundle.vae, img2img.load_pixels([str(image)], SIZE, SIZE),
                              [torch.Generator().manual_seed(7)]).float()
    distance = {}
    for threshold in (None, 0.5, 0.2):
        run_spec = dataclasses.replace(base, inpaint=InpaintConfig(mask_threshold=threshold))
        final = _final_latents(engine, run_spec, image, mask, monkeypatch)
        distance[threshold] = (final - original).abs().mean().item()
    assert distance[0.5] < 1e-5  # binarized to 0: the original everywhere, as before
    assert 0.05 < distance[None] < distance[0.2] / 2  # soft: a quarter of the way to the full repaint


def test_binary_masks_give_the_same_images_soft_or_binarized(sd1_single_file, tmp_path) -> None:
    """Pure black/white masks, at the image's size or resized: the default (soft) keeps the old images, which
    match diffusers' (tests/test_inpaint.py)."""
    images = init_images(tmp_path, [1, 2])
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[SIZE // 4 : 3 * SIZE // 4, 12:44] = 255  # edges off the 8-pixel latent grid
    small = np.zeros((40, 40), np.uint8)
    small[10:30, 7:27] = 255  # resized to 64: LANCZOS makes grey edges and ringing
    masks = [_mask(tmp_path / "square.png", square), _mask(tmp_path / "small.png", small)]
    for mask in masks:
        written = {}
        for threshold in (None, 0.5):
            run_spec = spec(sd1_single_file, steps=3, init_image=str(images[0]), mask_image=str(mask), strength=1.0,
                            seed=5, prompt="x", inpaint=InpaintConfig(mask_threshold=threshold))
            result = run(run_spec, tmp_path / f"out-{mask.stem}-{threshold}")
            written[threshold] = np.asarray(Image.open(result.written[0]).convert("RGB"))
        assert np.array_equal(written[None], written[0.5]), mask.name


def test_nine_channel_unet_gets_a_binarized_mask(sd1_components, tmp_path) -> None:
    vae = sd1_components[1]
    image = init_images(tmp_path, [3])[0]
    mask = _mask(tmp_path / "grey.png", 191)  # 0.75

    def mask_channel(threshold):
        scheduler = make_scheduler("ddim", "default", False)
        scheduler.set_timesteps(4)
        begun = start(vae, scheduler, 9, [str(image)], [str(mask)], [torch.Generator().manual_seed(1)], 4, 1.0,
                      SIZE, SIZE, threshold)
        return begun.unet_input[:, :1]

    assert mask_channel(None).unique().tolist() == [1.0]  # soft → binarized at 0.5 for the 9-channel input
    assert mask_channel(0.8).unique().tolist() == [0.0]


def test_soft_paste_mixes_the_original_by_the_mask(tmp_path) -> None:
    image = init_images(tmp_path, [4])[0]
    mask = _mask(tmp_path / "grey.png", 128)
    made = Image.new("RGB", (SIZE, SIZE), (255, 0, 128))
    original = np.asarray(Image.open(image).convert("RGB")).astype(float)
    soft = np.asarray(paste_original(made, str(image), str(mask))).astype(float)
    expected = (np.asarray(made).astype(float) * 128 + original * 127) / 255
    assert np.abs(soft - expected).max() <= 1
    hard = np.asarray(paste_original(made, str(image), str(mask), 0.5))
    assert np.array_equal(hard, np.asarray(made))

"""Inpainting: 9-channel parity and 4-channel blend parity with diffusers' StableDiffusionInpaintPipeline,
unmasked pixels kept, masks planned with the init images, keep_original paste."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from engine_helpers import SIZE, init_images, max_diff, pipeline, spec
from PIL import Image

from sdbatch.cli.runner import run
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.features import img2img
from sdbatch.engine.features.inpaint import paste_original
from sdbatch.engine.models.export import save_single_file
from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.engine.vae import decode as vae_mod
from sdbatch.errors import ConfigError
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.png_info import read_png_params
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [11, 12345]
STEPS = 8


@pytest.fixture(scope="module")
def sd1_inpaint_components():
    return build_tiny_components("sd1", 0, unet={"in_channels": 9})


@pytest.fixture(scope="module")
def sd1_inpaint_file(tmp_path_factory, sd1_inpaint_components) -> Path:
    path = tmp_path_factory.mktemp("inpaint") / "tiny-sd1-inpainting.safetensors"
    return save_single_file(path, *sd1_inpaint_components, "sd1")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return init_images(tmp_path_factory.mktemp("init"), [1, 2])


def make_masks(folder: Path, size: tuple[int, int] = (SIZE, SIZE)) -> list[Path]:
    """Two masks: the right half, and a centred square (white = repaint)."""
    w, h = size
    right, square = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    right[:, w // 2 :] = 255
    square[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    paths = [folder / "mask-1.png", folder / "mask-2.png"]
    for path, array in zip(paths, [right, square], strict=True):
        Image.fromarray(array, mode="L").save(path)
    return paths


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return make_masks(tmp_path_factory.mktemp("masks"))


def ours_inpaint(run_spec, images, masks, strength) -> list[np.ndarray]:
    lines = [PromptLine(p, "blurry", "test") for p in PROMPTS]
    jobs = [dataclasses.replace(job, seed=seed, init_image=str(image), mask_image=str(mask), strength=strength)
            for job, seed, image, mask in zip(plan(run_spec, lines, base_seed=0), SEEDS, images, masks, strict=True)]
    engine = get_engine(run_spec.model, run_spec.perf)
    return [np.asarray(im) for im in engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))]


def reference_inpaint(components, tmp, sampler, images, masks, strength) -> list[np.ndarray]:
    parts = pipeline(components, tmp, "sd1", sampler, v_pred=False).components
    pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    out = pipe(PROMPTS, image=[Image.open(p).convert("RGB") for p in images],
               mask_image=[Image.open(m) for m in masks], strength=strength, negative_prompt=["blurry"] * 2,
               num_inference_steps=STEPS, guidance_scale=7.5, generator=gens, height=SIZE, width=SIZE,
               output_type="pil")
    return [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmsolver++"])
def test_nine_channel_inpainting_parity_with_diffusers(sampler, strength, sd1_inpaint_components, sd1_inpaint_file,
                                                       images, masks, tmp_path) -> None:
    expected = reference_inpaint(sd1_inpaint_components, tmp_path, sampler, images, masks, strength)
    got = ours_inpaint(spec(sd1_inpaint_file, sampler=sampler, steps=STEPS), images, masks, strength)
    assert max_diff(got, expected) <= 1


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmsolver++"])
def test_blend_inpainting_parity_with_diffusers_legacy_path(sampler, strength, sd1_components, sd1_single_file,
                                                            images, masks, tmp_path) -> None:
    expected = reference_inpaint(sd1_components, tmp_path, sampler, images, masks, strength)
    got = ours_inpaint(spec(sd1_single_file, sampler=sampler, steps=STEPS), images, masks, strength)
    assert max_diff(got, expected) <= 1


def test_blend_keeps_unmasked_latents_and_changes_masked_ones(sd1_single_file, images, masks,
                                                              monkeypatch) -> None:
    """The tiny VAE's decoder attends over the whole image, so the exact check is on the final latents."""
    decoded = []

    def capture(vae_module, latents, *options):
        decoded.append(latents.clone())
        return real_decode(vae_module, latents, *options)

    real_decode = vae_mod.decode
    monkeypatch.setattr(vae_mod, "decode", capture)
    run_spec = spec(sd1_single_file, sampler="euler", steps=STEPS)
    got = ours_inpaint(run_spec, images, [masks[0]] * 2, 1.0)
    engine = get_engine(run_spec.model, run_spec.perf)
    pixels = img2img.load_pixels([str(p) for p in images], SIZE, SIZE)
    original = img2img.encode(engine.bundle.vae, pixels, [torch.Generator().manual_seed(s) for s in SEEDS])
    half = SIZE // 16  # latent columns
    final = decoded[0]
    assert torch.allclose(final[..., :half], original[..., :half], atol=1e-5)  # unmasked: the original latents
    assert (final[..., half:] - original[..., half:]).abs().mean() > 0.1  # masked: redrawn
    trip = [np.asarray(im).astype(int) for im in real_decode(engine.bundle.vae, original, 0)]
    for image, round_trip in zip(got, trip, strict=True):  # pixels: closer to decode(encode(original)) outside
        diff = np.abs(image.astype(int) - round_trip)
        assert diff[:, : SIZE // 2 - 8].mean() < diff[:, SIZE // 2 :].mean()
    pasted = [np.asarray(paste_original(Image.fromarray(im), str(p), str(masks[0])))
              for im, p in zip(got, images, strict=True)]
    for image, path, raw in zip(pasted, images, got, strict=True):  # keep_original: exactly the original outside
        assert np.array_equal(image[:, : SIZE // 2], np.asarray(Image.open(path).convert("RGB"))[:, : SIZE // 2])
        assert np.array_equal(image[:, SIZE // 2 :], raw[:, SIZE // 2 :])


def test_run_pairs_masks_with_init_images_and_keeps_the_original(sd1_single_file, images, masks, tmp_path) -> None:
    folder = tmp_path / "init"
    folder.mkdir()
    for i, path in enumerate(images, start=1):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    run_spec = spec(sd1_single_file, steps=4, init_image=str(folder), mask_image=str(masks[0].parent),
                    strength=1.0, seed=5, prompt="x")
    result = run(run_spec, tmp_path / "out")
    assert len(result.written) == 2
    for written, init, mask in zip(result.written, sorted(folder.iterdir()), masks, strict=True):
        assert read_png_params(written)["sdbatch"]["mask_image"] == str(mask)
        keep = np.asarray(Image.open(mask)) < 128
        assert np.array_equal(np.asarray(Image.open(written).convert("RGB"))[keep],
                              np.asarray(Image.open(init).convert("RGB"))[keep])


def test_mask_without_init_image_and_unreadable_mask(sd1_single_file, images, tmp_path, caplog) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ConfigError, match="mask_image"):
        run(spec(sd1_single_file, init_image=str(images[0]), mask_image=str(bad), seed=1), tmp_path / "a")
    wide = tmp_path / "wide.png"
    Image.new("L", (128, 64), 255).save(wide)
    lines = [PromptLine("x", "", "test", init_image=str(images[0]), mask_image=str(wide))]
    with caplog.at_level(logging.WARNING):
        jobs = plan(spec(sd1_single_file), lines, 0)
    assert jobs[0].mask_image == str(wide) and "wide.png" in caplog.text and images[0].name in caplog.text


def test_inpainting_checkpoint_without_mask_is_a_config_error(sd1_inpaint_file) -> None:
    run_spec = spec(sd1_inpaint_file, steps=2)
    jobs = tuple(plan(run_spec, [PromptLine("x", "", "test")], base_seed=0))
    with pytest.raises(ConfigError, match="inpainting checkpoint"):
        get_engine(run_spec.model, run_spec.perf).run_batch(Batch(BatchKey.of(jobs[0]), jobs))

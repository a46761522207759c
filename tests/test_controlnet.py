"""ControlNet in the engine: pixel parity with diffusers' (multi-)ControlNet pipeline, formats, weight 0,
alternation, batching with different hints, and the features it combines with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_files import tiny_controlnet, write_all_formats
from diffusers import StableDiffusionControlNetPipeline
from engine_helpers import SIZE, max_diff, pipeline, spec
from PIL import Image, ImageDraw
from test_parity import assert_same_image

from sdbatch.config.guidance_schema import GuidanceConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.features import controlnet as controlnet_feature
from sdbatch.engine.guide.hints import hint_image
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

torch.set_num_threads(1)

PROMPTS = ["a lighthouse at dusk", "a red cube on a table"]
SEEDS = [11, 12345]
STEPS = 6


def _guide(path: Path, seed: int) -> Path:
    """A guide image with shapes: a white square and a circle at seeded places, on black."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    x, y = rng.integers(4, 28, size=2)
    draw.rectangle([int(x), int(y), int(x) + 24, int(y) + 24], fill=(255, 255, 255))
    cx, cy = rng.integers(16, 48, size=2)
    draw.ellipse([int(cx) - 10, int(cy) - 10, int(cx) + 10, int(cy) + 10], outline=(200, 120, 40), width=3)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def nets(sd1_components, tmp_path_factory):
    """Two tiny ControlNets for the SD1 tiny model, each in every format, and four guide images."""
    folder = tmp_path_factory.mktemp("controlnets")
    unet = sd1_components[0]
    a, b = tiny_controlnet(unet, seed=1), tiny_controlnet(unet, seed=2)
    guides = [_guide(folder / f"guide{i}.png", i) for i in range(4)]
    return {"a": a, "b": b, "a_files": write_all_formats(a, unet, folder / "a"),
            "b_files": write_all_formats(b, unet, folder / "b"), "guides": guides}


def cn_spec(checkpoint, models: list, sampler: str = "ddim", steps: int = STEPS, **guidance):
    cfg = GuidanceConfig(name="controlnet", models=[str(m) for m in models], guide_image="unused", **guidance)
    return spec(checkpoint, sampler=sampler, steps=steps, guidance=cfg)


def ours(run_spec, guides: list[tuple], prompts=PROMPTS, seeds=SEEDS, negative="blurry") -> list[np.ndarray]:
    """sdbatch's images for (prompt, seed, guide images) triples, all in one batch."""
    lines = [PromptLine(p, negative, "test") for p in prompts]
    jobs = [dataclasses.replace(job, seed=seed, guide_images=tuple(str(g) for g in guide))
            for job, seed, guide in zip(plan(run_spec, lines, base_seed=0), seeds, guides, strict=True)]
    engine = get_engine(run_spec.model, run_spec.perf)
    return [np.asarray(im) for im in engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))]


def reference(components, tmp: Path, nets: list, guides: list[tuple], sampler: str = "ddim", prompts=PROMPTS,
              seeds=SEEDS, **kwargs) -> list[np.ndarray]:
    """diffusers' StableDiffusionControlNetPipeline (a MultiControlNetModel for several nets) on the same weights;
    the hints are the preprocessed guide images at the generation size, as sdbatch makes them."""
    base = pipeline(components, tmp, "sd1", sampler, v_pred=False)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=nets if len(nets) > 1 else nets[0])
    pipe.set_progress_bar_config(disable=True)
    preps = kwargs.pop("preps", ["none"] * len(nets))
    hints = [[_hint(g[i], preps[i]) for g in guides] for i in range(len(nets))]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompts, image=hints if len(nets) > 1 else hints[0], negative_prompt=["blurry"] * len(prompts),
               num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, generator=gens,
               output_type="pil", **kwargs)
    return [np.asarray(im) for im in out.images]


def _hint(path: Path, prep: str) -> Image.Image:
    from sdbatch.config.guidance_schema import parse_preprocess

    return hint_image(str(path), parse_preprocess(prep, "test"), SIZE, SIZE, "test")


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a"])
def test_one_controlnet_parity_with_diffusers(sampler, nets, sd1_components, sd1_single_file, tmp_path) -> None:
    guides = [(nets["guides"][0],), (nets["guides"][1],)]
    expected = reference(sd1_components, tmp_path, [nets["a"]], guides, sampler)
    got = ours(cn_spec(sd1_single_file, [nets["a_files"]["original"]], sampler), guides)
    assert max_diff(got, expected) <= 1
    plain = ours(spec(sd1_single_file, sampler=sampler, steps=STEPS), [(), ()])
    assert max_diff(got, plain) > 8  # the ControlNet really acts


def test_two_controlnets_summed_parity_with_multi_controlnet(nets, sd1_components, sd1_single_file,
                                                              tmp_path) -> None:
    guides = [(nets["guides"][0], nets["guides"][2]), (nets["guides"][1], nets["guides"][3])]
    expected = reference(sd1_components, tmp_path, [nets["a"], nets["b"]], guides,
                         controlnet_conditioning_scale=[0.8, 0.6])
    got = ours(cn_spec(sd1_single_file, [nets["a_files"]["original"], nets["b_files"]["original"]],
                       weights=[0.8, 0.6]), guides)
    assert max_diff(got, expected) <= 1


def test_start_and_ratio_parity_with_control_guidance_start_end(nets, sd1_components, sd1_single_file,
                                                                tmp_path) -> None:
    guides = [(nets["guides"][0], nets["guides"][2]), (nets["guides"][1], nets["guides"][3])]
    expected = reference(sd1_components, tmp_path, [nets["a"], nets["b"]], guides,
                         control_guidance_start=[0.0, 0.3], control_guidance_end=[0.5, 1.0])
    got = ours(cn_spec(sd1_single_file, [nets["a_files"]["original"], nets["b_files"]["original"]],
                       start=[0.0, 0.3], ratios=[0.5, 1.0]), guides)
    assert max_diff(got, expected) <= 1


def test_guess_mode_parity(nets, sd1_components, sd1_single_file, tmp_path) -> None:
    guides = [(nets["guides"][0],), (nets["guides"][1],)]
    expected = reference(sd1_components, tmp_path, [nets["a"]], guides, guess_mode=True)
    got = ours(cn_spec(sd1_single_file, [nets["a_files"]["original"]], guess_mode=True), guides)
    assert max_diff(got, expected) <= 1
    assert max_diff(got, ours(cn_spec(sd1_single_file, [nets["a_files"]["original"]]), guides)) > 0


def test_canny_preprocess_parity(nets, sd1_components, sd1_single_file, tmp_path) -> None:
    guides = [(nets["guides"][0],), (nets["guides"][1],)]
    expected = reference(sd1_components, tmp_path, [nets["a"]], guides, preps=["canny"])
    got = ours(cn_spec(sd1_single_file, [nets["a_files"]["original"]], preprocess=["canny"]), guides)
    assert max_diff(got, expected) <= 1


# ---------------------------------------------------------------- formats, neutral, order


def test_the_three_formats_give_the_same_image(nets, sd1_single_file) -> None:
    guides = [(nets["guides"][0],), (nets["guides"][1],)]
    images = {kind: ours(cn_spec(sd1_single_file, [nets["a_files"][kind]]), guides)
              for kind in ("original", "original_pth", "difference", "diffusers")}
    for kind, got in images.items():
        assert max_diff(got, images["original"]) <= 1, kind


def test_weight_zero_equals_no_controlnet_exactly(nets, sd1_single_file) -> None:
    guides = [(nets["guides"][0],), (nets["guides"][1],)]
    got = ours(cn_spec(sd1_single_file, [nets["a_files"]["original"]], weights=[0.0]), guides)
    plain = ours(spec(sd1_single_file, steps=STEPS), [(), ()])
    assert max_diff(got, plain) == 0


def test_alternate_uses_model_step_mod_count(nets, sd1_single_file, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    real = controlnet_feature._residuals

    def spy(unit, x, t, cond, call, guess):
        calls.append((cond.step, id(unit.net)))
        return real(unit, x, t, cond, call, guess)

    monkeypatch.setattr(controlnet_feature, "_residuals", spy)
    run_spec = cn_spec(sd1_single_file, [nets["a_files"]["original"], nets["b_files"]["original"]],
                       combine="alternate")
    ours(run_spec, [(nets["guides"][0], nets["guides"][2]), (nets["guides"][1], nets["guides"][3])])
    assert [step for step, _ in calls] == list(range(STEPS))  # one model per step
    ids = [net for _, net in calls]
    assert ids[0::2] == [ids[0]] * len(ids[0::2]) and ids[1::2] == [ids[1]] * len(ids[1::2]) and ids[0] != ids[1]


def test_a_batch_with_four_guide_images_equals_the_images_alone(nets, sd1_single_file) -> None:
    run_spec = cn_spec(sd1_single_file, [nets["a_files"]["original"]], sampler="euler_a")
    prompts, seeds = ["a cat", "a dog BREAK on grass", "a tree", "a house"], [1, 2, 3, 4]
    guides = [(g,) for g in nets["guides"]]
    together = ours(run_spec, guides, prompts, seeds)
    for i in range(4):
        alone = ours(run_spec, [guides[i]], [prompts[i]], [seeds[i]])
        assert_same_image(together[i], alone[0])


def test_sd2_v_prediction_controlnet_parity_with_diffusers(sd2_components, sd2_single_file, nets, tmp_path) -> None:
    """An SD2 ControlNet (linear projections, 1024-wide context) on the SD2 model, v-prediction."""
    net = tiny_controlnet(sd2_components[0], seed=3)
    files = write_all_formats(net, sd2_components[0], tmp_path / "sd2")
    guides = [(nets["guides"][0],), (nets["guides"][1],)]
    base = pipeline(sd2_components, tmp_path, "sd2", "euler", v_pred=True)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    out = pipe(PROMPTS, image=[_hint(g[0], "none") for g in guides], negative_prompt=["blurry"] * 2,
               num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, generator=gens,
               output_type="pil")
    run_spec = dataclasses.replace(spec(sd2_single_file, sampler="euler", steps=STEPS, family="sd2", v_pred=True),
                                   guidance=GuidanceConfig(name="controlnet", models=[str(files["difference"])],
                                                           guide_image="unused"))
    assert max_diff(ours(run_spec, guides), [np.asarray(im) for im in out.images]) <= 1

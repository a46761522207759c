"""Shared helpers for engine tests: run sdbatch in-process and run the matching diffusers pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer

from sdbatch.cli.runner import run
from sdbatch.config.spec import (
    GuidanceConfig,
    HighresConfig,
    ModelConfig,
    NetworkConfig,
    RunSpec,
    SamplerConfig,
)
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.text.tokenizer import write_hf_tokenizer_files
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

SIZE = 64  # pixels; latents 8×8 keep the tiny models fast on one CPU thread


def spec(checkpoint: str | Path, *, sampler: str = "ddim", steps: int = 6, cfg: float = 7.5, family: str = "sd1",
         v_pred: bool = False, **top) -> RunSpec:
    model = ModelConfig(checkpoint=str(checkpoint), v2="true" if family == "sd2" else "false",
                        v_parameterization="true" if v_pred else "false", precision="fp32")
    sampler_cfg = SamplerConfig(name=sampler, steps=steps, cfg_scale=cfg)
    base = RunSpec(model=model, sampler=sampler_cfg, network=NetworkConfig(), guidance=GuidanceConfig(),
                   highres=HighresConfig(), prompt="x", width=SIZE, height=SIZE)
    return dataclasses.replace(base, **top)


def ours(run_spec: RunSpec, prompts: list[str], seeds: list[int], negative: str = "") -> list[np.ndarray]:
    """Images from sdbatch's engine for one (prompt, seed) pair each, in one batch."""
    lines = [PromptLine(p, negative, "test") for p in prompts]
    jobs = [dataclasses.replace(job, seed=seed) for job, seed in
            zip(plan(run_spec, lines, base_seed=0), seeds, strict=True)]
    engine = get_engine(run_spec.model, run_spec.perf)
    images = engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))
    return [np.asarray(im) for im in images]


def pipeline(components: tuple, tmp: Path, family: str, sampler: str, v_pred: bool) -> StableDiffusionPipeline:
    """diffusers' own StableDiffusionPipeline on the same weights and scheduler configuration."""
    unet, vae, text_encoder = components
    pad = "!" if family == "sd2" else "<|endoftext|>"
    tokenizer = CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(tmp / f"tok-{family}", pad))
    scheduler = make_scheduler(sampler, "default", v_pred)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def reference(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, cfg: float,
              negative: str = "") -> list[np.ndarray]:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompts, negative_prompt=[negative] * len(prompts), num_inference_steps=steps, guidance_scale=cfg,
               height=SIZE, width=SIZE, generator=gens, output_type="pil")
    return [np.asarray(im) for im in out.images]


def run_images(run_spec: RunSpec, run_dir: Path) -> tuple[list[np.ndarray], list[dict]]:
    """Run sdbatch in-process into run_dir: its images and manifest lines, in image (index) order."""
    run(run_spec, run_dir)
    lines = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]
    lines.sort(key=lambda line: line["index"])
    return [pixels(run_dir / line["file"]) for line in lines], lines


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def halves(path: Path, left: tuple[int, ...], right: tuple[int, ...], size: int = SIZE) -> str:
    """A size×size region mask whose left half has colour `left` and right half colour `right`."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2], pixels[:, size // 2 :] = left, right
    Image.fromarray(pixels).save(path)
    return str(path)


def init_images(folder: Path, seeds: list[int], size: tuple[int, int] = (SIZE, SIZE)) -> list[Path]:
    """Distinct RGB init images (a seeded gradient plus noise) saved as PNG files in folder."""
    paths = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        w, h = size
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 255, 3) + np.linspace(0, 1, h)[:, None, None] * 60
        pixels = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"init-{seed}-{w}x{h}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def ours_img2img(run_spec: RunSpec, prompts: list[str], seeds: list[int], images: list[Path], strength: float,
                 negative: str = "") -> list[np.ndarray]:
    """Images from sdbatch's engine for one (prompt, seed, init image) each, in one batch."""
    lines = [PromptLine(p, negative, "test") for p in prompts]
    jobs = [dataclasses.replace(job, seed=seed, init_image=str(image), strength=strength)
            for job, seed, image in zip(plan(run_spec, lines, base_seed=0), seeds, images, strict=True)]
    engine = get_engine(run_spec.model, run_spec.perf)
    return [np.asarray(im) for im in engine.run_batch(Batch(BatchKey.of(jobs[0]), tuple(jobs)))]


def img2img_pipeline(components: tuple, tmp: Path, family: str, sampler: str,
                     v_pred: bool) -> StableDiffusionImg2ImgPipeline:
    """diffusers' own StableDiffusionImg2ImgPipeline on the same weights and scheduler configuration."""
    parts = pipeline(components, tmp, family, sampler, v_pred).components
    return StableDiffusionImg2ImgPipeline(**parts, requires_safety_checker=False)


def img2img_reference(pipe: StableDiffusionImg2ImgPipeline, prompts: list[str], seeds: list[int],
                      images: list[Path], strength: float, steps: int, cfg: float,
                      negative: str = "") -> list[np.ndarray]:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompts, image=[Image.open(p).convert("RGB") for p in images], strength=strength,
               negative_prompt=[negative] * len(prompts), num_inference_steps=steps, guidance_scale=cfg,
               generator=gens, output_type="pil")
    return [np.asarray(im) for im in out.images]


def distinct_samplers() -> list[str]:
    """One sampler name per distinct scheduler configuration (aliases such as k_euler add nothing)."""
    from sdbatch.config.sampler_registry import SAMPLERS

    seen, names = set(), []
    for name, entry in SAMPLERS.items():
        key = (entry.scheduler, tuple(sorted(entry.options.items())), entry.default_schedule)
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names

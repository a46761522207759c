"""Highres. fix on one batch: stage-1 txt2img at the small size, upscale, stage-2 img2img at the final size.

Stage 1 is a plain txt2img batch (the same images a run at the small size with highres.steps makes). Stage 2
is img2img with highres.strength and sampler.steps, its randomness from a fresh generator of each image's own
seed: in pixel mode it equals an img2img run on the stage-1 image with the same seed. Both stages run over the
whole batch; a ControlNet guides both (its hint at each stage's size) unless highres.disable_controlnet. The
upscale is LANCZOS on the decoded images, interpolation of the latents (latent_upscale, latent_mode), or the
highres.upscaler plug-in: `f(images, (width, height)) → images` on PIL images, or
`f(latents, (height // 8, width // 8)) → latents` on a (B, 4, h, w) tensor in latent mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdbatch.config.highres_schema import HighresConfig, first_stage_size, load_upscaler
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import Decoded, Feature, PassWrapper, RunPass, StageImage, StartFn
from sdbatch.engine.features import img2img
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.jobs import ImageJob


def first_stage_job(job: ImageJob) -> ImageJob:
    """The plain txt2img job stage 1 runs: the small size, highres.steps, named NAME-first.png."""
    cfg = job.features["highres"]
    width, height = first_stage_size(job.width, job.height, cfg.scale)
    stem, _, ext = job.file_name.rpartition(".")
    return dataclasses.replace(job, width=width, height=height, steps=cfg.steps,
                               features=job.features.replace(highres=None), file_name=f"{stem}-first.{ext}")


def _second_stage(job: ImageJob, cfg: HighresConfig):
    """Stage 2's features: no Highres. fix, and no ControlNet with highres.disable_controlnet."""
    if cfg.disable_controlnet:
        return job.features.replace(highres=None, guidance=None)
    return job.features.replace(highres=None)


class HighresFix(Feature):
    """A post-decode step: the batch's first pass is stage 1, then stage 2 runs from its upscaled result."""

    name = "highres"

    def around_pass(self, engine, key: BatchKey, run: RunSpec | None) -> PassWrapper | None:
        cfg: HighresConfig | None = key.features.get(self.name)
        if cfg is None:
            return None

        def two_stages(batch: Batch, run_pass: RunPass) -> Decoded:
            small = tuple(first_stage_job(job) for job in batch.jobs)
            first = run_pass(Batch(BatchKey.of(small[0]), small))
            final_jobs = tuple(dataclasses.replace(job, features=_second_stage(job, cfg), strength=cfg.strength)
                               for job in batch.jobs)
            final_key = BatchKey.of(final_jobs[0])
            plugin = load_upscaler(cfg.upscaler) if cfg.upscaler else None
            if cfg.latent_upscale:
                start = _latent_start(engine, first.latents, cfg, final_key, plugin)
            else:
                start = _pixel_start(engine, first.images, cfg, final_key, plugin)
            final = run_pass(Batch(final_key, final_jobs), start)
            stages = tuple(StageImage(job, image, {"stage": 1}, save=cfg.save_first_stage)
                           for job, image in zip(small, first.images, strict=True))
            return Decoded(final.latents, final.images, first.stages + stages + final.stages)

        return two_stages


def _pixel_start(engine, first: list[Image.Image], cfg: HighresConfig, key: BatchKey,
                 plugin: Callable | None) -> StartFn:
    """Stage-2 start from the decoded stage-1 images, upscaled (LANCZOS or the plug-in) and VAE-encoded."""

    def start(scheduler, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        size = (key.width, key.height)
        images = list(plugin(first, size)) if plugin else [im.resize(size, Image.Resampling.LANCZOS) for im in first]
        pixels = VaeImageProcessor(vae_scale_factor=engine.latent_factor).preprocess(
            images, height=key.height, width=key.width)
        return img2img.start_from_pixels(engine.bundle.vae, scheduler, pixels, gens, key.steps, cfg.strength)

    return start


def _latent_start(engine, latents: torch.Tensor, cfg: HighresConfig, key: BatchKey,
                  plugin: Callable | None) -> StartFn:
    """Stage-2 start from the stage-1 latents, interpolated (bilinear/bicubic or the plug-in), then noised."""

    def start(scheduler, gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        size = (key.height // engine.latent_factor, key.width // engine.latent_factor)
        if plugin:
            upscaled = plugin(latents, size)
        else:
            upscaled = torch.nn.functional.interpolate(latents.float(), size=size, mode=cfg.latent_mode)
        timesteps = img2img.shorten_schedule(scheduler, key.steps, cfg.strength)
        return timesteps, img2img.add_start_noise(scheduler, timesteps, upscaled.float(), gens)

    return start


FEATURE = HighresFix()

"""img2img start: init images → VAE posterior samples → noised to the first timestep of a strength-shortened schedule.

Follows diffusers' StableDiffusionImg2ImgPipeline (`get_timesteps`, `prepare_latents`) draw for draw, so its images
match diffusers'. Each image's randomness (posterior sample, then start noise, then sampler noise) comes from its own
CPU generator, so an image is the same alone or in any batch. Where diffusers' shortened schedule puts the sampler
at a different noise level than the latents (PNDM's PRK warm-up, LMS's multistep order: see `_RESTARTS`), the
scheduler instead restarts on the tail of its own schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, UnidentifiedImageError

from sdbatch.engine.core import noise
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature, Start
from sdbatch.errors import ConfigError


def denoise_steps(steps: int, strength: float | None) -> int:
    """Steps img2img denoises: diffusers' get_timesteps `min(int(steps * strength), steps)`; ConfigError below 1."""
    if strength is None or not 0 < strength <= 1:
        raise ConfigError(f"strength must be in (0, 1] for img2img, got {strength} <strength>")
    count = min(int(steps * strength), steps)
    if count < 1:
        raise ConfigError(f"strength {strength} × sampler.steps {steps} leaves no denoising step "
                          f"(int({steps} × {strength}) = 0); raise strength or sampler.steps <strength, sampler.steps>")
    return count


def shorten_schedule(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps to denoise over, after set_timesteps(steps): diffusers' get_timesteps + set_begin_index."""
    t_start = steps - denoise_steps(steps, strength)
    restart = _RESTARTS.get(type(scheduler).__name__)
    if restart is not None:
        restart(scheduler, t_start)
        return scheduler.timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


def _restart_pndm(scheduler, t_start: int) -> None:
    """PNDM on the tail: diffusers' PNDMScheduler.set_timesteps PRK/PLMS construction on `_timesteps` less t_start.

    step_prk reads its timestep from `prk_timesteps[counter // 4 * 4]`, not from the timestep passed in, so
    slicing `timesteps` (as diffusers' get_timesteps does) runs the first Runge-Kutta steps at the noise level
    of the full schedule's start, far above the latents' level.
    """
    tail = scheduler._timesteps[: len(scheduler._timesteps) - t_start]  # ascending, spacing of the full schedule
    if scheduler.config.skip_prk_steps:
        prk = np.array([])
        plms = np.concatenate([tail[:-1], tail[-2:-1], tail[-1:]])[::-1].copy()
    elif len(tail) < scheduler.pndm_order:  # diffusers' construction needs as many (set_timesteps(3) fails too)
        raise ConfigError(f"sampler pndm needs at least {scheduler.pndm_order} denoising steps; int(strength × "
                          f"sampler.steps) is {len(tail)}: raise strength or sampler.steps <strength, sampler.steps>")
    else:
        half = scheduler.config.num_train_timesteps // scheduler.num_inference_steps // 2
        prk = np.array(tail[-scheduler.pndm_order :]).repeat(2) + np.tile(np.array([0, half]), scheduler.pndm_order)
        prk = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
        plms = tail[:-3][::-1].copy()
    scheduler.prk_timesteps, scheduler.plms_timesteps = prk, plms
    device = scheduler.timesteps.device
    scheduler.timesteps = torch.from_numpy(np.concatenate([prk, plms]).astype(np.int64)).to(device)


def _restart_lms(scheduler, t_start: int) -> None:
    """LMS on the tail: its sigmas and timesteps from t_start become the whole schedule.

    step() takes the multistep order as `min(step_index + 1, 4)`, so with set_begin_index it would weight one
    derivative with 4th-order coefficients meant for three earlier ones it never saw.
    """
    scheduler.sigmas = scheduler.sigmas[t_start:]
    scheduler.timesteps = scheduler.timesteps[t_start:]
    scheduler.set_begin_index(0)


# Schedulers whose step() depends on the absolute step position, by diffusers class name.
_RESTARTS: dict[str, Callable[[object, int], None]] = {
    "PNDMScheduler": _restart_pndm,
    "LMSDiscreteScheduler": _restart_lms,
}


def load_pixels(paths: Sequence[str], width: int, height: int, scale_factor: int = 8) -> torch.Tensor:
    """Init image files → (B, 3, H, W) in [-1, 1]: RGB, then diffusers' VaeImageProcessor.preprocess (LANCZOS, 2x-1)."""
    images = [open_image(path, "RGB", "init_image") for path in paths]
    return VaeImageProcessor(vae_scale_factor=scale_factor).preprocess(images, height=height, width=width)


def open_image(path: str, mode: str, key: str) -> Image.Image:
    """An input image converted to `mode`; ConfigError naming the config key and file when it is unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as ex:
        raise ConfigError(f"{key} {path} cannot be read: {ex} <{key}>") from None


@torch.no_grad()
def encode(vae: torch.nn.Module, pixels: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """VAE encode per image, posterior sample from its generator, × scaling_factor (diffusers' prepare_latents)."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    # as diffusers' retrieve_latents(vae.encode(image[i:i+1]), generator=generator[i]): one image at a time
    draws = [vae.encode(pixels[i : i + 1]).latent_dist.sample(generator=g) for i, g in enumerate(gens)]
    return vae.config.scaling_factor * torch.cat(draws)


def add_start_noise(scheduler, timesteps: torch.Tensor, init_latents: torch.Tensor,
                    gens: list[torch.Generator]) -> torch.Tensor:
    """scheduler.add_noise at timesteps[0]; noise drawn (fp32, CPU) from each generator after its posterior sample."""
    batch, channels, h, w = init_latents.shape
    start_noise = noise.to_device(noise.initial_noise(gens, channels, h, w), init_latents.device, torch.float32)
    return scheduler.add_noise(init_latents.float(), start_noise, timesteps[:1].repeat(batch))


def start(vae: torch.nn.Module, scheduler, init_images: Sequence[str], gens: list[torch.Generator], steps: int,
          strength: float, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, start latents) of an img2img batch; the scheduler must have had set_timesteps(steps)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    denoise_steps(steps, strength)  # before any work: a bad strength fails fast
    return start_from_pixels(vae, scheduler, load_pixels(init_images, width, height, factor), gens, steps, strength)


def start_from_pixels(vae: torch.nn.Module, scheduler, pixels: torch.Tensor, gens: list[torch.Generator], steps: int,
                      strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, start latents) from (B, 3, H, W) pixels in [-1, 1] (Highres. fix's stage 2 comes here)."""
    timesteps = shorten_schedule(scheduler, steps, strength)
    latents = add_start_noise(scheduler, timesteps, encode(vae, pixels, gens), gens)
    return timesteps, latents


class ImageToImage(Feature):
    """init_image without a mask: the start latents from the init images, on a strength-shortened schedule."""

    name = "img2img"
    order = 10  # a start provider

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        with_init = sum(job.init_image is not None for job in ctx.jobs)
        if 0 < with_init < len(ctx.jobs):  # a batching bug: the batch key keeps them apart
            raise ValueError("a batch mixes img2img and txt2img jobs: they cannot share one schedule")
        if ctx.start_given or not ctx.key.img2img or ctx.key.masked:
            return None
        key, vae = ctx.key, ctx.engine.bundle.vae
        paths = [job.init_image for job in ctx.jobs]

        def begin(_: Start | None) -> Start:
            return Start(*start(vae, ctx.scheduler, paths, ctx.generators, key.steps, key.strength, key.width,
                                key.height))

        return BatchHooks(start=begin)


FEATURE = ImageToImage()

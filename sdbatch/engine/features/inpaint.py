"""Inpainting: masks → the start latents, the 9-channel UNet input or the per-step blend, and the final paste.

Follows diffusers' StableDiffusionInpaintPipeline draw for draw. Each image's generator gives, in order: the
posterior sample of the init image (when strength < 1 or the UNet has 4 input channels), the start noise, then
(9-channel UNets only) the posterior sample of the masked image. Masks are grayscale, white = repaint, resized
to the image with LANCZOS (diffusers' mask processor). inpaint.mask_threshold null (the default) keeps their grey
levels as weights, a number binarizes them at it (0.5 is diffusers' mask processor); a pure black-and-white mask
file is binarized at 0.5 in either case (its only grey pixels would come from the resize), so it gives diffusers'
masks exactly. The latent-size mask samples the full-size one (nearest, as diffusers): grey levels carry through
as weights.

Two modes, chosen from the weights:
- a true inpainting checkpoint (UNet in_channels == 9) gets the latent-size mask and the masked image's
  latents concatenated to its input at every call (`with_inpaint_input`, a UNet-call wrapper). That mask is
  always binarized (at mask_threshold, or 0.5 when soft): these models were trained on binary masks, and the
  masked image (the init image blanked where the mask is 1) must agree with the mask channel;
- an ordinary 4-channel UNet gets the blend: after every scheduler step the latents outside the mask are
  replaced by the original latents noised to the level of the NEXT timestep, i.e. the level the latents are
  at now (`blend_hook`, an after-step hook). The last step blends with the clean latents. With a soft mask
  m in [0, 1] the blend is (1 - m)·original + m·latents: grey areas are partly repainted (the reference, too,
  uses the mask's grey levels as weights).
  diffusers also encodes the masked image here, unused; we skip that VAE call, so with ancestral/SDE samplers
  (whose step noise follows it in the generator) blend mode differs from diffusers' legacy path by design.

After decoding, inpaint.keep_original pastes the original's pixels back outside the mask (a post-decode step),
with the full-size mask as alpha: a soft mask feathers the paste, in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdbatch.config.spec import RunSpec
from sdbatch.engine.core import noise
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Decoded, Feature, PassWrapper, RunPass, Start
from sdbatch.engine.core.denoise_loop import AfterStep
from sdbatch.engine.core.model_fn import Conditioning, ModelFn, ModelWrapper
from sdbatch.engine.features import img2img
from sdbatch.errors import ConfigError
from sdbatch.plan.batching import Batch, BatchKey


@dataclass(frozen=True)
class InpaintStart:
    """What an inpainting batch starts from."""

    timesteps: torch.Tensor
    latents: torch.Tensor  # start latents, at the first timestep's noise level
    unet_input: torch.Tensor | None  # (B, 1 + C, h, w) mask and masked-image latents: 9-channel UNets
    after_step: tuple[AfterStep, ...]  # the blend hook: 4-channel UNets


def load_masks(paths: Sequence[str], width: int, height: int, scale_factor: int = 8,
               threshold: float | None = 0.5) -> torch.Tensor:
    """Mask files → (B, 1, H, W) in [0, 1] (1 = repaint): grayscale, LANCZOS resize, then binarized at `threshold`
    (values >= it become 1, as diffusers' mask processor at 0.5), or kept soft (grey levels) when it is None.

    Soft applies to masks that have grey levels. A pure black-and-white file is binarized at 0.5 even then: its
    only grey pixels would be the resize's blurred edge and LANCZOS ringing, not the user's weights, and this
    keeps such masks exactly as diffusers sees them, at any size.
    """
    processor = VaeImageProcessor(vae_scale_factor=scale_factor, do_normalize=False, do_binarize=False,
                                  do_convert_grayscale=True)
    files = [img2img.open_image(p, "L", "mask_image") for p in paths]
    mask = processor.preprocess(files, height=height, width=width)
    if threshold is not None:
        return binarize(mask, threshold)
    hard = [i for i, image in enumerate(files) if not any(image.convert("L").histogram()[1:255])]
    mask[hard] = binarize(mask[hard], 0.5)
    return mask


def binarize(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where mask >= threshold, else 0 (diffusers' do_binarize at 0.5)."""
    return (mask >= threshold).to(mask.dtype)


def start(vae: torch.nn.Module, scheduler, unet_channels: int, init_images: Sequence[str], masks: Sequence[str],
          gens: list[torch.Generator], steps: int, strength: float, width: int, height: int,
          threshold: float | None = None) -> InpaintStart:
    """The inpainting batch's schedule, start latents and mask conditioning; after set_timesteps(steps).

    `threshold` (inpaint.mask_threshold): None keeps grey masks soft in the 4-channel blend; 9-channel UNets get
    the mask binarized at it, or at 0.5 when None.
    """
    timesteps = img2img.shorten_schedule(scheduler, steps, strength)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = img2img.load_pixels(init_images, width, height, factor)
    mask = load_masks(masks, width, height, factor, threshold)
    full = strength == 1.0  # diffusers' is_strength_max: start from pure noise
    image_latents = img2img.encode(vae, pixels, gens) if unet_channels == 4 or not full else None
    batch, channels = len(gens), vae.config.latent_channels
    drawn = noise.initial_noise(gens, channels, height // factor, width // factor)
    start_noise = noise.to_device(drawn, vae.device, torch.float32)
    if full:
        latents = start_noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents.float(), start_noise, timesteps[:1].repeat(batch))
    latent_size = (height // factor, width // factor)
    if unet_channels == 9:
        hard = binarize(mask, 0.5 if threshold is None else threshold)
        masked = img2img.encode(vae, pixels * (hard < 0.5), gens)
        small = torch.nn.functional.interpolate(hard, size=latent_size).to(vae.device)
        return InpaintStart(timesteps, latents, torch.cat([small, masked.float()], dim=1), ())
    # nearest, as diffusers: a binary mask stays binary; a soft one keeps its grey levels as blend weights
    small = torch.nn.functional.interpolate(mask, size=latent_size).to(vae.device)
    if unet_channels != 4:
        raise ConfigError(f"the UNet takes {unet_channels} input channels; inpainting needs 4 or 9 <model.checkpoint>")
    hook = blend_hook(scheduler, timesteps, image_latents.float(), start_noise, small)
    return InpaintStart(timesteps, latents, None, (hook,))


def blend_hook(scheduler, timesteps: torch.Tensor, image_latents: torch.Tensor, start_noise: torch.Tensor,
               mask: torch.Tensor) -> AfterStep:
    """After step i: keep the latents inside the mask, outside it the original noised to timesteps[i + 1];
    a soft mask m weights them, (1 - m)·original + m·latents."""

    def after_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        proper = image_latents
        if i < len(timesteps) - 1:  # the level the step just reached (diffusers; the reference used t itself)
            proper = scheduler.add_noise(image_latents, start_noise, timesteps[i + 1 : i + 2])
        m = mask.to(latents.dtype)
        return (1 - m) * proper.to(latents.dtype) + m * latents

    return after_step


def with_inpaint_input(extra: torch.Tensor) -> ModelWrapper:
    """9-channel UNets: the mask and masked-image latents `extra` (B, 5, h, w) concatenated to every input."""

    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            rows = extra.to(device=x.device, dtype=x.dtype).repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
            return inner(torch.cat([x, rows], dim=1), t, cond)

        return model

    return wrap


def paste_original(image: Image.Image, init_image: str, mask_image: str,
                   threshold: float | None = None) -> Image.Image:
    """inpaint.keep_original: the original's pixels (resized as the model saw it) wherever the mask is 0; a soft
    mask (threshold None) is the alpha of the paste, so grey areas mix the original and the result."""
    width, height = image.size
    original = img2img.load_pixels([init_image], width, height)  # [-1, 1], LANCZOS, as fed to the VAE
    original = VaeImageProcessor().postprocess(original, output_type="pil")[0]
    mask = load_masks([mask_image], width, height, threshold=threshold)[0, 0]
    alpha = Image.fromarray((mask.numpy() * 255).round().astype("uint8"), mode="L")
    return Image.composite(image.convert("RGB"), original, alpha)


class Inpainting(Feature):
    """mask_image: the start, the 9-channel input or the blend, and the paste of the original after decoding."""

    name = "inpaint"
    order = 10  # a start provider; its UNet wrapper sits outside Deep Shrink's (5)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        key, bundle = ctx.key, ctx.engine.bundle
        if ctx.start_given:
            return None
        if not key.masked:
            if bundle.in_channels != 4:
                raise ConfigError(f"{bundle.model_name} is an inpainting checkpoint ({bundle.in_channels}-"
                                  "channel UNet): give init_image and mask_image <model.checkpoint>")
            return None
        threshold = ctx.run.inpaint.mask_threshold if ctx.run is not None else None
        begun = start(bundle.vae, ctx.scheduler, bundle.in_channels, [j.init_image for j in ctx.jobs],
                      [j.mask_image for j in ctx.jobs], ctx.generators, key.steps, key.strength, key.width, key.height,
                      threshold)
        return BatchHooks(start=lambda _: Start(begun.timesteps, begun.latents),
                          unet=with_inpaint_input(begun.unet_input) if begun.unet_input is not None else None,
                          after_step=begun.after_step[0] if begun.after_step else None)

    def around_pass(self, engine, key: BatchKey, run: RunSpec | None) -> PassWrapper | None:
        if not key.masked or run is None or not run.inpaint.keep_original:
            return None

        def paste(batch: Batch, run_pass: RunPass) -> Decoded:
            done = run_pass(batch)
            images = [paste_original(image, job.init_image, job.mask_image, run.inpaint.mask_threshold)
                      for job, image in zip(batch.jobs, done.images, strict=True)]
            return Decoded(done.latents, images)

        return paste


FEATURE = Inpainting()

"""txt2img: the start latents of a batch without init images, each image's own noise at the first noise level."""

from __future__ import annotations

from sdbatch.engine.core.contract import BatchContext, BatchHooks, Feature, Start


class TextToImage(Feature):
    name = "txt2img"
    order = 10  # a start provider: before the start modifiers (Gradual Latent)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        if ctx.start_given or ctx.key.img2img or ctx.key.masked:
            return None
        key, scheduler = ctx.key, ctx.scheduler

        def start(_: Start | None) -> Start:
            latents = ctx.engine.start_noise(ctx.generators, key.height, key.width, scheduler.init_noise_sigma)
            return Start(scheduler.timesteps, latents)

        return BatchHooks(start=start)


FEATURE = TextToImage()

"""The denoising loop: a diffusers scheduler driving one model function, one callback per step.

Features plug in around the loop, never into it: model wrappers (sdbatch.engine.core.model_fn) change what the
model predicts; `after_step` hooks may replace the latents after each scheduler step — the plug-in point of
inpainting's blend (sdbatch.engine.features.inpaint) and, later, Gradual Latent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from sdbatch.engine.core.model_fn import Conditioning, ModelFn
from sdbatch.engine.core.scheduler_factory import step_kwargs

StepCallback = Callable[[dict], None]
AfterStep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (i, t, latents) → latents


@torch.no_grad()
def sample(
    model: ModelFn,
    scheduler,
    latents: torch.Tensor,  # (B, C, h, w), already scaled to the scheduler's first noise level
    cond: Conditioning,
    generators: list[torch.Generator],
    eta: float = 0.0,
    callback: StepCallback | None = None,
    timesteps: torch.Tensor | None = None,  # default scheduler.timesteps; img2img passes the shortened tail
    after_step: Sequence[AfterStep] = (),  # applied in order after each scheduler step (inpainting's blend)
) -> torch.Tensor:
    """Run the scheduler's timesteps; ancestral/SDE noise comes from each image's own generator."""
    extra = step_kwargs(scheduler, eta, generators)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    # read on the host once per pass: wrappers take cond.timestep instead of making each step wait for the GPU
    host = [float(v) for v in timesteps.tolist()]
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        pred = model(x_in, t, replace(cond, step=i, steps=len(timesteps), timestep=host[i]))
        latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        for hook in after_step:
            latents = hook(i, t, latents)
        if callback is not None:
            callback({"i": i, "t": t, "x": latents, "pred": pred, "total": len(timesteps)})
    return latents

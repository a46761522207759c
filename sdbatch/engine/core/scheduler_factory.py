"""Build a fresh diffusers scheduler for a batch from the sampler registry."""

from __future__ import annotations

import diffusers

from sdbatch.config.sampler_registry import scheduler_options

# Which extra arguments each scheduler's step() takes. Kept as data (checked against diffusers in the
# tests) rather than read with inspect.signature at run time.
STEP_KWARGS: dict[str, tuple[str, ...]] = {
    "DDIMScheduler": ("eta", "generator"),
    "PNDMScheduler": (),
    "LMSDiscreteScheduler": (),
    "EulerDiscreteScheduler": ("generator",),
    "EulerAncestralDiscreteScheduler": ("generator",),
    "HeunDiscreteScheduler": (),
    "KDPM2DiscreteScheduler": (),
    "KDPM2AncestralDiscreteScheduler": ("generator",),
    "DPMSolverMultistepScheduler": ("generator",),
    "DPMSolverSinglestepScheduler": ("generator",),
    "UniPCMultistepScheduler": (),
    "DEISMultistepScheduler": (),
}


def make_scheduler(sampler: str, schedule: str, v_prediction: bool,
                   zero_terminal_snr: bool = False) -> diffusers.SchedulerMixin:
    """A new scheduler instance: diffusers schedulers keep per-run state, so batches never share one."""
    class_name, options = scheduler_options(sampler, schedule, v_prediction, zero_terminal_snr)
    return getattr(diffusers, class_name)(**options)


def step_kwargs(scheduler: diffusers.SchedulerMixin, eta: float, generators: list) -> dict:
    """The step() arguments this scheduler takes: per-image generators for its noise, eta for DDIM."""
    available = {"eta": eta, "generator": generators}
    names = getattr(scheduler, "STEP_KWARGS", None) or STEP_KWARGS[type(scheduler).__name__]  # or a wrapper's
    return {name: available[name] for name in names}

"""The denoising loop reads its timesteps on the host once per pass; wrappers never read a step's t from the device.

float(t) of a GPU tensor makes the host wait for the GPU before it can queue the next step. Here t is a meta
tensor, which cannot be read at all: a wrapper that tried would fail.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sdbatch.config.deep_shrink_schema import DeepShrink
from sdbatch.engine.core.denoise_loop import sample
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.features.deep_shrink import with_deep_shrink


def test_the_loop_gives_each_call_its_timestep_as_a_number():
    scheduler = make_scheduler("ddim", "default", False)
    scheduler.set_timesteps(4)
    seen = []

    def spy(x, t, cond):
        seen.append((cond.timestep, float(t), cond.step))
        return torch.zeros_like(x)

    cond = Conditioning(embeddings=torch.zeros(1, 77, 8))
    sample(spy, scheduler, torch.zeros(1, 4, 8, 8), cond, [torch.Generator().manual_seed(0)])
    assert [(s[0], s[2]) for s in seen] == [(float(t), i) for i, t in enumerate(scheduler.timesteps)]
    assert all(isinstance(s[0], float) for s in seen)


def test_deep_shrink_reads_the_host_timestep(sd1_components):
    unet = sd1_components[0]
    settings = DeepShrink(depth_1=1, timesteps_1=650, depth_2=None, timesteps_2=650, ratio=0.5)
    calls = []

    def inner(x, t, cond):
        calls.append(cond.timestep)
        return x

    model = with_deep_shrink(unet, settings)(inner)
    unreadable = torch.empty((), device="meta")  # float() of it raises, as a sync would cost
    cond = Conditioning(embeddings=torch.zeros(1, 77, 8))
    for timestep in (900.0, 100.0):
        model(torch.zeros(1, 4, 8, 8), unreadable, replace(cond, timestep=timestep))
    assert calls == [900.0, 100.0]

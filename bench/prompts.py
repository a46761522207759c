"""Benchmark the whole-run batcher: 64 prompt lines in 8 sizes, random order, batch 8, vs neighbours-only batching.

The reference tool batches only consecutive lines with equal settings, so a prompt file that mixes sizes
runs mostly in batches of one. sdbatch groups the whole run first. Both orders go through the same engine
here; the script prints images per second for each, the ratio, and checks that no pixel changed.

    python bench/prompts.py                                  # built-in tiny model, CPU (about 2 minutes)
    python bench/prompts.py --checkpoint model.safetensors --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time

import numpy as np
import torch

from sdbatch.config.spec import (
    GuidanceConfig,
    HighresConfig,
    ModelConfig,
    NetworkConfig,
    PerfConfig,
    RunSpec,
    SamplerConfig,
)
from sdbatch.engine.core.engine import Engine, get_engine
from sdbatch.plan.batching import Batch, make_batches, neighbour_batches
from sdbatch.plan.jobs import ImageJob
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

SIZES = [(64, 64), (64, 96), (96, 64), (96, 96), (128, 64), (64, 128), (128, 96), (96, 128)]
SUBJECTS = ["a lighthouse", "a red cube", "a fox in snow", "a city at night", "a bowl of fruit", "a sailing ship",
            "a mountain lake", "an old robot"]


def prompt_lines(count: int, seed: int, scale: int) -> list[PromptLine]:
    """`count` lines cycling through 8 sizes (× scale), shuffled: neighbours rarely share a size."""
    rng = random.Random(seed)
    lines = [f"{SUBJECTS[i % 8]}, study {i} --w {SIZES[i % 8][0] * scale} --h {SIZES[i % 8][1] * scale}"
             for i in range(count)]
    rng.shuffle(lines)
    return [PromptLine(text, "blurry", f"bench:{n}") for n, text in enumerate(lines, start=1)]


def run_spec(args: argparse.Namespace) -> RunSpec:
    model = ModelConfig(checkpoint=args.checkpoint, precision=args.precision, v2="auto", v_parameterization="false")
    return RunSpec(model=model, sampler=SamplerConfig(name="ddim", steps=args.steps), network=NetworkConfig(),
                   guidance=GuidanceConfig(), highres=HighresConfig(), perf=PerfConfig(device=args.device),
                   prompt="unused", seed=args.seed, batch_size=args.batch_size)


def generate(engine: Engine, batches: list[Batch]) -> tuple[float, dict[int, np.ndarray]]:
    """Seconds for all batches (synchronised on CUDA) and each image's pixels by job index."""
    sync = torch.cuda.synchronize if engine.placement.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    images: dict[int, np.ndarray] = {}
    for batch in batches:
        for job, image in zip(batch.jobs, engine.run_batch(batch), strict=True):
            images[job.index] = np.asarray(image)
    sync()
    return time.perf_counter() - start, images


def warm_up(engine: Engine, jobs: list[ImageJob]) -> None:
    """One untimed batch per size, so first-call costs (kernel selection, caches) hit neither side."""
    firsts = {(j.width, j.height): j for j in jobs}
    for job in firsts.values():
        engine.run_batch(Batch(make_batches([job], 1)[0].key, (dataclasses.replace(job, steps=1),)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = run_spec(args)
    jobs = plan(spec, prompt_lines(args.lines, args.seed, args.scale), base_seed=args.seed)
    engine = get_engine(spec.model, spec.perf)
    warm_up(engine, jobs)
    whole, neighbours = make_batches(jobs, args.batch_size), neighbour_batches(jobs, args.batch_size)
    t_neighbours, img_neighbours = generate(engine, neighbours)
    t_whole, img_whole = generate(engine, whole)
    diff = max(int(np.abs(img_whole[i].astype(int) - img_neighbours[i].astype(int)).max()) for i in img_whole)
    print(f"model: {engine.info.name} ({engine.info.family}), device {engine.placement.device} "
          f"({engine.placement.precision}), torch threads {torch.get_num_threads()}")
    print(f"workload: {len(jobs)} images, {len(SIZES)} sizes in random order, {args.steps} DDIM steps, "
          f"CFG 7.5, batch_size {args.batch_size}")
    print("| batching | batches | seconds | images/s |\n|---|---|---|---|")
    print(f"| neighbours only (reference) | {len(neighbours)} | {t_neighbours:.1f} | {len(jobs) / t_neighbours:.2f} |")
    print(f"| whole run (sdbatch) | {len(whole)} | {t_whole:.1f} | {len(jobs) / t_whole:.2f} |")
    print(f"speed-up whole-run / neighbours: {t_neighbours / t_whole:.2f}x (target >= 1.5)")
    print(f"max pixel difference between the two: {diff} level(s) (batch composition only changes float rounding)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="builtin:tiny", help="model file or folder (default: built-in tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--lines", type=int, default=64, help="prompt lines (one image each)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scale", type=int, default=1, help="multiply the 8 sizes (e.g. 4 for 256..512 px on a GPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()

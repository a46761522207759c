"""Benchmark Attention Couple: 8 images with a 3-part regional prompt (A AND B AND C, a colour mask) against the
same 8 images with a plain prompt, through sdbatch's engine in one process. Prints both times and the cost per
regional image as a ratio of a plain one (target ≤ 1.6: the parts share one UNet call, only the cross-attention
runs once per part).

    python bench/regional.py                          # the built-in tiny model, 128×128, CPU
    python bench/regional.py --checkpoint v1-5.safetensors --size 512 --device cuda

Alternating rounds, best of `--repeats`; each round uses new prompt words so the text cache starts cold.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from txt2img import NEGATIVE, PROMPTS, sync  # bench/ is on sys.path when this file is run as a script

from sdbatch.config.guidance_schema import GuidanceConfig
from sdbatch.config.spec import HighresConfig, ModelConfig, NetworkConfig, PerfConfig, RunSpec, SamplerConfig
from sdbatch.engine.core.engine import Engine, get_engine
from sdbatch.plan.batching import make_batches
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

PARTS = ("a red fire truck", "a green forest", "a blue sky with clouds")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="builtin:tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--size", type=int, default=None, help="pixels (default 128 for tiny, else 512)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def make_spec(args: argparse.Namespace) -> RunSpec:
    size = args.size or (128 if args.checkpoint == "builtin:tiny" else 512)
    return RunSpec(model=ModelConfig(checkpoint=args.checkpoint, precision=args.precision),
                   sampler=SamplerConfig(name="euler_a", steps=args.steps), network=NetworkConfig(),
                   guidance=GuidanceConfig(), highres=HighresConfig(),
                   perf=PerfConfig(device=args.device, progress=False), prompt="x", width=size, height=size,
                   batch_size=args.batch_size)


def thirds_mask(folder: Path, size: int) -> str:
    """Left third red, middle green, right third blue: one region per part."""
    pixels = np.zeros((size, size, 3), np.uint8)
    for k in range(3):
        pixels[:, k * size // 3 : (k + 1) * size // 3, k] = 255
    path = folder / "thirds.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def run_images(engine: Engine, spec: RunSpec, prompts: list[str], mask: str | None) -> float:
    """Seconds for the 8 images of `prompts` (batches of spec.batch_size), the regional ones with `mask`."""
    jobs = plan(spec, [PromptLine(p, NEGATIVE, "bench") for p in prompts], base_seed=1000)
    jobs = [dataclasses.replace(job, region_mask=mask if " AND " in job.prompt else None) for job in jobs]
    start = time.perf_counter()
    for batch in make_batches(jobs, spec.batch_size):
        engine.run_batch(batch)
    sync(engine.placement.device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = make_spec(args)
    engine = get_engine(spec.model, spec.perf)
    with tempfile.TemporaryDirectory() as tmp:
        mask = thirds_mask(Path(tmp), spec.width)
        rounds: dict[str, list[float]] = {"plain": [], "regional": []}
        for r in range(args.repeats + 1):  # round 0 warms up
            plain = [f"{p}, take {r}" for p in PROMPTS]
            regional = [" AND ".join(f"{part}, {p}, take {r}" for part in PARTS) for p in PROMPTS]
            for name, prompts in (("plain", plain), ("regional", regional)):
                seconds = run_images(engine, spec, prompts, mask if name == "regional" else None)
                if r:
                    rounds[name].append(seconds)
    best = {name: min(times) for name, times in rounds.items()}
    print(f"model: {engine.info.name} ({engine.info.family}), {spec.width}x{spec.height}, {args.steps} steps "
          f"euler_a, batches of {args.batch_size}, device {engine.placement.device} ({engine.placement.precision}), "
          f"torch threads {torch.get_num_threads()}")
    print("| | 8 images | per image |\n|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} s | {seconds / 8:.3f} s |")
    print(f"regional / plain per image: {best['regional'] / best['plain']:.2f} (target <= 1.6; 3 parts, "
          f"best of {args.repeats}; rounds: " + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v)
                                                       for k, v in rounds.items()) + ")")


if __name__ == "__main__":
    main()

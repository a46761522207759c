"""Benchmark guided sampling: the cost per image of CLIP guidance (every step, every 4th step) against none.

The same images (prompts, seeds, size, steps, sampler) through sdbatch's engine (``get_engine(...).run_batch`` in
one engine session per setting) three times: without guidance, with guided=clip every step and with
guided.every_n_steps=4. Each setting runs one untimed warm-up batch, then ``--repeats`` timed rounds; the best
round counts. Without ``--clip-model`` a small random CLIPModel is built in a temporary folder (the test suite's
shape, 32×32 input), so the numbers show the VAE-decoder backward pass and the wrapper's own cost; with a real
model (laion/CLIP-ViT-B-32-laion2B-s34B-b79K) they show the real price.

    python bench/guided.py     # built-in tiny model, random tiny CLIP, CPU, 128x128, 8 steps
    python bench/guided.py --checkpoint v1-5-pruned-emaonly.safetensors --clip-model CLIP-ViT-B-32-laion2B \\
        --device cuda --precision fp16 --size 512 --steps 20

Reading the output: seconds per image for each setting and the ratio to no guidance (every step costs a VAE
decode and its backward pass plus the CLIP forward and backward at each step; every 4th step about a quarter).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdbatch.config.guidance_schema import GuidanceConfig
from sdbatch.config.guided_schema import GuidedConfig
from sdbatch.config.spec import HighresConfig, ModelConfig, NetworkConfig, PerfConfig, RunSpec, SamplerConfig
from sdbatch.engine.core.engine import get_engine
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.planner import plan
from sdbatch.prompts.sources import PromptLine

PROMPTS = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "an old sailing ship"]


def tiny_clip_folder(folder: Path) -> Path:
    """The suite's random tiny CLIPModel, saved as a folder (tests/guided_files.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from guided_files import write_clip

    return write_clip(folder)[0]


def make_spec(args: argparse.Namespace, guided: GuidedConfig) -> RunSpec:
    model = ModelConfig(checkpoint=args.checkpoint, precision=args.precision)
    return RunSpec(model=model, sampler=SamplerConfig(name=args.sampler, steps=args.steps), network=NetworkConfig(),
                   guidance=GuidanceConfig(), highres=HighresConfig(), guided=guided,
                   perf=PerfConfig(device=args.device, progress=False), prompt="x", width=args.size,
                   height=args.size, batch_size=args.batch_size)


def seconds_per_image(args: argparse.Namespace, guided: GuidedConfig) -> float:
    """The best round's wall time per image for these guided settings."""
    spec = make_spec(args, guided)
    lines = [PromptLine(p, "", "bench") for p in PROMPTS]
    jobs = plan(spec, lines, base_seed=1)
    batches = [tuple(jobs[i : i + args.batch_size]) for i in range(0, len(jobs), args.batch_size)]
    engine = get_engine(spec.model, spec.perf)
    best = float("inf")
    with engine.session(spec):
        engine.run_batch(Batch(BatchKey.of(batches[0][0]), batches[0]))  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            for batch in batches:
                engine.run_batch(Batch(BatchKey.of(batch[0]), batch))
            if engine.placement.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best / len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="builtin:tiny")
    parser.add_argument("--clip-model", default=None, help="a CLIPModel folder; default: a random tiny one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip_model or str(tiny_clip_folder(Path(tmp)))
        settings = {"none": GuidedConfig(),
                    "clip, every step": GuidedConfig(kind="clip", clip_model=clip),
                    "clip, every 4th step": GuidedConfig(kind="clip", clip_model=clip, every_n_steps=4)}
        times = {name: seconds_per_image(args, guided) for name, guided in settings.items()}
    model = args.clip_model or "a random tiny CLIP"
    print(f"{len(PROMPTS)} images, {args.size}x{args.size}, {args.steps} {args.sampler} steps, "
          f"batch {args.batch_size}, {args.device} {args.precision}, {model}")
    print(f"{'setting':<22} {'s/image':>9} {'ratio':>7}")
    for name, seconds in times.items():
        print(f"{name:<22} {seconds:>9.3f} {seconds / times['none']:>7.2f}")


if __name__ == "__main__":
    main()

"""Benchmark ControlNet: the same 8 images with one ControlNet through sdbatch and a diffusers pipeline loop.

One process, the same module objects on both sides: sdbatch's engine (``get_engine(...).run_batch``) and a
diffusers ``StableDiffusionControlNetPipeline`` built from the engine's own UNet, VAE and text encoder, the
ControlNet sdbatch loaded (``load_controlnet``), a tokenizer written by ``write_hf_tokenizer_files`` and a
scheduler from sdbatch's ``make_scheduler``. Both get the same prompts, seeds (per-image CPU generators), sizes,
steps, CFG scale, batches and hints (generated guide images with shapes, made into hints by ``hint_image``).

It measures, best of ``--repeats`` timed rounds after one untimed warm-up round of each:
- sdbatch engine only: the planned batches through ``engine.run_batch`` in one engine session (PIL images
  out), the fair counterpart of the diffusers loop, which also returns PIL images;
- diffusers: one pipeline call per batch of ``--batch-size`` prompts (the same batches as sdbatch's);
- sdbatch full run: ``sdbatch.cli.runner.run`` (planning, the engine, PNG files with metadata, manifest).
The UNet and ControlNet forward passes (and VAE decode, text encoder) are timed by wrapping the modules'
``forward`` / ``decode`` (the ``Timers`` of bench/txt2img.py); "outside UNet + ControlNet" is the wall time
minus those two: scheduler steps, CFG arithmetic, hint and latent preparation, text encoding, VAE decode and
Python glue. Each round has its own prompt suffix, so sdbatch's per-process text-encoding cache starts cold.

    python bench/controlnet.py     # built-in tiny model and tiny ControlNet, CPU, 128x128 (about a minute)
    python bench/controlnet.py --checkpoint v1-5-pruned-emaonly.safetensors \\
        --controlnet control_v11p_sd15_canny.pth --device cuda --precision fp16   # 512x512, 20 steps

Reading the output: the table gives each side's best wall time for the 8 images and how much of it the UNet
and ControlNet forward passes took; "sdbatch / diffusers" below 1.0 means sdbatch was faster (target <= 1.0).
"outside UNet + ControlNet" is the overhead share; on the same modules both sides spend about the same time
inside the forward passes, so a difference in wall time shows up there. The pixel check should say at most
1 level at fp32 (fp16 may differ by a few levels). A "noisy:" line means the rounds of one system were more than
15% apart: on a machine shared with other processes, add --repeats 4 --threads 1 (torch's worker threads stall
badly when the cores are oversubscribed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw
from transformers import CLIPTokenizer

# bench/ is on sys.path when this file is run as a script
from txt2img import NEGATIVE, PROMPTS, Timers, max_pixel_diff, sync

from sdbatch.cli.runner import run
from sdbatch.config.guidance_schema import GuidanceConfig
from sdbatch.config.spec import HighresConfig, ModelConfig, NetworkConfig, PerfConfig, RunSpec, SamplerConfig
from sdbatch.engine.core.engine import Engine, get_engine
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.guide.hints import hint_image
from sdbatch.engine.models.controlnet_files import LoadedControlNet, load_controlnet
from sdbatch.engine.models.loading import load_count
from sdbatch.engine.text.tokenizer import PAD_TOKENS, write_hf_tokenizer_files
from sdbatch.plan.batching import Batch, make_batches
from sdbatch.plan.stage import plan_run

CFG, BASE_SEED = 7.5, 1000
TINY = "builtin:tiny"
FORWARD_KEYS = ("unet", "controlnet")
ALL_KEYS = ("unet", "controlnet", "vae", "text")
SYSTEMS = ("sdbatch", "diffusers", "full run")
NOISY = 1.15  # rounds of one system further apart than this: the machine was busy


# ---------------------------------------------------------------- inputs


def make_guides(folder: Path, count: int, size: int) -> Path:
    """`count` guide images with shapes (a white square, an orange ring, a grey bar) at seeded places, on black."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        image = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(image)
        side = size * 3 // 8
        x, y = (int(v) for v in rng.integers(size // 16, size - side - size // 16, size=2))
        draw.rectangle([x, y, x + side, y + side], fill=(255, 255, 255))
        r = size // 6
        cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(200, 120, 40), width=max(2, size // 32))
        bar = int(rng.integers(0, size - size // 10))
        draw.rectangle([0, bar, size - 1, bar + size // 20], fill=(128, 128, 128))
        image.save(folder / f"guide-{i:02d}.png")
    return folder


def make_spec(args: argparse.Namespace, guides: Path, prompts: list[str]) -> RunSpec:
    tiny = args.checkpoint == TINY
    model = ModelConfig(checkpoint=args.checkpoint, v2="false" if tiny else "auto",
                        v_parameterization="false" if tiny else "auto", precision=args.precision)
    guidance = GuidanceConfig(name="controlnet", models=[args.controlnet], guide_image=str(guides))
    return RunSpec(model=model, sampler=SamplerConfig(name=args.sampler, steps=args.steps, cfg_scale=CFG),
                   network=NetworkConfig(), guidance=guidance, highres=HighresConfig(),
                   perf=PerfConfig(device=args.device, progress=False), prompt=prompts, negative_prompt=NEGATIVE,
                   width=args.size, height=args.size, seed=BASE_SEED, batch_size=args.batch_size)


def round_spec(base: RunSpec, take: str) -> RunSpec:
    """The run with each prompt suffixed by `take`: a round's prompts are new to sdbatch's text cache."""
    return dataclasses.replace(base, prompt=[f"{p}, {take}" for p in PROMPTS])


def batches_of(spec: RunSpec) -> list[Batch]:
    """The run's batches, planned as sdbatch's runner plans them (guide images assigned to the images in turn)."""
    return make_batches(plan_run(spec, BASE_SEED).jobs, spec.batch_size)


# ---------------------------------------------------------------- the two systems


def controlnet_pipeline(engine: Engine, net: LoadedControlNet, sampler: str, schedule: str,
                        folder: Path) -> StableDiffusionControlNetPipeline:
    """diffusers' ControlNet pipeline on the engine's own modules and sdbatch's scheduler configuration."""
    bundle = engine.bundle
    tokenizer = CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(folder / "tokenizer", PAD_TOKENS[bundle.family]))
    pipe = StableDiffusionControlNetPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=tokenizer, unet=bundle.unet,
        controlnet=net.model, scheduler=make_scheduler(sampler, schedule, engine.v_prediction),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hints_for(spec: RunSpec, batches: list[Batch]) -> dict[str, Image.Image]:
    """Each guide image's hint at the generation size, made as sdbatch makes it (prepared before timing)."""
    prep = spec.guidance.units()[0].preprocess
    return {path: hint_image(path, prep, job.width, job.height, "guidance.guide_image")
            for batch in batches for job in batch.jobs for path in job.guide_images}


def run_sdbatch(engine: Engine, spec: RunSpec, batches: list[Batch]) -> list[Image.Image]:
    with engine.session(spec):
        return [image for batch in batches for image in engine.run_batch(batch)]


def run_diffusers(pipe: StableDiffusionControlNetPipeline, batches: list[Batch],
                  hints: dict[str, Image.Image]) -> list[Image.Image]:
    """One pipeline call per batch: the same prompts, seeds, hints and settings as sdbatch's batch."""
    images = []
    for batch in batches:
        jobs, key = batch.jobs, batch.key
        out = pipe(
            [j.prompt for j in jobs], image=[hints[j.guide_images[0]] for j in jobs],
            negative_prompt=[j.negative_prompt for j in jobs], num_inference_steps=key.steps,
            guidance_scale=jobs[0].cfg_scale, eta=key.eta, height=key.height, width=key.width, output_type="pil",
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
        )
        images.extend(out.images)
    return images


def run_full(spec: RunSpec, folder: Path) -> list[Image.Image]:
    """sdbatch's whole run into a fresh folder: its PNG images in run order."""
    run(spec, folder)
    lines = sorted((json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()),
                   key=lambda line: line["index"])
    return [Image.open(folder / line["file"]).convert("RGB") for line in lines]


# ---------------------------------------------------------------- measuring


@dataclasses.dataclass
class Timing:
    system: str
    seconds: float
    parts: dict[str, float]  # unet, controlnet, vae, text seconds

    def outside(self, keys: tuple[str, ...] = FORWARD_KEYS) -> float:
        """Seconds outside the given timed calls."""
        return max(0.0, self.seconds - sum(self.parts[k] for k in keys))


def timed(system: str, fn: Callable[[], list[Image.Image]], timers: Timers,
          device: torch.device) -> tuple[Timing, list[Image.Image]]:
    timers.take()
    sync(device)
    start = time.perf_counter()
    images = fn()
    sync(device)
    seconds = time.perf_counter() - start
    controlnet = timers.seconds.get("controlnet", 0.0)  # take() keeps only unet, vae and text
    parts = {**timers.take(), "controlnet": controlnet}
    return Timing(system, seconds, parts), images


def one_round(take: str, args: argparse.Namespace, base: RunSpec, engine: Engine, pipe: Any,
              hints: dict[str, Image.Image], timers: Timers, folder: Path) -> dict[str, tuple[Timing, list]]:
    """sdbatch engine, diffusers, sdbatch full run, each on this round's own prompts."""
    device = engine.placement.device
    engine_spec, full_spec = round_spec(base, take), round_spec(base, f"{take}, full run")
    batches = batches_of(engine_spec)
    return {
        "sdbatch": timed("sdbatch", lambda: run_sdbatch(engine, engine_spec, batches), timers, device),
        "diffusers": timed("diffusers", lambda: run_diffusers(pipe, batches, hints), timers, device),
        "full run": timed("full run", lambda: run_full(full_spec, folder / f"run-{take.replace(' ', '-')}"),
                          timers, device),
    }


# ---------------------------------------------------------------- the benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=TINY, help="SD 1.x/2.x model file or folder (default: built-in tiny)")
    p.add_argument("--controlnet", default=TINY, help="ControlNet file or diffusers folder for that model "
                   "(default: the built-in tiny ControlNet, for the tiny model only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--size", type=int, default=None, help="width = height in pixels (default 128 tiny, 512 real)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="images per sdbatch batch and per diffusers call")
    p.add_argument("--sampler", default="euler_a", help="sdbatch sampler name, for both sides (default euler_a)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds; the best of each system is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = p.parse_args(argv)
    if args.checkpoint != TINY and args.controlnet == TINY:
        p.error(f"--controlnet {TINY} is for the tiny model only; give --controlnet PATH with --checkpoint")
    if args.size is None:
        args.size = 128 if args.checkpoint == TINY else 512
    if args.size % 8 or args.size < 64:
        p.error("--size must be a multiple of 8, at least 64")
    return args


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-cn-") as tmp:
        folder = Path(tmp)
        base = make_spec(args, make_guides(folder / "guides", len(PROMPTS), args.size), PROMPTS)
        load_start = time.perf_counter()
        engine = get_engine(base.model, base.perf)
        net = load_controlnet(args.controlnet, engine.bundle, "guidance.models[0]")
        load_s, loads = time.perf_counter() - load_start, load_count()
        batches = batches_of(base)
        key = batches[0].key
        pipe = controlnet_pipeline(engine, net, key.sampler, key.schedule, folder)
        hints = hints_for(base, batches)
        timers = Timers(engine.placement.device)  # the modules are shared: wrapping once times both sides
        timers.wrap_models(engine.bundle.unet, engine.bundle.vae, engine.bundle.text_encoder)
        timers.wrap(net.model, "forward", "controlnet")

        print(f"untimed warm-up round of each ({len(PROMPTS)} images) ...", flush=True)
        warm = one_round("warm-up", args, base, engine, pipe, hints, timers, folder)
        print("  warm-up: " + ", ".join(f"{s} {warm[s][0].seconds:.2f} s" for s in SYSTEMS), flush=True)
        rounds = []
        for r in range(1, args.repeats + 1):
            rounds.append(one_round(f"take {r}", args, base, engine, pipe, hints, timers, folder))
            print(f"  round {r}: " + ", ".join(f"{s} {rounds[-1][s][0].seconds:.2f} s" for s in SYSTEMS), flush=True)
        assert load_count() == loads, "the full run loaded the model again instead of using the cached engine"
        assert load_controlnet(args.controlnet, engine.bundle, "x") is net, "the ControlNet was loaded again"
        report(args, engine, net, batches, rounds, load_s, time.perf_counter() - start)


def best(rounds: list[dict[str, tuple[Timing, list]]], system: str) -> Timing:
    return min((r[system][0] for r in rounds), key=lambda t: t.seconds)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def report(args: argparse.Namespace, engine: Engine, net: LoadedControlNet, batches: list[Batch],
           rounds: list[dict[str, tuple[Timing, list]]], load_s: float, total_s: float) -> None:
    s, d, f = best(rounds, "sdbatch"), best(rounds, "diffusers"), best(rounds, "full run")
    key, p = batches[0].key, engine.placement
    n = sum(len(b.jobs) for b in batches)
    print()
    print(f"model: {engine.info.name} ({engine.info.family}) + ControlNet {net.name} ({net.kind}); loaded in "
          f"{load_s:.1f} s (untimed)")
    print(f"device: {p.device} ({p.precision}), torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    print(f"workload: {n} images {key.width}x{key.height}, {key.steps} steps {key.sampler} "
          f"({type(make_scheduler(key.sampler, key.schedule, engine.v_prediction)).__name__}), CFG {CFG}, "
          f"one ControlNet, seeds {BASE_SEED}-{BASE_SEED + n - 1}, per-image CPU generators")
    print(f"batches: sdbatch {len(batches)} x run_batch of {args.batch_size}; diffusers {len(batches)} pipeline "
          f"calls of {args.batch_size} prompts (the same batches, not a per-image loop)")
    print(f"schedule: 1 untimed warm-up round, then {len(rounds)} round(s) of sdbatch, diffusers, sdbatch full run; "
          "best of each reported; each round has its own prompt suffix (cold text cache)")
    print()
    print("| | sdbatch (engine) | diffusers | sdbatch / diffusers |")
    print("|---|---|---|---|")
    print(f"| {n} images, wall | {s.seconds:.2f} s | {d.seconds:.2f} s | {s.seconds / d.seconds:.2f} |")
    for k, label in (("unet", "UNet forward"), ("controlnet", "ControlNet forward"), ("vae", "VAE decode"),
                     ("text", "text-encoder forward")):
        print(f"| of which {label} | {s.parts[k]:.2f} s | {d.parts[k]:.2f} s | |")
    print(f"| outside UNet + ControlNet forward | {s.outside():.2f} s = {_pct(s.outside(), s.seconds)} "
          f"| {d.outside():.2f} s = {_pct(d.outside(), d.seconds)} | |")
    print(f"| outside all four | {s.outside(ALL_KEYS):.2f} s = {_pct(s.outside(ALL_KEYS), s.seconds)} "
          f"| {d.outside(ALL_KEYS):.2f} s = {_pct(d.outside(ALL_KEYS), d.seconds)} | |")
    print()
    verdict = "meets" if s.seconds <= d.seconds else "misses"
    print(f"ratio sdbatch / diffusers (engine only): {s.seconds / d.seconds:.3f} ({verdict} the target <= 1.0)")
    print(f"sdbatch time outside the UNet and ControlNet forward passes: {_pct(s.outside(), s.seconds)} "
          f"({s.outside():.2f} s of {s.seconds:.2f} s)")
    print(f"sdbatch full run (plan + engine + {n} PNGs with metadata + manifest): {f.seconds:.2f} s, "
          f"{f.seconds / d.seconds:.2f}x diffusers, {f.seconds - s.seconds:+.2f} s vs engine only")
    print("rounds: " + "; ".join(", ".join(f"{x} {r[x][0].seconds:.2f} s" for x in SYSTEMS) for r in rounds))
    spread = max(max(t) / min(t) for t in ([r[x][0].seconds for r in rounds] for x in SYSTEMS))
    if spread > NOISY:
        print(f"noisy: one system's rounds differ by {100 * (spread - 1):.0f}%; on a shared machine rerun with "
              "more --repeats (and --threads 1 where other processes compete for the cores)")
    last = rounds[-1]
    a, b = last["sdbatch"][1], last["diffusers"][1]
    sizes = sorted({im.size for im in a + b})
    diff, share = max_pixel_diff(a, b)
    print(f"images: {len(a)} + {len(b)}, size(s) {sizes}; max pixel difference sdbatch vs diffusers: {diff} level(s) "
          f"({100 * share:.2f}% of values differ; expected <= 1 at fp32)")
    print(f"full run: {len(last['full run'][1])} PNGs written; hints: diffusers gets them ready-made (PIL, prepared "
          "before timing), sdbatch makes them from the guide files inside run_batch (its hint cache after warm-up)")
    print(f"total script time: {total_s:.0f} s")


if __name__ == "__main__":
    main()

"""Benchmark a 16-image sweep (4 seeds × 4 CFG scales, `model=tiny`) four ways and print times and ratios.

1. one process per point: `python run.py seed=S sampler.cfg_scale=C` 16 times (what users of the
   reference script do);
2. Hydra multirun: one `python run.py -m seed=... sampler.cfg_scale=...` (models and text encodings are
   loaded and computed once, jobs run one after another in one process);
3. a fused grid in one run: `python run.py grid.x=sampler.cfg_scale:... grid.y=seed:...` (the 16 cells
   are jobs of one run and share UNet batches of --batch-size); printed as not available when the run
   fails (an sdbatch without fused grids);
4. a diffusers loop: one process that loads a `StableDiffusionPipeline` with the same weights once and
   calls it for each point (seeded per image like sdbatch), saving PNGs.

Every way starts its own Python process, so each time includes interpreter start, imports and model
loading. One untimed warm-up run builds the tiny model and warms the file cache first. The multirun, the
fused grid and the diffusers loop run --repeat times (3), interleaved, and the best time of each is reported:
on a shared machine a single run of a ~8 s process varies by ±20%. Images are matched by (seed, CFG scale)
and the largest pixel difference to the multirun's images is printed for each way.

    python bench/sweep.py                  # 128×128, 15 steps (about 4 minutes on 2 CPU cores)
    python bench/sweep.py --size 256 --steps 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (11, 22, 33, 44)
SCALES = (3.0, 5.0, 7.5, 10.0)
PROMPT = "a lighthouse at dusk in oil paint"


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# torch threads, the same for every way. One unless OMP_NUM_THREADS says otherwise: on the project's shared
# 2-vCPU machine two threads made the same multirun 12x slower (spinning threads waiting for a busy vCPU).
THREADS = os.environ.get("OMP_NUM_THREADS", "1")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": THREADS, "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "1"}


def _common(args: argparse.Namespace) -> list[str]:
    return ["model=tiny", f"prompt={PROMPT}", f"width={args.size}", f"height={args.size}",
            f"sampler.steps={args.steps}", "perf.progress=false"]


def _run(cmd: list[str]) -> float:
    """Seconds the command took; exits with its output when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def per_point(args: argparse.Namespace, out: Path) -> float:
    """One `python run.py` per (seed, scale) point, one after another."""
    total = 0.0
    for n, (seed, scale) in enumerate(itertools.product(SEEDS, SCALES)):
        total += _run([sys.executable, str(ROOT / "run.py"), *_common(args), f"seed={seed}",
                       f"sampler.cfg_scale={scale}", f"hydra.run.dir={out / str(n)}"])
    return total


def multirun(args: argparse.Namespace, out: Path) -> float:
    """One `python run.py -m` over every point; job n has the same (seed, scale) as per_point's run n."""
    return _run([sys.executable, str(ROOT / "run.py"), "-m", *_common(args),
                 "seed=" + ",".join(map(str, SEEDS)), "sampler.cfg_scale=" + ",".join(map(str, SCALES)),
                 f"hydra.sweep.dir={out}"])


def fused_grid(args: argparse.Namespace, out: Path) -> float | None:
    """One run whose grid axes make the 16 points; None when this sdbatch has no fused grids."""
    cmd = [sys.executable, str(ROOT / "run.py"), *_common(args), f"batch_size={args.batch_size}",
           'grid.x="sampler.cfg_scale:' + ",".join(map(str, SCALES)) + '"',
           'grid.y="seed:' + ",".join(map(str, SEEDS)) + '"', f"hydra.run.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        print("fused grid: not available:", (proc.stderr.strip().splitlines() or ["?"])[-1])
        return None
    return time.perf_counter() - start


def diffusers_loop(args: argparse.Namespace, out: Path, folder: Path) -> float:
    return _run([sys.executable, __file__, "--diffusers-worker", str(folder), str(out),
                 "--size", str(args.size), "--steps", str(args.steps)])


def export_tiny_for_diffusers(folder: Path) -> Path:
    """The built-in tiny model's weights (stored in fp16, run in fp32) as a diffusers pipeline folder."""
    from sdbatch.engine.models.export import save_diffusers_folder
    from sdbatch.engine.models.tiny import TINY_SEED, build_tiny_components

    unet, vae, text_encoder = (m.half().float() for m in build_tiny_components("sd1", TINY_SEED))
    return save_diffusers_folder(folder, unet, vae, text_encoder, "sd1")


def diffusers_worker(folder: Path, out: Path, size: int, steps: int) -> None:
    """The diffusers loop itself (run in its own process): load once, one call per point, save PNGs."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdbatch.engine.core.scheduler_factory import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", "default", False)  # sdbatch's DDIM settings (the reference's)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    for n, (seed, scale) in enumerate(itertools.product(SEEDS, SCALES)):
        image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=scale, height=size, width=size,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        image.save(out / f"{n:02d}.png")


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _by_point(run_dirs: list[Path]) -> dict[tuple[int, float], Path]:
    """{(seed, cfg_scale): image} from the manifests of sdbatch run directories."""
    found = {}
    for run_dir in run_dirs:
        for line in (run_dir / "manifest.jsonl").read_text().splitlines():
            record = json.loads(line)
            found[(record["seed"], float(record["cfg_scale"]))] = run_dir / record["file"]
    return found


def max_diffs(root: Path, ways: list[str]) -> dict[str, int]:
    """The largest pixel difference of each way's 16 images to the multirun's, matched by (seed, scale)."""
    points = list(itertools.product(SEEDS, SCALES))
    images = {
        "one process per point": _by_point(sorted((root / "per_point").iterdir())),
        "hydra multirun (cache)": _by_point([p for p in (root / "multirun").iterdir() if p.name.isdigit()]),
        "diffusers loop": {pt: root / "diffusers" / f"{n:02d}.png" for n, pt in enumerate(points)},
    }
    if "fused grid (one run)" in ways:
        images["fused grid (one run)"] = _by_point([root / "fused"])
    ref = {pt: _pixels(images["hydra multirun (cache)"][pt]) for pt in points}
    return {way: max(int(abs(_pixels(images[way][pt]) - ref[pt]).max()) for pt in points) for way in images}


def report(times: dict[str, float], diffs: dict[str, int], args: argparse.Namespace) -> None:
    base = times["one process per point"]
    print(f"\n16 images: {len(SEEDS)} seeds × {len(SCALES)} CFG scales, model=tiny, {args.size}×{args.size}, "
          f"{args.steps} DDIM steps, {CORES} CPU core(s), {THREADS} torch thread(s); best of {args.repeat} runs "
          "(one process per point: 1 run)")
    print(f"{'way':<26}{'seconds':>9}{'× per point':>13}{'× diffusers':>13}{'max px diff':>13}")
    for name, seconds in times.items():
        print(f"{name:<26}{seconds:>9.1f}{seconds / base:>13.2f}{seconds / times['diffusers loop']:>13.2f}"
              f"{diffs[name]:>13}")
    if "fused grid (one run)" not in times:
        print(f"{'fused grid (one run)':<26}  not implemented yet")
    for name, target, against in [("hydra multirun (cache)", 0.5, "one process per point"),
                                  ("fused grid (one run)", 0.35, "one process per point"),
                                  ("fused grid (one run)", 0.8, "diffusers loop")]:
        if name in times:
            ratio = times[name] / times[against]
            print(f"target {name} ≤ {target}× {against}: {'met' if ratio <= target else 'NOT met'} ({ratio:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4, help="UNet batch of the fused grid")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the multirun, fused grid and diffusers loop (best is reported; the "
                             "one-process-per-point way runs once)")
    parser.add_argument("--diffusers-worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.diffusers_worker:
        diffusers_worker(Path(args.diffusers_worker[0]), Path(args.diffusers_worker[1]), args.size, args.steps)
        return
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-sweep-") as tmp:
        root = Path(tmp)
        folder = export_tiny_for_diffusers(root / "tiny-diffusers")
        _run([sys.executable, str(ROOT / "run.py"), *_common(args), "seed=0", f"hydra.run.dir={root / 'warm'}"])
        ways = [("one process per point", "per_point", lambda out: per_point(args, out)),
                ("hydra multirun (cache)", "multirun", lambda out: multirun(args, out)),
                ("fused grid (one run)", "fused", lambda out: fused_grid(args, out)),
                ("diffusers loop", "diffusers", lambda out: diffusers_loop(args, out, folder))]
        timings: dict[str, list[float]] = {}
        for rep in range(args.repeat):  # interleaved, so a slow spell of a shared machine hits every way
            for name, folder_name, way in ways:
                if rep and name == "one process per point":
                    continue  # 16 processes: once is enough to see the order of magnitude
                seconds = way(root / (folder_name if rep == 0 else f"{folder_name}-{rep}"))  # fresh dirs: no resume
                if seconds is not None:
                    timings.setdefault(name, []).append(seconds)
                    print(f"{name}: {seconds:.1f} s", flush=True)
        times = {name: min(runs) for name, runs in timings.items()}  # best of --repeat, as timeit reports
        report(times, max_diffs(root, list(times)), args)


if __name__ == "__main__":
    main()

"""Benchmark txt2img: the same 8 images through sdbatch's engine and diffusers' StableDiffusion(XL)Pipeline.

One process, alternating rounds (sdbatch, diffusers, ...), on a random SD1-architecture model at half the
SD1.5 widths (``--full``: full widths; ``--family sdxl``: SDXL's layout, two text encoders, against
StableDiffusionXLPipeline) built here and saved as a single-file checkpoint in a temp dir.
Prints wall times and their ratio, the share of time outside the UNet / VAE-decode / text-encoder forward
passes, "single file → ready" load times, peak memory per phase and the pixel difference between the two.

    python bench/txt2img.py                      # CPU, fp32, half widths (about 3 minutes on 2 cores)
    python bench/txt2img.py --full --device cuda # GPU, fp16, full SD1.5 widths
    python bench/txt2img.py --family sdxl        # half-width SDXL (UNet 192/384/768) vs StableDiffusionXLPipeline
    python bench/txt2img.py --full --device cuda --batch-size 8 --compile --json out.json  # one configuration

--compile and --channels-last set perf.compile / perf.channels_last for sdbatch only: diffusers stays eager, the
baseline. --tome RATIO and --deepcache INTERVAL[,BRANCH] add sdbatch with that accelerator (perf.tome_ratio,
perf.deepcache.*) to the alternating rounds, and print its ratio to diffusers and the mean absolute pixel
difference of its images to sdbatch's exact ones (the price in pixels):

    python bench/txt2img.py --size 512 --images 2 --batch-size 1 --tome 0.5 --deepcache 3
 --json writes the key numbers (seconds, it/s, images/s, ratio) for scripts such as bench/gpu.sh.
"""

from __future__ import annotations

import os
import time

START = time.perf_counter()  # the total printed at the end includes importing torch and diffusers
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers read it: nothing is downloaded

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from sdbatch import __version__  # noqa: E402
from sdbatch.config.accelerators_schema import DeepCacheConfig  # noqa: E402
from sdbatch.config.resolve import to_plain  # noqa: E402
from sdbatch.config.spec import (  # noqa: E402
    GuidanceConfig,
    HighresConfig,
    ModelConfig,
    NetworkConfig,
    PerfConfig,
    RunSpec,
    SamplerConfig,
)
from sdbatch.engine.core.device import Placement, pick_placement  # noqa: E402
from sdbatch.engine.core.engine import Engine, get_engine  # noqa: E402
from sdbatch.engine.core.scheduler_factory import make_scheduler  # noqa: E402
from sdbatch.engine.models.export import save_diffusers_folder, save_single_file  # noqa: E402
from sdbatch.engine.models.loading import ModelBundle, clear_model_cache, load_count, load_models  # noqa: E402
from sdbatch.engine.models.tiny import build_tiny_components  # noqa: E402
from sdbatch.outputs.metadata import image_params  # noqa: E402
from sdbatch.outputs.run_dir import RunDir  # noqa: E402
from sdbatch.plan.batching import Batch, make_batches  # noqa: E402
from sdbatch.plan.planner import plan  # noqa: E402
from sdbatch.prompts.sources import read_prompts  # noqa: E402

SIZE, STEPS, CFG, BATCH, BASE_SEED = 256, 10, 7.5, 4, 1000
PROMPTS = [
    "a lighthouse at dusk, oil painting",
    "a red cube on a wooden table",
    "a fox in the snow, photograph",
    "a castle on a hill under a stormy sky",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse",
    "a watercolor of a mountain lake",
    "a robot reading a book in a library",
]
NEGATIVE = "blurry, low quality"
WARMUP_PROMPTS = ["warm-up one", "warm-up two", "warm-up three", "warm-up four"]  # not the timed prompts
MiB = 1 << 20
MAX_AUTO_ROUNDS = 3
ROUND_MARGIN = 1.2  # a round can take 10-20% longer than the one before on a shared machine


# ---------------------------------------------------------------- the model


# SDXL base's layout; its widths are halved to the next multiple of 64 (its 64-channel heads): 320 → 192
_SDXL_UNET = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              "transformer_layers_per_block": (1, 2, 10), "layers_per_block": 2, "addition_time_embed_dim": 256}


def _sdxl_overrides(full: bool) -> dict[str, dict[str, Any]]:
    widths = (320, 640, 1280) if full else (192, 384, 768)
    first, second = (768, 1280) if full else (384, 640)
    return {
        "unet": {**_SDXL_UNET, "block_out_channels": widths, "attention_head_dim": tuple(c // 64 for c in widths),
                 "cross_attention_dim": first + second,
                 "projection_class_embeddings_input_dim": second + 6 * 256},
        "vae": {"block_out_channels": tuple(c // (1 if full else 2) for c in (128, 256, 512, 512)),
                "layers_per_block": 2},
        "text": {"hidden_size": first, "intermediate_size": 4 * first, "num_hidden_layers": 12,
                 "num_attention_heads": first // 64},
        "text_2": {"hidden_size": second, "intermediate_size": 4 * second, "num_hidden_layers": 32,
                   "num_attention_heads": second // 64, "projection_dim": second},
    }


def model_overrides(full: bool, tiny: bool = False, family: str = "sd1") -> dict[str, dict[str, Any]]:
    """Config overrides for build_tiny_components: SD1.5's (or SDXL's) layout at full or half widths; none for
    --tiny."""
    if tiny:
        return {}
    if family == "sdxl":
        return _sdxl_overrides(full)
    k = 1 if full else 2
    text_width = 768 // k
    return {
        "unet": {
            "block_out_channels": tuple(c // k for c in (320, 640, 1280, 1280)),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": text_width,
        },
        "vae": {"block_out_channels": tuple(c // k for c in (128, 256, 512, 512)), "layers_per_block": 2},
        "text": {
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": 12,
            "num_attention_heads": 12 // k,
        },
    }


def model_label(full: bool, tiny: bool = False, family: str = "sd1") -> str:
    if tiny:
        return (f"sdbatch's tiny test {family.upper()}, random weights: checks the script, says nothing about "
                "speed")
    o = model_overrides(full, family=family)
    unet = "/".join(map(str, o["unet"]["block_out_channels"]))
    vae = "/".join(map(str, o["vae"]["block_out_channels"]))
    text = o["text"]
    if family == "sdxl":
        text = f"{text['hidden_size']}x12 + {o['text_2']['hidden_size']}x32 layers"
    else:
        text = f"{text['hidden_size']}x{text['num_hidden_layers']} layers"
    return (f"{'full' if full else 'half'}-width {family.upper()} (UNet {unet}, text {text}, VAE {vae}), "
            "random weights")


def build_checkpoint(folder: Path, full: bool, seed: int, tiny: bool = False,
                     family: str = "sd1") -> tuple[Path, Path, int]:
    """(single file, diffusers config folder, parameter count) of a freshly built random model."""
    overrides = model_overrides(full, tiny, family)
    unet, vae, text_encoder, *second = build_tiny_components(family, seed, **overrides)
    params = sum(p.numel() for m in (unet, vae, text_encoder, *second) for p in m.parameters())
    text_2 = second[0] if second else None
    path = save_single_file(folder / f"bench-{family}.safetensors", unet, vae, text_encoder, family,
                            text_encoder_2=text_2)
    config = save_diffusers_folder(folder / f"bench-{family}-config", unet, vae, text_encoder, family, weights=False,
                                   text_encoder_2=text_2)
    return path, config, params


def kept_checkpoint(folder: Path, full: bool, seed: int, tiny: bool,
                    family: str = "sd1") -> tuple[Path, Path, int, bool]:
    """build_checkpoint into folder/<widths>-seed<N>, or what an earlier run left there: (..., reused)."""
    widths = "full" if full else "tiny" if tiny else "half"
    own = folder / (f"{widths}-seed{seed}" if family == "sd1" else f"{family}-{widths}-seed{seed}")
    done = own / "params.json"
    if done.exists():
        return (own / f"bench-{family}.safetensors", own / f"bench-{family}-config", json.loads(done.read_text()),
                True)
    own.mkdir(parents=True, exist_ok=True)
    path, config, params = build_checkpoint(own, full, seed, tiny, family)
    done.write_text(json.dumps(params))  # written last: a build that was cut short is built again
    return path, config, params, False


# ---------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timers:
    """Accumulated seconds per wrapped call (module forward, vae.decode), synchronized on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, attr: str, key: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
            return out

        setattr(obj, attr, timed)  # an instance attribute: nn.Module.__call__ and callers find it first

    def wrap_models(self, unet: Any, vae: Any, *text_encoders: Any) -> None:
        self.wrap(unet, "forward", "unet")
        self.wrap(vae, "decode", "vae")
        for encoder in text_encoders:  # SDXL's two count together
            if encoder is not None:
                self.wrap(encoder, "forward", "text")

    def take(self) -> dict[str, float]:
        """The totals so far, and start again from zero."""
        out = {k: self.seconds.get(k, 0.0) for k in ("unet", "vae", "text")}
        self.seconds = {}
        return out


def _proc_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def file_rss_mib(path: Path) -> float | None:
    """Resident MiB of this process's memory mappings of ``path`` (None where /proc/self/smaps is missing)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    name, total, inside = str(path.resolve()), 0, False
    for line in smaps.read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(name)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


def hwm_reset_works() -> bool:
    """Whether writing 5 to /proc/self/clear_refs resets VmHWM here (checked with a 256 MiB block)."""
    if not Path("/proc/self/status").exists():
        return False
    block = b"\x01" * (256 * MiB)  # written, so its pages count
    del block
    before = _proc_kib("VmHWM")
    return _reset_hwm() and _proc_kib("VmHWM") < before - 128 * 1024


class Memory:
    """Peak memory per phase: CPU VmHWM (or RSS deltas where it cannot be reset), CUDA max allocated."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.hwm = hwm_reset_works()
        self.peaks: dict[str, dict[str, float]] = {}

    def method(self) -> str:
        cpu = ("CPU: VmHWM after resetting it (/proc/self/clear_refs)" if self.hwm
               else "CPU: VmHWM cannot be reset here; RSS after minus before each phase")
        return cpu + ("; GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats" if self.cuda else "")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the block; a phase measured again keeps its highest peak."""
        if self.hwm:
            _reset_hwm()
        rss_start = _proc_kib("VmRSS") / 1024
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            gpu_start = torch.cuda.memory_allocated() / MiB
        yield
        rss_end = _proc_kib("VmRSS") / 1024
        peak = {"cpu": _proc_kib("VmHWM") / 1024 if self.hwm else rss_end, "cpu_start": rss_start}
        if not self.hwm:
            peak["cpu_delta"] = rss_end - rss_start
        if self.cuda:
            peak.update(gpu=torch.cuda.max_memory_allocated() / MiB, gpu_start=gpu_start)
        key = "gpu" if self.cuda else "cpu"
        if name not in self.peaks or peak[key] > self.peaks[name][key]:
            self.peaks[name] = peak


# ---------------------------------------------------------------- the two systems


def prompts(count: int) -> list[str]:
    """``count`` distinct prompts: PROMPTS, then PROMPTS again with a suffix (distinct, so no text-cache reuse)."""
    return [PROMPTS[i % len(PROMPTS)] + (f", take {i // len(PROMPTS) + 1}" if i >= len(PROMPTS) else "")
            for i in range(count)]


def make_spec(path: Path, args: argparse.Namespace, precision: str) -> RunSpec:
    model = ModelConfig(checkpoint=str(path), v2="false", v_parameterization="false", precision=precision)
    perf = PerfConfig(device=args.device, progress=False, compile=args.compile, channels_last=args.channels_last)
    return RunSpec(
        model=model, sampler=SamplerConfig(name="ddim", steps=args.steps, cfg_scale=CFG), network=NetworkConfig(),
        guidance=GuidanceConfig(), highres=HighresConfig(), perf=perf, prompt=prompts(args.images),
        negative_prompt=NEGATIVE, width=args.size, height=args.size, seed=BASE_SEED, batch_size=args.batch_size,
    )


def batches_of(spec: RunSpec) -> list[Batch]:
    """The run's batches, planned exactly as sdbatch's runner plans them."""
    jobs = plan(spec, read_prompts(spec.prompt, spec.negative_prompt, spec.prompt_file), spec.seed)
    return make_batches(jobs, spec.batch_size)


def load_sdbatch(path: Path, placement: Placement) -> tuple[ModelBundle, float]:
    clear_model_cache()
    start = time.perf_counter()
    bundle = load_models(str(path), v2="false", device=placement.device, dtype=placement.dtype,
                         vae_dtype=placement.vae_dtype)
    sync(placement.device)
    return bundle, time.perf_counter() - start


def load_diffusers(path: Path, config: Path, placement: Placement) -> tuple[Any, float]:
    start = time.perf_counter()
    xl = (config / "text_encoder_2").is_dir()
    pipe = (diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline).from_single_file(
        str(path), config=str(config), local_files_only=True, torch_dtype=placement.dtype
    )
    pipe.to(placement.device)
    sync(placement.device)
    seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    return pipe, seconds


def run_sdbatch(engine: Engine, batches: list[Batch]) -> list[Image.Image]:
    return [image for batch in batches for image in engine.run_batch(batch)]


def run_accelerated(engine: Engine, spec: RunSpec, batches: list[Batch]) -> list[Image.Image]:
    """The batches in a session of `spec`, as the runner makes them: the accelerators' patch and hooks apply."""
    with engine.session(spec):
        return run_sdbatch(engine, batches)


def accelerated_specs(args: argparse.Namespace, spec: RunSpec) -> dict[str, RunSpec]:
    """The sdbatch systems with one accelerator each, by label (--tome, --deepcache); none without them."""
    out = {}
    if args.tome:
        out[f"tome {args.tome:g}"] = dataclasses.replace(spec, perf=dataclasses.replace(spec.perf,
                                                                                        tome_ratio=args.tome))
    if args.deepcache:
        interval, branch = args.deepcache
        cache = DeepCacheConfig(interval=interval, branch=branch)
        out[f"deepcache {interval},{branch}"] = dataclasses.replace(spec, perf=dataclasses.replace(spec.perf,
                                                                                                   deepcache=cache))
    return out


def mean_abs_diff(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Mean absolute difference in 0-255 levels over all images and channels."""
    return float(np.mean([np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).mean()
                          for x, y in zip(a, b, strict=True)]))


def accelerator_numbers(rounds: list[Round], images: dict[str, list[Image.Image]]) -> dict[str, dict[str, float]]:
    """Per accelerated system: best seconds, ratio to diffusers' best, mean abs pixel difference to exact sdbatch."""
    baseline = best(rounds, "diffusers").seconds
    return {name: {"seconds": best(rounds, name).seconds, "ratio": best(rounds, name).seconds / baseline,
                   "mean_abs_diff": mean_abs_diff(images[name], images["sdbatch"])}
            for name in images if name not in ("sdbatch", "diffusers")}


def run_diffusers(pipe: Any, batches: list[Batch]) -> list[Image.Image]:
    """A plain StableDiffusionPipeline loop over the same batches: same prompts, seeds and settings."""
    images = []
    for batch in batches:
        jobs, key = batch.jobs, batch.key
        out = pipe(
            [j.prompt for j in jobs], negative_prompt=[j.negative_prompt for j in jobs],
            num_inference_steps=key.steps, guidance_scale=jobs[0].cfg_scale, eta=key.eta,
            height=key.height, width=key.width, output_type="pil",
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
        )
        images.extend(out.images)
    return images


@dataclasses.dataclass
class Round:
    system: str
    seconds: float
    parts: dict[str, float]  # unet, vae, text seconds

    @property
    def outside(self) -> float:
        return max(0.0, self.seconds - sum(self.parts.values())) / self.seconds


def timed_round(system: str, fn: Callable[[], list[Image.Image]], timers: Timers,
                memory: Memory, device: torch.device) -> tuple[Round, list[Image.Image]]:
    timers.take()
    with memory.phase(f"generate {system}"):
        sync(device)
        start = time.perf_counter()
        images = fn()
        sync(device)
        seconds = time.perf_counter() - start
    return Round(system, seconds, timers.take()), images


def runner_outputs(engine: Engine, spec: RunSpec, batches: list[Batch], images: list[Image.Image],
                   folder: Path) -> float:
    """Seconds the runner adds after the engine: config.yaml, PNGs with metadata, manifest lines."""
    start = time.perf_counter()
    out = RunDir(folder, resume=False)
    out.write_config({**to_plain(spec), "seed": spec.seed}, {engine.info.name: engine.info.hash})
    jobs = [job for batch in batches for job in batch.jobs]
    for job, image in zip(jobs, images, strict=True):
        out.save(image, image_params(job, engine.info, __version__))
    return time.perf_counter() - start


def max_pixel_diff(a: list[Image.Image], b: list[Image.Image]) -> tuple[int, float]:
    """(largest difference in 0-255 levels, share of differing channel values) over all images."""
    pairs = [(np.asarray(x).astype(int), np.asarray(y).astype(int)) for x, y in zip(a, b, strict=True)]
    return max(int(np.abs(x - y).max()) for x, y in pairs), float(np.mean([(x != y).mean() for x, y in pairs]))


# ---------------------------------------------------------------- the benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    widths = p.add_mutually_exclusive_group()
    widths.add_argument("--full", action="store_true", help="full SD1.5 widths instead of half")
    widths.add_argument("--tiny", action="store_true",
                        help="the tests' tiny SD1 model: seconds on a CPU, to check a script (bench/gpu.sh --dry-run)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl"],
                   help="sd1 (default) or sdxl: SDXL's layout against StableDiffusionXLPipeline")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (default: all)")
    p.add_argument("--rounds", type=int, default=0,
                   help="timed rounds per system; 0 = as many as fit in --budget (at least 1, at most 3)")
    p.add_argument("--budget", type=float, default=290.0, help="seconds the whole script aims to stay under")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of the untimed warm-up batch (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model weights")
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"images per batch (default {BATCH})")
    p.add_argument("--images", type=int, default=len(PROMPTS), help=f"images per round (default {len(PROMPTS)})")
    p.add_argument("--size", type=int, default=SIZE, help=f"width and height in pixels (default {SIZE})")
    p.add_argument("--steps", type=int, default=STEPS, help=f"DDIM steps (default {STEPS})")
    p.add_argument("--compile", action="store_true", help="perf.compile=true for sdbatch (diffusers stays eager)")
    p.add_argument("--channels-last", action="store_true", help="perf.channels_last=true for sdbatch")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="also time sdbatch with perf.tome_ratio=RATIO (token merging)")
    p.add_argument("--deepcache", type=_interval_branch, metavar="INTERVAL[,BRANCH]",
                   help="also time sdbatch with perf.deepcache.interval (and .branch, default 0)")
    p.add_argument("--json", type=Path, help="also write the key numbers to this JSON file")
    p.add_argument("--model-dir", type=Path,
                   help="keep the built model in this folder and reuse it in later runs (same widths and --seed)")
    return p.parse_args(argv)


def _interval_branch(text: str) -> tuple[int, int]:
    interval, _, branch = text.partition(",")
    return int(interval), int(branch or 0)


def warm_up(engine: Engine, pipe: Any, spec: RunSpec, steps: int) -> None:
    """Untimed batches through each system, other prompts than the timed ones (no text-cache head start).

    One batch of every size the timed rounds use (a last, smaller batch too): with perf.compile each new shape
    compiles again, which must not land in a timed round.
    """
    sizes = sorted({len(b.jobs) for b in batches_of(spec)}, reverse=True)
    for size in sizes:
        names = WARMUP_PROMPTS if size <= len(WARMUP_PROMPTS) else [f"warm-up {i}" for i in range(size)]
        warm = dataclasses.replace(spec, prompt=names[:size], batch_size=size,
                                   sampler=dataclasses.replace(spec.sampler, steps=steps))
        batch = batches_of(warm)[:1]
        run_sdbatch(engine, batch)
        run_diffusers(pipe, batch)


def stop_reason(args: argparse.Namespace, done: int, last_pair: float) -> str | None:
    """Why no further round is run after ``done`` rounds, or None to run one more."""
    if args.rounds:
        return f"--rounds {args.rounds}" if done >= args.rounds else None
    if done >= MAX_AUTO_ROUNDS:
        return f"at most {MAX_AUTO_ROUNDS} automatic rounds"
    end = time.perf_counter() - START + ROUND_MARGIN * last_pair + 5
    if end > args.budget:
        return (f"a further round would end at ~{end:.0f} s (last round +{ROUND_MARGIN - 1:.0%} margin), "
                f"past the {args.budget:.0f} s budget")
    return None


def alternate(args: argparse.Namespace, runs: dict[str, Callable[[], list[Image.Image]]], timers: Timers,
              memory: Memory, device: torch.device) -> tuple[list[Round], dict[str, list[Image.Image]], str]:
    """Timed rounds (sdbatch, [accelerated sdbatch ...,] diffusers), ... until stop_reason gives a reason."""
    rounds: list[Round] = []
    images: dict[str, list[Image.Image]] = {}
    reason = None
    while reason is None:
        for system, fn in runs.items():
            result, images[system] = timed_round(system, fn, timers, memory, device)
            rounds.append(result)
            print(f"  round {(len(rounds) - 1) // len(runs) + 1} {system:9s} {result.seconds:7.2f} s", flush=True)
        reason = stop_reason(args, len(rounds) // len(runs), sum(r.seconds for r in rounds[-len(runs):]))
    return rounds, images, reason


def prepare(args: argparse.Namespace, placement: Placement, memory: Memory, folder: Path) -> tuple[Engine, Any, dict]:
    """Build and save the model, then load it both ways, timed: (sdbatch engine, diffusers pipeline, facts)."""
    print(f"building {model_label(args.full, args.tiny, args.family)} ...", flush=True)
    with memory.phase("build + save"):
        start = time.perf_counter()
        if args.model_dir:
            path, config, params, reused = kept_checkpoint(args.model_dir, args.full, args.seed, args.tiny,
                                                           args.family)
        else:
            (path, config, params), reused = build_checkpoint(folder, args.full, args.seed, args.tiny,
                                                              args.family), False
        build_s = time.perf_counter() - start
    with memory.phase("load sdbatch"):
        bundle, sd_load = load_sdbatch(path, placement)
    mapped_after_load = file_rss_mib(path)
    with memory.phase("load diffusers"):
        pipe, df_load = load_diffusers(path, config, placement)
    spec = make_spec(path, args, placement.precision)
    loads = load_count()
    engine = get_engine(spec.model, spec.perf)
    assert load_count() == loads and engine.bundle is bundle, "get_engine reloaded instead of using the cache"
    facts = {
        "path": path, "spec": spec, "params": params, "build": build_s, "file_mib": path.stat().st_size / MiB,
        "reused": reused, "loads": (sd_load, df_load), "sha256": sha256_seconds(path),
        "mapped_after_load": mapped_after_load,
    }
    return engine, pipe, facts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    placement = pick_placement(args.device, args.precision, no_half_vae=False)
    memory, timers = Memory(placement.device), Timers(placement.device)
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-") as tmp:
        engine, pipe, facts = prepare(args, placement, memory, Path(tmp))
        spec, batches = facts["spec"], batches_of(facts["spec"])
        timers.wrap_models(engine.bundle.unet, engine.bundle.vae, engine.bundle.text_encoder,
                           engine.bundle.text_encoder_2)
        timers.wrap_models(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        if args.warmup_steps:
            sizes = " and one of ".join(map(str, sorted({len(b.jobs) for b in batches}, reverse=True)))
            print(f"untimed warm-up: one batch of {sizes} at {args.warmup_steps} step(s) through each ...", flush=True)
            warm_up(engine, pipe, spec, args.warmup_steps)
        runs = {"sdbatch": lambda: run_sdbatch(engine, batches)}
        for name, accelerated in accelerated_specs(args, spec).items():
            runs[name] = (lambda s: lambda: run_accelerated(engine, s, batches))(accelerated)
        runs["diffusers"] = lambda: run_diffusers(pipe, batches)
        rounds, images, facts["stopped"] = alternate(args, runs, timers, memory, placement.device)
        facts["runner"] = runner_outputs(engine, spec, batches, images["sdbatch"], Path(tmp) / "run")
        facts["same_scheduler"] = same_scheduler(pipe)
        facts["mapped"] = (facts["mapped_after_load"], file_rss_mib(facts["path"]))
        report(args, placement, rounds, images, memory, facts)
        if args.json:
            write_json(args.json, args, placement, rounds, len(batches), accelerator_numbers(rounds, images))


def sha256_seconds(path: Path) -> float:
    """Time to sha256 the whole file, as sdbatch's loader does for the A1111 model hash (measured apart)."""
    start = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            digest.update(chunk)
    return time.perf_counter() - start


def same_scheduler(pipe: Any) -> bool:
    ours = make_scheduler("ddim", "default", False)
    public = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    return type(pipe.scheduler) is type(ours) and all(pipe.scheduler.config.get(k) == v for k, v in public.items())


# ---------------------------------------------------------------- the report


def key_numbers(args: argparse.Namespace, precision: str, rounds: list[Round], batches: int) -> dict[str, Any]:
    """The best round of each system as wall seconds, it/s (UNet steps x batches per second) and images/s."""
    out: dict[str, Any] = {
        "full": args.full, "tiny": args.tiny, "device": args.device, "precision": precision, "size": args.size,
        "steps": args.steps, "batch": args.batch_size, "images": args.images, "batches": batches,
        "compile": args.compile, "channels_last": args.channels_last,
        "rounds": sum(r.system == "diffusers" for r in rounds),
    }
    for system in ("sdbatch", "diffusers"):
        seconds = best(rounds, system).seconds
        out[system] = {"seconds": seconds, "it_s": args.steps * batches / seconds, "images_s": args.images / seconds}
    out["ratio"] = out["sdbatch"]["seconds"] / out["diffusers"]["seconds"]  # as printed: < 1 = sdbatch faster
    return out


def write_json(path: Path, args: argparse.Namespace, placement: Placement, rounds: list[Round],
               batches: int, accelerators: dict[str, dict[str, float]]) -> None:
    numbers = {**key_numbers(args, placement.precision, rounds, batches), **({"accelerators": accelerators}
                                                                             if accelerators else {})}
    path.write_text(json.dumps(numbers, indent=1) + "\n")


def best(rounds: list[Round], system: str) -> Round:
    return min((r for r in rounds if r.system == system), key=lambda r: r.seconds)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(args: argparse.Namespace, placement: Placement, rounds: list[Round],
           images: dict[str, list[Image.Image]], memory: Memory, info: dict[str, Any]) -> None:
    n = len(rounds) // len(images)
    s, d = best(rounds, "sdbatch"), best(rounds, "diffusers")
    sd_load, df_load = info["loads"]
    print()
    made = f"reused from {args.model_dir}" if info["reused"] else f"built and saved in {info['build']:.1f} s"
    print(f"model: {model_label(args.full, args.tiny, args.family)}, {info['params'] / 1e6:.0f}M parameters, "
          f"single file {info['file_mib']:.0f} MiB ({made})")
    print(f"device: {placement.device} ({placement.precision}), torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    print(f"workload: {args.images} images {args.size}x{args.size}, {args.steps} DDIM steps, CFG {CFG}, "
          f"batch {args.batch_size}, seeds {BASE_SEED}-{BASE_SEED + args.images - 1}, per-image CPU generators"
          + _perf_label(args))
    warm = (f"untimed warm-up of each ({args.warmup_steps} step, batch {args.batch_size}), then "
            if args.warmup_steps else "")
    print(f"schedule: {warm}{n} alternating round(s) of {', then '.join(images)}, best of each reported; "
          f"stopped: {info['stopped']}")
    print()
    print("| | sdbatch | diffusers | sdbatch / diffusers |")
    print("|---|---|---|---|")
    print(f"| {args.images} images, wall | {s.seconds:.1f} s | {d.seconds:.1f} s | {s.seconds / d.seconds:.2f} |")
    for key, label in (("unet", "UNet forward"), ("vae", "VAE decode"), ("text", "text-encoder forward")):
        print(f"| of which {label} | {s.parts[key]:.2f} s | {d.parts[key]:.2f} s | |")
    print(f"| outside those passes | {s.seconds * s.outside:.2f} s = {_pct(s.outside)} "
          f"| {d.seconds * d.outside:.2f} s = {_pct(d.outside)} | |")
    print(f"| load, single file → ready | {sd_load:.2f} s | {df_load:.2f} s | {sd_load / df_load:.2f} |")
    for phase, label in (("load", "load"), ("generate", "generate")):
        print(f"| peak memory, {label} | {_mem(memory, f'{phase} sdbatch')} | {_mem(memory, f'{phase} diffusers')} | |")
    for name, numbers in accelerator_numbers(rounds, images).items():
        print(f"| sdbatch with {name}, wall | {numbers['seconds']:.1f} s | {d.seconds:.1f} s | "
              f"{numbers['ratio']:.2f} |")
    print()
    for name, numbers in accelerator_numbers(rounds, images).items():
        print(f"{name}: mean absolute pixel difference to sdbatch's exact images {numbers['mean_abs_diff']:.2f} "
              "levels of 255 (the price of the speed)")
    print("rounds: " + ", ".join(f"{r.system} {r.seconds:.1f} s" for r in rounds))
    print(f"runner's extra cost after the engine (config.yaml + {args.images} PNGs with metadata + manifest): "
          f"{info['runner']:.2f} s ({_pct(info['runner'] / s.seconds)} of sdbatch's wall time)")
    print(f"peak memory, build + save: {_mem(memory, 'build + save')}; {memory.method()}; "
          "'+N' = above the memory in use when the phase began")
    _print_mapped(info["mapped"])
    _print_check(images, info["same_scheduler"])
    lazy = ", lazy (weights stay memory-mapped)" if placement.device.type == "cpu" else ""
    print(f"load: sdbatch load_models(file) after clear_model_cache(){lazy}, including "
          f"the sha256 of the whole file for the A1111 model hash ({info['sha256']:.2f} s of it, timed apart); "
          "diffusers StableDiffusionPipeline.from_single_file(file, config=<local folder with configs and "
          "tokenizer only>, local_files_only=True), weights copied")
    print(f"text encoder: sdbatch encodes each distinct prompt once per process ({args.images} prompts + 1 "
          f"shared negative); diffusers encodes {args.images} prompts + {args.images} negatives per round")
    print(f"total script time: {time.perf_counter() - START:.0f} s")


def _perf_label(args: argparse.Namespace) -> str:
    """The sdbatch-only options, or nothing (the default output stays as it was)."""
    options = [name for name, on in (("perf.compile", args.compile), ("perf.channels_last", args.channels_last)) if on]
    return f"; sdbatch with {' and '.join(options)} (diffusers eager)" if options else ""


def _mem(memory: Memory, phase: str) -> str:
    p = memory.peaks.get(phase)
    if p is None:
        return "n/a"
    if "cpu_delta" in p:
        text = f"RSS {p['cpu']:.0f} MiB (+{p['cpu_delta']:.0f})"
    else:
        text = f"{p['cpu']:.0f} MiB (+{p['cpu'] - p['cpu_start']:.0f})"
    if "gpu" in p:
        text += f", GPU {p['gpu']:.0f} MiB (+{p['gpu'] - p['gpu_start']:.0f})"
    return text


def _print_mapped(mapped: tuple[float | None, float | None]) -> None:
    after_load, after_generate = mapped
    if after_load is None or after_generate is None or after_generate < 1:
        return
    print(f"sdbatch's weights stay memory-mapped from the checkpoint (safetensors mmap): {after_load:.0f} MiB "
          f"of the file resident after loading, {after_generate:.0f} MiB after generating; they enter RSS "
          "when first touched, so they show in the generate phase rather than in the load phase")


def _print_check(images: dict[str, list[Image.Image]], same_scheduler: bool) -> None:
    a, b = images["sdbatch"], images["diffusers"]
    sizes = {im.size for im in a + b}
    size = "x".join(map(str, next(iter(sizes)))) if len(sizes) == 1 else f"MISMATCH {sorted(sizes)}"
    diff, share = max_pixel_diff(a, b)
    print(f"images: {len(a)} + {len(b)}, all {size}; max pixel difference sdbatch vs diffusers: {diff} levels "
          f"({100 * share:.2f}% of values differ); scheduler config identical: {same_scheduler}")


if __name__ == "__main__":
    main()

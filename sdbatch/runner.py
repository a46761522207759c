"""One run: plan → batch → engine → outputs, with progress bars and resume."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from sdbatch import __version__
from sdbatch.batching import make_batches
from sdbatch.config.resolve import to_plain
from sdbatch.config.schema import RunSpec
from sdbatch.outputs import CONFIG, RunDir, image_params
from sdbatch.planning import plan, random_base_seed
from sdbatch.prompts.sources import read_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: Path
    written: list[Path]  # images made by this run
    skipped: int  # images already done by an earlier run into the same directory (resume)


def run(spec: RunSpec, run_dir: Path) -> RunResult:
    """Generate every image of the run spec into run_dir; images already done there are skipped."""
    out = RunDir(run_dir, resume=spec.output.resume)
    base_seed = _base_seed(spec, run_dir)
    lines = read_prompts(spec.prompt, spec.negative_prompt, spec.prompt_file)
    jobs = plan(spec, lines, base_seed)
    todo = [job for job in jobs if not out.is_done(job)]
    from sdbatch.engine.engine import get_engine  # torch loads only once there is work to do

    engine = get_engine(spec.model, spec.perf)
    out.write_config({**to_plain(spec), "seed": base_seed}, engine.model_hashes())
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d images already in %s <output.resume>", len(jobs) - len(todo), len(jobs), run_dir)
    written = _generate(engine, out, todo, spec, len(jobs))
    if spec.output.grid:
        cols = spec.images_per_prompt if spec.images_per_prompt > 1 else math.ceil(math.sqrt(len(jobs)))
        out.save_grid([job.file_name for job in jobs], cols)
    return RunResult(run_dir, written, len(jobs) - len(todo))


def _generate(engine, out: RunDir, todo: list, spec: RunSpec, total: int) -> list[Path]:
    written = []
    show = spec.perf.progress
    with tqdm(total=total, initial=total - len(todo), desc="images", unit="img", disable=not show) as bar:
        for batch in make_batches(todo, spec.batch_size):
            steps = tqdm(desc="steps", unit="step", leave=False, disable=not show)
            images = engine.run_batch(batch, on_step=lambda info, s=steps: _tick(s, info))
            steps.close()
            for job, image in zip(batch.jobs, images, strict=True):
                written.append(out.save(image, image_params(job, engine.info, __version__)))
                bar.update(1)
    return written


def _tick(bar: tqdm, info: dict) -> None:
    bar.total = info["total"]
    bar.update(1)


def _base_seed(spec: RunSpec, run_dir: Path) -> int:
    """The run's base seed: `seed`, or the one an earlier run recorded in this directory, or a new one."""
    if spec.seed is not None:
        return spec.seed
    recorded = run_dir / CONFIG
    if spec.output.resume and recorded.exists():
        seed = (yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}).get("seed")
        if isinstance(seed, int):
            return seed
    return random_base_seed()

"""One run: prompts → plan → batch → engine → outputs, with progress bars, resume and interactive mode."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml
from tqdm import tqdm

from sdbatch import __version__
from sdbatch.cli.info import show_network_meta
from sdbatch.cli.progress import console_through_tqdm
from sdbatch.cli.startup import heavy_imports
from sdbatch.config.resolve import to_plain
from sdbatch.config.spec import RunSpec
from sdbatch.errors import PromptError
from sdbatch.outputs.background_writer import BackgroundWriter
from sdbatch.outputs.files import Interrupted
from sdbatch.outputs.gallery import RunGallery
from sdbatch.outputs.metadata import image_params
from sdbatch.outputs.run_dir import CONFIG, RunDir
from sdbatch.plan.batching import make_batches
from sdbatch.plan.grid import Sheet
from sdbatch.plan.guides import assign_guides
from sdbatch.plan.jobs import ImageJob
from sdbatch.plan.lora_tags import apply_tags
from sdbatch.plan.planner import plan, random_base_seed
from sdbatch.plan.regions import assign_masks
from sdbatch.plan.stage import plan_run
from sdbatch.prompts.sources import PromptLine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: Path
    written: list[Path]  # images made by this run
    skipped: int  # images already done by an earlier run into the same directory (resume)


def run(spec: RunSpec, run_dir: Path, stdin: TextIO | None = None) -> RunResult:
    """Generate every image of the run spec into run_dir; images already done there are skipped.

    The run holds run_dir's writer lock throughout (a second process into it fails with OutputError); an
    interrupt (`Interrupted`) leaves with how many of the run's images are done.
    """
    gallery = RunGallery(run_dir, spec.output.gallery)
    out = _run_dir(run_dir, spec, gallery.saved)
    with out.locked(), _progress(out), console_through_tqdm(spec.perf.progress):  # log lines above the bars
        try:
            return _run_locked(spec, out, run_dir, stdin)
        finally:  # done, failed or interrupted: the page stops reloading (under the lock: it is this run's page)
            gallery.finish()


def _run_dir(run_dir: Path, spec: RunSpec, on_save: Callable[[], None] | None = None) -> RunDir:
    """The run directory with the run's output settings (resume, image quality, sidecars, the gallery page)."""
    return RunDir(run_dir, resume=spec.output.resume, quality=spec.output.quality, sidecar=spec.output.sidecar,
                  on_save=on_save)


@contextlib.contextmanager
def _progress(out: RunDir, jobs: list[ImageJob] | None = None, todo: list[ImageJob] | None = None) -> Iterator[None]:
    """Give an interrupt the run's progress: images done of the run's images (None before planning)."""
    try:
        yield
    except Interrupted as ex:
        if ex.done is None:
            if jobs is None:  # interactive mode, or not planned yet
                ex.done = len(out.saved)
            else:
                made = set(out.saved) & {job.file_name for job in todo or []}
                ex.done, ex.total = len(jobs) - len(todo or []) + len(made), len(jobs)
        raise


def _run_locked(spec: RunSpec, out: RunDir, run_dir: Path, stdin: TextIO | None) -> RunResult:
    base_seed = _base_seed(spec, run_dir)
    if spec.interactive:
        try:
            return _run_interactive(spec, out, base_seed, stdin or sys.stdin)
        except Interrupted as ex:  # Ctrl-C ends an interactive session: nothing to resume
            ex.interactive = True
            raise
    # a prompt module may use the models, so they load first; otherwise prompt errors come before loading
    engine = _engine(spec) if spec.prompt_module else None
    planned = plan_run(spec, base_seed, engine)
    jobs = planned.jobs
    todo = [job for job in jobs if not out.is_done(job)]
    damaged = out.damaged(jobs)
    if damaged:
        log.warning("resume: %d image(s) listed in %s are missing or damaged and will be made again: %s",
                    len(damaged), out.manifest, ", ".join(damaged[:20]) + (", ..." if len(damaged) > 20 else ""))
    with _progress(out, jobs, todo):
        engine = engine or _engine(spec)
        show_network_meta(planned.network)
        with engine.session(dataclasses.replace(spec, network=planned.network)):  # with the files of <lora:> tags
            out.write_config({**to_plain(spec), "seed": base_seed}, engine.model_hashes())
            if len(todo) < len(jobs):
                log.info("resuming: %d of %d images already in %s <output.resume>", len(jobs) - len(todo),
                         len(jobs), run_dir)
            encoded_before = engine.text.encoded
            written = _generate(engine, out, todo, spec, len(jobs))
        # what the per-process caches saved: a multirun's later jobs reuse the model and the prompt encodings
        log.info("text encoder ran for %d prompt(s) in this run; %d model load(s) in this process <caches>",
                 engine.text.encoded - encoded_before, load_count())
        if planned.axes:
            _save_sheets(out, planned.sheets())
        elif spec.output.grid:
            cols = spec.images_per_prompt if spec.images_per_prompt > 1 else math.ceil(math.sqrt(len(jobs)))
            out.save_grid([job.file_name for job in jobs], cols)
    return RunResult(run_dir, written, len(jobs) - len(todo))


def _save_sheets(out: RunDir, grid_sheets: list[Sheet]) -> None:
    """The fused grid's labelled X/Y sheets (grid.png, or grid-z1.png ... with a z axis)."""
    from PIL import Image

    from sdbatch.outputs.contact_sheet import labelled_grid

    for sheet in grid_sheets:
        images = [[Image.open(out.path / name).convert("RGB") for name in row] for row in sheet.rows]
        out.save_sheet(labelled_grid(images, sheet.x_labels, sheet.y_labels, title=sheet.title), sheet.name)


def load_count() -> int:
    from sdbatch.engine.models.loading import load_count as count  # torch is loaded by now

    return count()


def import_engine() -> None:
    """Import the engine (torch, diffusers) if not done yet, freezing what the imports built (heavy_imports).

    A multirun job calls this before its run, from a shallow frame. The freeze also keeps the frames on the stack
    at that moment, each with its locals once it returns: imported from `_engine`, deep in the run, the first
    job's engine, and with it its model, stayed for good.
    """
    with heavy_imports():
        import sdbatch.engine.core.engine  # noqa: F401


def _engine(spec: RunSpec):
    with heavy_imports():
        from sdbatch.engine.core.engine import get_engine  # torch loads only once there is work to do

    return get_engine(spec.model, spec.perf)


def _run_interactive(spec: RunSpec, out: RunDir, base_seed: int, stream: TextIO) -> RunResult:
    """Read prompt lines from `stream` and generate each as it comes; print the saved paths."""
    from sdbatch.prompts.interactive import preview_available, read_lines, report_saved, show_preview

    engine = _engine(spec)
    show_network_meta(spec.network)
    with engine.session(spec):  # the run's embeddings are loaded: their hashes go into config.yaml
        out.write_config({**to_plain(spec), "seed": base_seed}, engine.model_hashes())
    spec = dataclasses.replace(spec, n_iter=1)  # one pass per typed line, as the reference does
    preview, taken, written = preview_available(spec.no_preview), out.done_files(), []
    network = None
    with contextlib.ExitStack() as session:
        for number, text in enumerate(read_lines(stream), start=1):
            line = PromptLine(text, spec.negative_prompt, f"stdin:{number}")
            try:
                start = len(taken)  # plan() adds the line's names to `taken`
                planned = plan(spec, [line], base_seed, start=start, taken=taken)
                planned = assign_masks(assign_guides(planned, spec, start=start), spec, start=start)
                jobs, line_network = apply_tags(planned, spec.network, spec.paths.models)
            except PromptError as ex:  # a typo in one line should not end the session
                log.error("%s", ex)
                continue
            if line_network != network:  # a line's <lora:...> tags may bring other files: a new patch session
                session.close()
                show_network_meta(line_network)
                session.enter_context(engine.session(dataclasses.replace(spec, network=line_network)))
                network = line_network
            saved = _generate(engine, out, jobs, spec, len(jobs))
            report_saved(saved)
            if preview:
                show_preview(saved, text)
            written += saved
    return RunResult(out.path, written, 0)


def _generate(engine, out: RunDir, todo: list[ImageJob], spec: RunSpec, total: int) -> list[Path]:
    """Run the batches; where a CPU core is free (`engine.cpu_to_spare`), each batch's images are written by the
    background writer while the next one denoises (two batches may wait); all are on disk when this returns or
    raises."""
    written = []
    show = spec.perf.progress
    # leave=None: the bar stays after a single run; in a multirun it sits below the sweep's bar and goes
    depth = 2 * spec.batch_size if engine.cpu_to_spare else 0
    with tqdm(total=total, initial=total - len(todo), desc="images", unit="img", disable=not show,
              leave=None) as bar, BackgroundWriter(out, depth) as writer:
        for batch in make_batches(todo, spec.batch_size, per_image_networks=spec.network.mode == "hooked"):
            with tqdm(desc="steps", unit="step", leave=False, disable=not show) as steps:  # cleared on an interrupt too
                images = engine.run_batch(batch, on_step=lambda info, s=steps: _tick(s, info))
            for stage in engine.stage_images:  # images made on the way that the run keeps (--save_first_stage)
                if stage.save:
                    params = image_params(stage.job, engine.info, __version__, engine.vae_fallback, engine.records)
                    written.append(writer.submit(stage.image, {**params, **stage.extra}))
            for job, image in zip(batch.jobs, images, strict=True):
                written.append(writer.submit(image, image_params(job, engine.info, __version__, engine.vae_fallback,
                                                                 engine.records)))
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


def pending_images(spec: RunSpec, run_dir: Path) -> tuple[int, int] | None:
    """(images the run plans, images not yet done in run_dir), without loading any model.

    None when planning needs the models or standard input (prompt_module, interactive). Lets a multirun
    job that was finished by an earlier attempt skip itself quickly (sdbatch.cli.hydra_app).
    """
    if spec.interactive or spec.prompt_module:
        return None
    out = _run_dir(run_dir, spec)
    jobs = plan_run(spec, _base_seed(spec, run_dir)).jobs
    return len(jobs), sum(1 for job in jobs if not out.is_done(job))

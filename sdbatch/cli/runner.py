"""One run: prompts → plan → batch → engine → outputs, with progress bars, resume and interactive mode."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml
from tqdm import tqdm

from sdbatch import __version__
from sdbatch.plan.batching import make_batches
from sdbatch.config.resolve import grid_axes, to_plain
from sdbatch.config.spec import NetworkConfig, RunSpec
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.grid import Sheet, check_search_word, expand, search_replace, sheets
from sdbatch.prompts.init_images import list_images, pair_with_images, prompt_from_image
from sdbatch.plan.jobs import ImageJob
from sdbatch.outputs.run_dir import CONFIG, RunDir, image_params
from sdbatch.plan.planner import plan, random_base_seed
from sdbatch.prompts.extra_networks import apply_tags
from sdbatch.prompts.sources import PromptLine, read_prompts
from sdbatch.cli.startup import heavy_imports

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: Path
    written: list[Path]  # images made by this run
    skipped: int  # images already done by an earlier run into the same directory (resume)


def run(spec: RunSpec, run_dir: Path, stdin: TextIO | None = None) -> RunResult:
    """Generate every image of the run spec into run_dir; images already done there are skipped."""
    try:
        return _run(spec, run_dir, stdin)
    finally:  # a cached model leaves every run plain, whatever networks the run patched onto it
        if "sdbatch.engine.core.engine" in sys.modules:
            sys.modules["sdbatch.engine.core.engine"].clear_networks()


def _run(spec: RunSpec, run_dir: Path, stdin: TextIO | None) -> RunResult:
    out = RunDir(run_dir, resume=spec.output.resume)
    base_seed = _base_seed(spec, run_dir)
    if spec.interactive:
        return _run_interactive(spec, out, base_seed, stdin or sys.stdin)
    # a prompt module may use the models, so they load first; otherwise prompt errors come before loading
    engine = _engine(spec) if spec.prompt_module else None
    jobs, axes, base_count, network = _all_jobs(spec, _prompt_lines(spec, engine), base_seed)
    todo = [job for job in jobs if not out.is_done(job)]
    engine = engine or _engine(spec)
    engine.set_networks(network)  # network.loras and the files of <lora:...> tags
    out.write_config({**to_plain(spec), "seed": base_seed}, engine.model_hashes())
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d images already in %s <output.resume>", len(jobs) - len(todo), len(jobs), run_dir)
    encoded_before = engine.text.encoded
    written = _generate(engine, out, todo, spec, len(jobs))
    # what the per-process caches saved: a multirun's later jobs reuse the model and the prompt encodings
    log.info("text encoder ran for %d prompt(s) in this run; %d model load(s) in this process <caches>",
             engine.text.encoded - encoded_before, load_count())
    if axes:
        _save_sheets(out, sheets(jobs, axes, base_count))
    elif spec.output.grid:
        cols = spec.images_per_prompt if spec.images_per_prompt > 1 else math.ceil(math.sqrt(len(jobs)))
        out.save_grid([job.file_name for job in jobs], cols)
    return RunResult(run_dir, written, len(jobs) - len(todo))


def _all_jobs(spec: RunSpec, lines: list[PromptLine], base_seed: int,
              ) -> tuple[list[ImageJob], list, int, NetworkConfig]:
    """(every image of the run, the fused-grid axes, the number of planned images before grid expansion,
    the run's networks: network.loras plus the files <lora:...> tags name)."""
    jobs = plan(spec, lines, base_seed)
    if spec.prompt_sr is not None:  # one word of a +sweeps=prompt_sr multirun
        check_search_word(jobs, spec.prompt_sr_words[0], "prompt_sr_words")
        jobs = [search_replace(job, spec.prompt_sr_words[0], spec.prompt_sr) for job in jobs]
    axes, base_count = grid_axes(spec), len(jobs)
    if axes:  # a fused grid: each planned image becomes one image per cell
        jobs = expand(jobs, axes, spec.output.naming, spec.network)
    jobs, network = apply_tags(jobs, spec.network)  # after the grid: an axis may write tags into prompts
    return jobs, axes, base_count, network


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


def _engine(spec: RunSpec):
    with heavy_imports():
        from sdbatch.engine.core.engine import get_engine  # torch loads only once there is work to do

    engine = get_engine(spec.model, spec.perf)
    # run-level prompt settings; both are part of the text cache key, so a shared engine stays correct
    engine.text.max_multiples = spec.max_embeddings_multiples
    engine.text.normalize = spec.emb_normalize_mode
    engine.set_textual_inversion(spec.model.textual_inversion, spec.model.xti_embeddings)  # this run's, exactly
    return engine


def _prompt_lines(spec: RunSpec, engine) -> list[PromptLine]:
    """prompt_file lines, then inline prompts, then what prompt_module yields; with init images attached."""
    lines = []
    if spec.prompt_file or spec.prompt:
        lines = read_prompts(spec.prompt, spec.negative_prompt, spec.prompt_file)
    if spec.prompt_module:
        from sdbatch.prompts.module import load_prompter

        lines += list(load_prompter(spec.prompt_module, spec, engine))
    if spec.init_image is None:
        return lines
    images = list_images(spec.init_image)
    masks = _masks_of(spec, images)
    if not lines:  # no prompt given: each image brings back the prompt it was made with
        return [dataclasses.replace(_stored_prompt(image, spec), init_image=str(image), mask_image=masks[image])
                for image in images]
    return [dataclasses.replace(line, init_image=str(image), mask_image=masks[image])
            for line, image in pair_with_images(lines, images)]


def _masks_of(spec: RunSpec, images: list[Path]) -> dict[Path, str | None]:
    """The mask of each init image: mask_image's files in turn (init image i gets mask i, cycled)."""
    if spec.mask_image is None:
        return dict.fromkeys(images)
    masks = list_images(spec.mask_image, "mask_image")
    if len(masks) > 1 and len(masks) != len(images):
        log.warning("%d init images but %d masks: the masks are used in turn (cycled) <mask_image>",
                    len(images), len(masks))
    return {image: str(masks[i % len(masks)]) for i, image in enumerate(images)}


def _stored_prompt(image: Path, spec: RunSpec) -> PromptLine:
    line = prompt_from_image(image, spec.negative_prompt)
    if line is None:
        raise ConfigError(f"init_image {image} carries no prompt in its metadata; give prompt='...'")
    return line


def _run_interactive(spec: RunSpec, out: RunDir, base_seed: int, stream: TextIO) -> RunResult:
    """Read prompt lines from `stream` and generate each as it comes; print the saved paths."""
    from sdbatch.prompts.interactive import preview_available, read_lines, report_saved, show_preview

    engine = _engine(spec)
    out.write_config({**to_plain(spec), "seed": base_seed}, engine.model_hashes())
    spec = dataclasses.replace(spec, n_iter=1)  # one pass per typed line, as the reference does
    preview, taken, written = preview_available(spec.no_preview), out.done_files(), []
    network = None
    for number, text in enumerate(read_lines(stream), start=1):
        line = PromptLine(text, spec.negative_prompt, f"stdin:{number}")
        try:
            jobs, line_network = apply_tags(plan(spec, [line], base_seed, start=len(taken), taken=taken), spec.network)
        except PromptError as ex:  # a typo in one line should not end the session
            log.error("%s", ex)
            continue
        if line_network != network:  # a line's <lora:...> tags may bring other files
            engine.set_networks(line_network)
            network = line_network
        saved = _generate(engine, out, jobs, spec, len(jobs))
        report_saved(saved)
        if preview:
            show_preview(saved, text)
        written += saved
    return RunResult(out.path, written, 0)


def _generate(engine, out: RunDir, todo: list[ImageJob], spec: RunSpec, total: int) -> list[Path]:
    written = []
    show = spec.perf.progress
    with tqdm(total=total, initial=total - len(todo), desc="images", unit="img", disable=not show) as bar:
        for batch in make_batches(todo, spec.batch_size, per_image_networks=spec.network.mode == "hooked"):
            steps = tqdm(desc="steps", unit="step", leave=False, disable=not show)
            tick = lambda info, s=steps: _tick(s, info)  # noqa: E731
            if batch.key.highres is not None:
                first, images = engine.run_highres(batch, on_step=tick)
                if batch.key.highres.save_first_stage:
                    written += _save_first_stage(engine, out, batch.jobs, first)
            else:
                images = engine.run_batch(batch, on_step=tick)
            steps.close()
            for job, image in zip(batch.jobs, images, strict=True):
                if job.mask_image and spec.inpaint.keep_original:
                    from sdbatch.engine.features.inpaint import paste_original

                    image = paste_original(image, job.init_image, job.mask_image)
                written.append(out.save(image, image_params(job, engine.info, __version__)))
                bar.update(1)
    return written


def _save_first_stage(engine, out: RunDir, jobs: tuple[ImageJob, ...], images: list) -> list[Path]:
    """highres.save_first_stage: NAME-first.png per image, its own txt2img parameters and "stage": 1."""
    from sdbatch.plan.highres_stage import first_stage_job

    return [out.save(image, {**image_params(first_stage_job(job), engine.info, __version__), "stage": 1})
            for job, image in zip(jobs, images, strict=True)]


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
    out = RunDir(run_dir, resume=spec.output.resume)
    jobs, _, _, _ = _all_jobs(spec, _prompt_lines(spec, None), _base_seed(spec, run_dir))
    return len(jobs), sum(1 for job in jobs if not out.is_done(job))

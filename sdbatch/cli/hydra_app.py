"""Command-line glue: the Hydra task (a run or one multirun job), one-line errors (exit status 2), sweep resolvers."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdbatch.cli.progress import end_sweep_progress
from sdbatch.cli.quoting import hydra_quoted, quoting_hint
from sdbatch.config.grid_axes import axis_given
from sdbatch.config.resolve import resolve
from sdbatch.config.spec import RunSpec
from sdbatch.errors import SdbatchError
from sdbatch.outputs.files import Interrupted, describe_os_error, ignore_interrupts, install_interrupt_handlers
from sdbatch.outputs.sweep_index import (
    FAILED_STATUSES,
    in_process,
    last_sweep,
    request_stop,
    started_output_dir,
    stop_requested,
    swept_keys,
    write_job_result,
)

if TYPE_CHECKING:
    from sdbatch.cli.runner import RunResult

log = logging.getLogger("sdbatch")

# launcher package (hydra_plugins.<name>) → (sdbatch extra, PyPI package)
_LAUNCHER_EXTRAS = {
    "hydra_joblib_launcher": ("joblib", "hydra-joblib-launcher"),
    "hydra_submitit_launcher": ("slurm", "hydra-submitit-launcher"),
    "hydra_ray_launcher": ("ray", "hydra-ray-launcher"),
}

# conf/hydra/launcher/*.yaml set sdbatch's defaults for the plugins' launchers under the same names, and
# Hydra still validates them against the plugins' schemas; it warns that this matching is deprecated.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/[^']+' is validated against ConfigStore schema")

# how to resume, for the line an interrupt prints; set by the task (the run's or the sweep's directory)
_RESUME: dict[str, Any] = {"multirun": None, "hint": None}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

def task(cfg: DictConfig) -> None:
    """The Hydra task: resolve the composed config and run it into Hydra's output directory.

    A single run reports a user mistake in one line and exits with status 2. A multirun job never raises:
    it records its outcome in job.json, so the other jobs run, and `guarded` sets the exit status at the end.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    _RESUME.update(multirun=hydra_cfg.mode == RunMode.MULTIRUN, hint=resume_hint(hydra_cfg))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        _sweep_job(cfg, hydra_cfg, run_dir)
        return
    try:
        _run(resolve(cfg), run_dir)
    except SdbatchError as ex:
        # Exit here: past this point Hydra would print its own "Error executing job" line first.
        print(f"sdbatch: error: {ex}", file=sys.stderr)
        _drop_if_empty(run_dir)
        raise SystemExit(2) from None


def _drop_if_empty(run_dir: Path) -> None:
    """A run that failed before writing anything leaves no folder of Hydra's logs behind (nor an emptied
    outputs/DATE/ folder); a folder holding anything else (images, a manifest, earlier runs) stays."""
    hydra_only = {".hydra", "run.log"}
    try:
        if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - hydra_only:
            return
        shutil.rmtree(run_dir)
        date, root = run_dir.parent, run_dir.parent.parent  # the default outputs/DATE/TIME
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.name) and not any(date.iterdir()):
            date.rmdir()
            if root.name == "outputs" and not any(root.iterdir()):
                root.rmdir()
    except OSError:  # best effort: the error line above is what matters
        pass


def _run(spec: RunSpec, run_dir: Path) -> RunResult:
    from sdbatch.cli.runner import run

    result = None
    try:
        result = run(spec, run_dir)
    finally:
        made = f"{len(result.written)} new image(s), {result.skipped} already done; " if result else ""
        log.info("%sOutput dir: %s", made, run_dir)
    return result


def _sweep_job(cfg: DictConfig, hydra_cfg: DictConfig, run_dir: Path) -> None:
    """One job of a multirun: run (or skip when done, or cancel after stop_on_error) and write job.json."""
    start = time.perf_counter()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    result: dict[str, Any] = {"num": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task),
                              "status": "failed", "new_images": None, "device": None, "error": None}
    try:
        stop = stop_requested(sweep_dir)
        if stop is not None:
            result.update(status="cancelled", error=f"not run: {stop}")
        else:
            spec = _job_spec(resolve(cfg), hydra_cfg)
            result["device"] = spec.perf.device
            result.update(_run_or_skip(spec, run_dir))
    except Exception as ex:  # noqa: BLE001 - any failure of one job must leave the others running
        result["error"] = _describe(ex)
        unexpected = not isinstance(ex, SdbatchError | OmegaConfBaseException)
        log.error("job %s failed: %s", hydra_cfg.job.num, result["error"], exc_info=unexpected)
        if _disk_full(ex):  # every later job would fail the same way: stop the sweep
            result["disk_full"] = True
            request_stop(sweep_dir, f"the disk is full (job {hydra_cfg.job.num} could not write)")
        elif OmegaConf.select(hydra_cfg, "callbacks.sweep_index.stop_on_error", default=False):
            request_stop(sweep_dir)
    except Interrupted as ex:  # recorded, then the whole sweep ends (guarded prints the line)
        ex.job = int(hydra_cfg.job.num)
        progress = f" after {ex.done} of {ex.total} images" if ex.total is not None else ""
        result.update(error=f"interrupted ({signal.Signals(ex.signum).name}){progress}")
        result["seconds"] = round(time.perf_counter() - start, 3)
        with contextlib.suppress(OSError):
            write_job_result(run_dir, result)
        raise
    result["seconds"] = round(time.perf_counter() - start, 3)
    try:
        write_job_result(run_dir, result)
    except OSError as ex:  # the result stays in this process for sweep.jsonl; a full disk stops the sweep
        message = describe_os_error(ex, run_dir / "job.json")
        log.error("job %s: %s", hydra_cfg.job.num, message)
        if ex.errno in _DISK_FULL:
            result["error"] = result["error"] or message  # `result` is the copy kept for sweep.jsonl
            result["disk_full"] = True
            request_stop(sweep_dir, f"the disk is full (job {hydra_cfg.job.num} could not write)")


def _disk_full(ex: BaseException | None) -> bool:
    """Whether the error (or one it was raised from or during) is a full disk or quota."""
    seen = 0
    while ex is not None and seen < 10:
        if getattr(ex, "errno", None) in _DISK_FULL:
            return True
        ex, seen = ex.__cause__ or ex.__context__, seen + 1
    return False


def resume_hint(hydra_cfg: DictConfig) -> str:
    """What to rerun to resume: the same command, with the run (or sweep) directory when it was not given
    (the default directories carry the time, so the same command alone would start a new one)."""
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = any(str(o).startswith(f"{key}=") for o in hydra_cfg.overrides.hydra)
    folder = "" if given else f" with {key}={shlex.quote(str(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir))}"
    if multirun:
        return f"rerun the same -m command{folder} to resume; finished jobs are skipped"
    return f"rerun the same command{folder} to resume"


def interrupted_line(ex: BaseException) -> str:
    """The one line an interrupt prints: how far the run got and how to resume."""
    done, total, job = (getattr(ex, name, None) for name in ("done", "total", "job"))
    multirun = _RESUME["multirun"]
    if multirun is None:  # interrupted before the task started
        multirun = "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]
    hint = _RESUME["hint"] or ("rerun the same -m command to resume; finished jobs are skipped" if multirun
                               else "rerun the same command to resume")
    if done is None:  # before the run planned its images; in a multirun, between jobs or in a launcher's worker
        where = "" if multirun else " before the first image"
    elif total is None:
        where = f" after {done} image(s)"
    else:
        where = f" after {done} of {total} images"
    if job is not None:
        where += f" in job {job}"
    if getattr(ex, "interactive", False):
        return f"sdbatch: interrupted{where}; the interactive session's images are kept"
    return f"sdbatch: interrupted{where}; {hint}"


def _describe(ex: Exception) -> str:
    if isinstance(ex, SdbatchError):
        return str(ex)
    if isinstance(ex, OmegaConfBaseException):
        return f"config error: {describe_config_error(ex)}"
    return f"{type(ex).__name__}: {ex}"


def _run_or_skip(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Run the job; a job whose images are all in its manifest already is skipped without loading models."""
    from sdbatch.cli.runner import import_engine, pending_images

    counts = pending_images(spec, run_dir)
    wants_sheet = spec.output.grid or axis_given(spec.grid.x)  # grid.png, or the fused grid's grid*.png
    sheet_missing = wants_sheet and not any(run_dir.glob("grid*.png"))
    if counts is not None and counts[0] > 0 and counts[1] == 0 and not sheet_missing:
        log.info("all %d image(s) already done; skipped. Output dir: %s", counts[0], run_dir)
        return {"status": "skipped", "new_images": 0}
    import_engine()  # the first import freezes the frames on the stack: from here, none of them holds an engine
    result = _run(spec, run_dir)
    done_before = result.skipped and not result.written
    return {"status": "skipped" if done_before else "completed", "new_images": len(result.written)}


def _job_spec(spec: RunSpec, hydra_cfg: DictConfig) -> RunSpec:
    """perf.device=auto in a job of a multi-process launcher (joblib, submitit, ray): cuda:(job.num % GPUs)."""
    if spec.perf.device != "auto" or in_process(hydra_cfg):
        return spec  # one process runs every job: keep one device
    device = device_for_job(int(hydra_cfg.job.num))
    log.info("job %s runs on %s <perf.device=auto, job number %% visible GPUs>", hydra_cfg.job.num, device)
    return dataclasses.replace(spec, perf=dataclasses.replace(spec.perf, device=device))


def device_for_job(num: int) -> str:
    """cuda:(num % visible GPUs), or cpu when CUDA is not available (what perf.device=auto would pick)."""
    from sdbatch.engine.core.gpus import cuda_device_count  # imports torch, which the engine imports next anyway

    count = cuda_device_count()
    return f"cuda:{num % count}" if count else "cpu"


def guarded(main: Callable[[], None]) -> int:
    """Run Hydra's main; user mistakes become one line on stderr and exit status 2, as do failed sweep jobs.

    SIGINT and SIGTERM end the run between two images with one line and exit status 130 or 143.
    """
    install_interrupt_handlers()
    try:
        with end_sweep_progress():  # before any line below: a sweep that ends by an exception leaves its bar open
            main()
    except (Interrupted, KeyboardInterrupt) as ex:
        ignore_interrupts()
        print(interrupted_line(ex), file=sys.stderr)
        return 128 + getattr(ex, "signum", signal.SIGINT)
    except SdbatchError as ex:
        print(f"sdbatch: error: {ex}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as ex:
        print(f"sdbatch: config error: {describe_config_error(ex, sys.argv[1:])}", file=sys.stderr)
        return 2
    except OSError as ex:
        # Hydra creates the run directory and writes .hydra/ itself, before our task can turn this into an
        # OutputError; a full disk there raises without a file name, so name the directory Hydra was writing.
        print(f"sdbatch: error: {describe_os_error(ex, ex.filename or _hydra_output_dir())}", file=sys.stderr)
        return 2
    except ValueError as ex:
        # Hydra's logging set-up cannot open run.log (a read-only or full run directory): the OSError is the cause.
        cause = ex.__cause__ if isinstance(ex.__cause__, OSError) else None
        if cause is None or "Unable to configure handler" not in str(ex):
            raise
        print(f"sdbatch: error: {describe_os_error(cause, cause.filename or _hydra_output_dir())}", file=sys.stderr)
        return 2
    except RuntimeError as ex:
        missing = missing_launcher(str(ex))
        if missing is None:
            raise
        print(f"sdbatch: error: {missing}", file=sys.stderr)
        return 2
    return sweep_exit_status()


def _hydra_output_dir() -> str | None:
    """The run or sweep directory Hydra was writing, for an OSError without a file name."""
    try:
        job_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir")  # set while a job runs
    except Exception:  # noqa: BLE001 - Hydra has reset its config after the failed job
        job_dir = None
    started = started_output_dir()
    return str(job_dir) if job_dir else str(started) if started else None


def missing_launcher(message: str) -> str | None:
    """Hydra's "Unknown plugin class" for a launcher whose package is not installed → what to install."""
    found = re.search(r"Unknown plugin class : '(hydra_plugins\.(\w+)\.[\w.]+)'", message)
    if not found or found[2] not in _LAUNCHER_EXTRAS:
        return None
    extra, package = _LAUNCHER_EXTRAS[found[2]]
    return (f"this launcher needs the {package} package ({found[1]} is not installed): "
            f"pip install 'sdbatch[{extra}]' (in a checkout: pip install -e '.[{extra}]')")


def sweep_exit_status() -> int:
    """2 when a job of the sweep that just ended failed, after one line per failed job; else 0.

    A full disk stopped the sweep: one line instead, naming the job and the file that did not fit.
    """
    sweep = last_sweep()
    if sweep is None:
        return 0
    failed = [r for r in sweep.records if r.status in FAILED_STATUSES]
    full = next((r for r in sweep.records if r.disk_full), None)
    if not failed and full is None:
        return 0
    if full is not None:  # one line: the first job that could not write stopped the sweep
        done = sum(r.status not in FAILED_STATUSES for r in sweep.records)
        error = (full.error or "no space left on device").strip().splitlines()[0]
        see = f", see {sweep.index}" if sweep.index.exists() else ""
        print(f"sdbatch: error: job {full.num}: {error}; the sweep stopped there ({done} of {len(sweep.records)} "
              f"job(s) done{see}); the rerun skips the finished jobs", file=sys.stderr)
        return 2
    keys = swept_keys(sweep.records)
    counts = ", ".join(f"{sum(r.status == s for r in failed)} {s}" for s in FAILED_STATUSES
                       if any(r.status == s for r in failed))
    print(f"sdbatch: {counts} of {len(sweep.records)} job(s); see {sweep.index}", file=sys.stderr)
    for record in failed:
        error = (record.error or "").strip().splitlines() or [""]
        print(f"sdbatch: job {record.num} ({record.label(keys)}): {record.status}: {error[0]}", file=sys.stderr)
    return 2


def describe_config_error(ex: BaseException, overrides: Sequence[str] | None = None) -> str:
    """Hydra's multi-line compose errors → one line that keeps the key and the reason; with the command line's
    `overrides`, an unreadable value gets its working quoted form (`sdbatch.cli.quoting`)."""
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex
    text = str(cause)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    reason = next((ln for ln in lines if not re.match(r"(full_key|reference_type|object_type|To append)", ln)), "")
    message = f"{reason} (key: {full_key})" if full_key and full_key not in reason else reason
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if options:
        message += f"; available options in '{options[1]}': {', '.join(options[2].split())}"
    if overrides is None:  # no command line at hand: the override Hydra's message quotes, if any
        named = re.search(r"(?:Ambiguous value for argument|Error parsing override) '([^']*)'", str(ex))
        overrides = [named[1]] if named else []
    multirun = "-m" in overrides or "--multirun" in overrides
    return message + (quoting_hint(overrides, multirun) or "")


# ---------------------------------------------------------------- resolvers for sweeps/ and conf/hydra/launcher/


def sweep_choices(values: Any) -> str:
    """A list as a Hydra sweep over its items, each quoted (commas, brackets, colons kept literally).

    Used in a sweeper param (`prompt_sr: ${sdbatch.choices:${prompt_sr_words}}`), which Hydra resolves once,
    on the launching machine, from the composed config: one job per distinct item.
    """
    items = list(dict.fromkeys(str(v) for v in (values if isinstance(values, list | ListConfig) else [values])))
    if not items:
        raise ValueError("nothing to sweep over: the list is empty")
    return ",".join(hydra_quoted(item) for item in items)


def sweep_seed() -> int:
    """One base seed for a whole sweep, derived from its directory: the same on re-runs into that directory
    (so resume finds its files), a new one for each new sweep (the default directory has the time in it)."""
    digest = hashlib.sha256(str(HydraConfig.get().sweep.dir).encode()).digest()
    return int.from_bytes(digest[:4], "big")  # [0, 2**32), as A1111 seeds


def gpu_count() -> int:
    """Visible CUDA devices, at least 1 (joblib's default number of workers: one per GPU, one on a CPU)."""
    from sdbatch.engine.core.gpus import cuda_device_count

    return max(1, cuda_device_count())


# registered on import: run.py imports this module, and so does every launcher worker (through the task)
OmegaConf.register_new_resolver("sdbatch.choices", sweep_choices, replace=True)
OmegaConf.register_new_resolver("sdbatch.sweep_seed", sweep_seed, replace=True)
OmegaConf.register_new_resolver("sdbatch.gpu_count", gpu_count, replace=True)

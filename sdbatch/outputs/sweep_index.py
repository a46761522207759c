"""Sweep index: each job's job.json, and at the end of a multirun sweep.jsonl, contact_sheet.png and a summary.

A multirun job (the Hydra task, on whatever machine the launcher put it) writes `job.json` into its run
directory when it ends: status, seconds, error. The `SweepIndex` callback (registered under `hydra.callbacks`
in conf/config.yaml) runs on the launching machine when the sweep ends: it reads every job directory of
this sweep and writes `sweep.jsonl` (one line per job) and `contact_sheet.png` (the jobs' first images with
the swept keys as axes) into the sweep directory, and keeps the result for the exit status (`last_sweep`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sdbatch.outputs.files import atomic_save_image, atomic_write_text, mtime_ns
from sdbatch.outputs.manifest_read import manifest_records

log = logging.getLogger("sdbatch")

JOB_FILE = "job.json"  # in each job's run directory
INDEX_FILE = "sweep.jsonl"  # in the sweep directory
SHEET_FILE = "contact_sheet.png"  # in the sweep directory
STOP_FILE = ".sdbatch-stop"  # in the sweep directory while stop_on_error has stopped the sweep
MAX_SHEET_PIXELS = 64_000_000  # larger contact sheets get smaller cells
NO_RESULT = "the job ended without a result (killed, or out of memory?); see its run.log"

# statuses: completed (made images), skipped (everything was already done), failed, cancelled (not run
# because an earlier job failed and stop_on_error is set)
FAILED_STATUSES = ("failed", "cancelled")


@dataclass
class JobRecord:
    """One line of sweep.jsonl."""

    num: int
    overrides: list[str]
    run_dir: str  # relative to the sweep directory
    status: str
    images: list[str] = field(default_factory=list)  # file names in the job's manifest.jsonl
    image_count: int = 0
    new_images: int | None = None  # made by this attempt (the rest were done by an earlier one)
    seconds: float | None = None
    device: str | None = None
    error: str | None = None
    disk_full: bool = False  # the job could not write for lack of space, which stopped the sweep

    def label(self, keys: Iterable[str]) -> str:
        """The job's values of `keys` (its swept keys), or all its overrides when none are given."""
        keys = set(keys)
        chosen = [o for o in self.overrides if not keys or split_override(o)[0] in keys]
        return " ".join(chosen) or "(no overrides)"


def in_process(hydra_cfg: DictConfig) -> bool:
    """Whether the launcher is Hydra's basic one, which runs the jobs one after another in this process."""
    return str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "").endswith(".BasicLauncher")


# ---------------------------------------------------------------- written by each job


# results whose job.json could not be written (a full disk), and stop reasons, for this process's sweep
_UNWRITTEN: dict[Path, dict[str, Any]] = {}
_STOPS: dict[Path, str] = {}


def write_job_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write job.json atomically (a job killed mid-write leaves the previous one or none).

    When it cannot be written (a full disk) the result is kept in this process, where the sweep's end
    (sweep.jsonl) finds it, and OSError is raised.
    """
    target = Path(run_dir) / JOB_FILE
    key = Path(run_dir).absolute()
    try:
        atomic_write_text(target, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    except OSError:
        _UNWRITTEN[key] = result
        raise
    _UNWRITTEN.pop(key, None)
    return target


def stop_requested(sweep_dir: Path) -> str | None:
    """Why the jobs not started yet must not run (an earlier job failed: stop_on_error, a full disk), or None."""
    reason = _STOPS.get(Path(sweep_dir).absolute())
    if reason is None and (Path(sweep_dir) / STOP_FILE).exists():
        try:
            reason = (Path(sweep_dir) / STOP_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            reason = ""
        reason = reason or "an earlier job failed and stop_on_error is set"
    return reason


def request_stop(sweep_dir: Path, reason: str = "an earlier job failed and stop_on_error is set") -> None:
    """Tell the jobs that have not started yet not to run: in this process, and in the sweep directory for the
    launchers that run jobs in other processes (best effort: the disk may be full). The first reason stays."""
    if stop_requested(sweep_dir) is not None:
        return
    _STOPS[Path(sweep_dir).absolute()] = reason
    with contextlib.suppress(OSError):
        atomic_write_text(Path(sweep_dir) / STOP_FILE, reason + "\n")


# ---------------------------------------------------------------- read at the end of the sweep


def split_override(override: str) -> tuple[str, str]:
    """Hydra's override text → (key, value as the user meant it): quotes and backslash escapes removed."""
    key, _, value = override.partition("=")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return key, value[1:-1].replace("\\" + value[0], value[0])
    return key, re.sub(r"\\(.)", r"\1", value)  # Hydra writes 'a cat' as a\ cat


def _load(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None


def manifest_files(run_dir: Path) -> list[str]:
    """File names listed by the complete lines of run_dir/manifest.jsonl, in order, each once."""
    return [record["file"] for record in manifest_records(run_dir)]


def _job_dirs(sweep_dir: Path, output_subdir: str | None) -> dict[Path, Path | None]:
    """{job run dir: its overrides.yaml written by Hydra (None without .hydra)} below sweep_dir."""
    found: dict[Path, Path | None] = {}
    if output_subdir:
        for marker in sweep_dir.rglob(f"{output_subdir}/overrides.yaml"):
            found[marker.parent.parent] = marker
    for marker in sweep_dir.rglob(JOB_FILE):
        found.setdefault(marker.parent, None)
    for run_dir in _UNWRITTEN:  # jobs of this process whose job.json the disk had no room for
        if run_dir.is_relative_to(sweep_dir.absolute()):
            found.setdefault(run_dir, None)
    return found


def _record(sweep_dir: Path, run_dir: Path, hydra_file: Path | None, since: int) -> JobRecord | None:
    """The job in run_dir, or None when it belongs to an earlier sweep into the same directory."""
    started, finished = mtime_ns(hydra_file), mtime_ns(run_dir / JOB_FILE)
    unwritten = _UNWRITTEN.get(run_dir.absolute())  # this sweep's, though its job.json could not be written
    if unwritten is None and (started if started is not None else finished or 0) < since:
        return None
    fresh = finished is not None and (started is None or finished >= started)
    result = unwritten or (_load_json(run_dir / JOB_FILE) if fresh else None) or {}
    num = result.get("num")
    if num is None and hydra_file:
        num = _select(_load(hydra_file.with_name("hydra.yaml")), "hydra", "job", "num")
    overrides = result.get("overrides") or (_load(hydra_file) if hydra_file else None) or []
    files = manifest_files(run_dir)
    return JobRecord(num=int(num) if isinstance(num, int) else -1, overrides=[str(o) for o in overrides],
                     run_dir=_relative(run_dir, sweep_dir), status=result.get("status", "failed"),
                     images=files, image_count=len(files), new_images=result.get("new_images"),
                     seconds=result.get("seconds"), device=result.get("device"),
                     error=result.get("error") if result else NO_RESULT, disk_full=bool(result.get("disk_full")))


def _select(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def collect(sweep_dir: Path, output_subdir: str | None = ".hydra") -> list[JobRecord]:
    """Every job of the latest sweep into sweep_dir, by job number.

    Hydra writes multirun.yaml when a sweep starts and each job's .hydra/ when the job starts, so job
    directories older than multirun.yaml belong to an earlier, different sweep into the same directory.
    """
    marker = sweep_dir / "multirun.yaml"
    since = marker.stat().st_mtime_ns if marker.exists() else 0
    records = [_record(sweep_dir, run_dir, hydra_file, since)
               for run_dir, hydra_file in _job_dirs(sweep_dir, output_subdir).items()]
    return sorted((r for r in records if r is not None), key=lambda r: (r.num, r.run_dir))


def write_index(sweep_dir: Path, records: list[JobRecord]) -> Path:
    target = sweep_dir / INDEX_FILE
    return atomic_write_text(target, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records))


def _value(record: JobRecord, key: str) -> str | None:
    return next((o for o in record.overrides if split_override(o)[0] == key), None)


def swept_keys(records: list[JobRecord]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they first appear (Hydra's sweep order)."""
    keys = dict.fromkeys(split_override(o)[0] for r in records for o in r.overrides)
    return [key for key in keys if len({_value(r, key) for r in records}) > 1]


# ---------------------------------------------------------------- contact sheet


def _first_image(sweep_dir: Path, record: JobRecord):
    from PIL import Image

    if not record.images:
        return None
    path = sweep_dir / record.run_dir / sorted(record.images)[0]  # default names start with the run index
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:
        return None


def _shrink(images: dict[int, Any], cells: int) -> None:
    """Thumbnail every image in place so that `cells` cells stay under MAX_SHEET_PIXELS."""
    present = [im for im in images.values() if im is not None]
    if not present:
        return
    area = max(im.width for im in present) * max(im.height for im in present)
    if area * cells <= MAX_SHEET_PIXELS:
        return
    scale = (MAX_SHEET_PIXELS / (area * cells)) ** 0.5
    for im in present:
        im.thumbnail((max(8, int(im.width * scale)), max(8, int(im.height * scale))))


def contact_sheet(sweep_dir: Path, records: list[JobRecord]):
    """The jobs' first images: last swept key across (X), the one before down (Y), one titled sheet per
    combination of the other swept keys (Z), stacked. Failed jobs leave a grey cell."""
    from sdbatch.outputs.contact_sheet import labelled_grid, stack

    keys = swept_keys(records)
    x_key, y_key, z_keys = (keys[-1] if keys else None), (keys[-2] if len(keys) > 1 else None), keys[:-2]

    def value(record: JobRecord, key: str | None) -> str:
        return "" if key is None else _value(record, key) or f"{key}=(default)"

    xs = list(dict.fromkeys(value(r, x_key) for r in records))
    ys = list(dict.fromkeys(value(r, y_key) for r in records))
    images = {r.num: _first_image(sweep_dir, r) for r in records}
    _shrink(images, len(records))
    sheets = []
    for z in dict.fromkeys(tuple(value(r, k) for k in z_keys) for r in records):
        cells: list[list[Any]] = [[None] * len(xs) for _ in ys]
        for r in records:
            if tuple(value(r, k) for k in z_keys) == z:
                cells[ys.index(value(r, y_key))][xs.index(value(r, x_key))] = images[r.num]
        sheets.append(labelled_grid(cells, [_label(x) for x in xs], [_label(y) for y in ys],
                                    title=", ".join(_label(v) for v in z) or None))
    return stack(sheets)


def _label(override: str) -> str:
    if not override:
        return ""
    key, value = split_override(override)
    return f"{key}={value}"


# ---------------------------------------------------------------- the callback

@dataclass(frozen=True)
class SweepResult:
    index: Path  # sweep.jsonl
    records: list[JobRecord]


_LAST: list[SweepResult] = []  # sweeps that ended in this process, for the exit status
_OUTPUT_DIR: list[Path] = []  # the run or sweep directory Hydra was about to write, for errors without a path


def last_sweep() -> SweepResult | None:
    """The latest sweep this process ran (None when it ran none), for cli.guarded's exit status."""
    return _LAST[-1] if _LAST else None


def started_output_dir() -> Path | None:
    """The directory the latest run or sweep of this process writes into (hydra.run.dir or hydra.sweep.dir),
    known from its start; names the place when Hydra fails to write there (a full disk) without a file name."""
    return _OUTPUT_DIR[-1] if _OUTPUT_DIR else None


class SweepIndex(Callback):
    """Hydra callback: sweep.jsonl, contact_sheet.png and index.html (unless output.gallery=false) at the end of
    every multirun (and, at the start of any run or sweep, its directory, for error messages).

    Configured in conf/config.yaml under hydra.callbacks.sweep_index; `stop_on_error=true` makes the jobs
    that have not started yet skip themselves (status cancelled) once one job has failed.
    """

    def __init__(self, stop_on_error: bool = False, contact_sheet: bool = True) -> None:
        self.stop_on_error = stop_on_error
        self.contact_sheet = contact_sheet

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _OUTPUT_DIR[:] = [Path(config.hydra.run.dir).absolute()]  # a single run: only the directory is noted

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _OUTPUT_DIR[:] = [sweep_dir.absolute()]
        (sweep_dir / STOP_FILE).unlink(missing_ok=True)  # a re-run retries everything
        _STOPS.pop(sweep_dir.absolute(), None)

    def on_job_end(self, config: DictConfig, job_return: JobReturn | None = None, **kwargs: Any) -> None:
        """Drop the job's two config copies from its JobReturn, which the launcher keeps until the sweep ends.

        Hydra's run_job deep-copies the job's config twice into the JobReturn (task config, Hydra config), and
        the launcher and sweeper hold every job's return to the end: about 180 KiB of objects, 0.2 MiB of RSS per
        job of a one-process multirun (+200 MiB over 1,000 jobs). Nothing reads them after the job (the sweeper
        reads return_value; sweep.jsonl comes from job.json), and Hydra calls on_job_end callbacks in reverse
        order, so the ones configured after this one have already had them.
        """
        if job_return is not None:
            job_return.cfg = None
            job_return.hydra_cfg = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        records = collect(sweep_dir, config.hydra.output_subdir)
        index = sweep_dir / INDEX_FILE
        try:
            write_index(sweep_dir, records)
        except OSError as ex:  # a full disk: the exit status and its lines still report every job
            log.warning("%s not written: %s", index, ex.strerror or ex)
        _LAST.append(SweepResult(index, records))
        _STOPS.pop(sweep_dir, None)
        for run_dir in [d for d in _UNWRITTEN if d.is_relative_to(sweep_dir)]:
            del _UNWRITTEN[run_dir]
        with contextlib.suppress(OSError):
            (sweep_dir / STOP_FILE).unlink(missing_ok=True)
        counts = {s: sum(r.status == s for r in records) for s in ("completed", "skipped", *FAILED_STATUSES)}
        log.info("sweep: %d job(s): %s; index: %s", len(records),
                 ", ".join(f"{n} {s}" for s, n in counts.items() if n), index)
        if self.contact_sheet and records:
            try:
                sheet = contact_sheet(sweep_dir, records)
                atomic_save_image(sweep_dir / SHEET_FILE, sheet)
                log.info("contact sheet: %s (axes: %s)", sweep_dir / SHEET_FILE,
                         ", ".join(reversed(swept_keys(records))) or "none")
            except Exception as ex:  # the images and the index are what matters; never fail the sweep here
                log.warning("contact sheet not written: %s: %s", type(ex).__name__, ex)
        if records and OmegaConf.select(config, "output.gallery", default=True):
            self._write_gallery(sweep_dir, records)

    @staticmethod
    def _write_gallery(sweep_dir: Path, records: list[JobRecord]) -> None:
        from sdbatch.outputs.gallery import write_sweep_page  # imported here: the gallery reads this module

        try:
            page = write_sweep_page(sweep_dir, records)
            log.info("gallery: %s", page)
        except Exception as ex:  # like the contact sheet: never fail the sweep for its page
            log.warning("gallery page not written: %s: %s", type(ex).__name__, ex)

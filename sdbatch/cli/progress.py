"""Progress on the console: log lines that do not break the tqdm bars, and a multirun's bar of jobs done.

Log records and bars share stderr, and a record written while a bar is drawn lands in the middle of the bar's
line. tqdm's own `logging_redirect_tqdm` swaps the logger's handler list for a block and puts the saved list
back at its end; in a multirun Hydra replaces (and closes) the root logger's handlers at every job's start, so
putting a saved list back would revive the closed handlers of an earlier job, and its stand-in handler drops
the console handler's level and filters. So here the console handlers stay as Hydra made them and only their
stream is routed through tqdm.write (tqdm's DummyTqdmFile); file handlers (run.log) are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from sdbatch.outputs.sweep_index import in_process

Routed = list[tuple[logging.StreamHandler, TextIO]]  # (handler, the stream it wrote to before)


def route_console() -> Routed:
    """Make the root logger's console handlers write through tqdm.write; returns what restore_console needs."""
    routed = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
            routed.append((handler, handler.setStream(DummyTqdmFile(handler.stream))))
    return routed


def restore_console(routed: Routed) -> None:
    """Give the handlers their own streams back (harmless for handlers Hydra has closed since)."""
    for handler, stream in routed:
        if isinstance(handler.stream, DummyTqdmFile):
            handler.setStream(stream)


@contextlib.contextmanager
def console_through_tqdm(enabled: bool = True) -> Iterator[None]:
    """Route the root logger's console handlers through tqdm.write in the block (a no-op where already routed)."""
    routed = route_console() if enabled else []
    try:
        yield
    finally:
        restore_console(routed)


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The jobs (each as its overrides) Hydra's basic sweeper makes of a multirun's config: the sweeper's params,
    then the command line, expanded by the sweeper's own function. None for another sweeper, or overrides that
    cannot be expanded here."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if not sweeper.endswith(".BasicSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    hydra = GlobalHydra.instance()
    loader = hydra.config_loader() if hydra.is_initialized() else None  # glob(*) over a group lists its options
    try:
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        return BasicSweeper.split_arguments(overrides, None)[0]
    except Exception:  # noqa: BLE001 - the sweeper reports bad overrides itself; the bar then has no total
        return None


_LIVE: list[SweepProgress] = []  # the sweep whose bar is on the screen


@contextlib.contextmanager
def end_sweep_progress() -> Iterator[None]:
    """Close a sweep's bar still on the screen when the block ends: Hydra calls no callback when a multirun ends
    by an exception (an interrupt, a job config that does not compose), and the error line must not land on it."""
    try:
        yield
    finally:
        while _LIVE:
            _LIVE[-1].close()


class SweepProgress(Callback):
    """Hydra callback: one bar of the multirun's jobs done (completed, skipped, failed or cancelled), with ETA.

    Only for the basic launcher, which runs the jobs one after another in this process (other launchers' jobs
    run elsewhere), and not with perf.progress=false. Configured in conf/config.yaml as hydra.callbacks.

    The launcher sets up its own logging again before each job and logs the job's overrides with it, where no
    callback can route its handlers; so between two jobs the bar is cleared from the screen, and drawn again
    when the next job starts.
    """

    def __init__(self) -> None:
        self._enabled = False
        self._total: int | None = None
        self._bar: tqdm | None = None
        self._routed: Routed = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._enabled = in_process(config.hydra) and bool(OmegaConf.select(config, "perf.progress", default=True))
        jobs = sweep_jobs(config) if self._enabled else None
        self._total = len(jobs) if jobs is not None else None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            # miniters=1: tqdm's monitor thread never redraws it on its own, between two jobs where it is cleared
            self._bar = tqdm(total=self._total, desc="sweep", unit="job", miniters=1)
            _LIVE.append(self)
        else:
            self._bar.refresh()
        self._routed = route_console()  # the handlers Hydra has just made for this job

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._bar is None:
            return
        restore_console(self._routed)  # the launcher closes them next; nothing of the job stays here
        self._routed = []
        self._bar.update(1)
        self._bar.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Leave the bar on the screen as it stands, and the console handlers as they were."""
        restore_console(self._routed)  # an interrupted job never reached on_job_end
        self._routed = []
        if self._bar is not None:
            self._bar.close()
        self._bar, self._enabled = None, False
        if self in _LIVE:
            _LIVE.remove(self)

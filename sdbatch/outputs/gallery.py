"""The gallery pages: a run's index.html kept current while it runs, a sweep's at its end, and either rebuilt
from the files of an existing directory (`sdbatch-gallery DIR`).

A page is a view of what is on disk, never a reason to lose images: a page that cannot be written (a full disk)
is warned about once and the run goes on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sdbatch.errors import OutputError
from sdbatch.outputs.files import describe_os_error
from sdbatch.outputs.gallery_data import run_page_data, sweep_page_data
from sdbatch.outputs.gallery_page import PAGE, write_page
from sdbatch.outputs.sweep_index import INDEX_FILE, JobRecord, collect
from sdbatch.prompts.png_info import MANIFEST

log = logging.getLogger("sdbatch")

MIN_INTERVAL = 2.0  # seconds between two writes of a live page: a 1,000-image run rewrites it ~once per image


class RunGallery:
    """index.html of one run directory: written after saved images (at most every MIN_INTERVAL seconds, so a long
    run costs little), and once more, not live, when the run ends."""

    def __init__(self, run_dir: Path, enabled: bool = True, interval: float = MIN_INTERVAL) -> None:
        self.run_dir, self.enabled, self.interval = Path(run_dir), enabled, interval
        self._last = -float("inf")
        self._warned = False
        self._cache: dict = {}  # image → its page entry, reused by the next write while unchanged

    def saved(self) -> None:
        """An image was saved: rewrite the live page unless it was written moments ago."""
        if self.enabled and time.monotonic() - self._last >= self.interval:
            self._write(live=True)

    def finish(self) -> None:
        """The run ended (done, failed or interrupted): the page stops reloading."""
        if self.enabled and (self.run_dir / MANIFEST).exists():
            self._write(live=False)

    def _write(self, *, live: bool) -> None:
        try:
            write_page(self.run_dir, run_page_data(self.run_dir, live=live, cache=self._cache))
        except Exception as exc:  # a page is never a reason to stop a run (a full disk, an odd record)
            if not self._warned:
                why = describe_os_error(exc, self.run_dir / PAGE) if isinstance(exc, OSError) else repr(exc)
                log.warning("gallery page not written: %s", why)
                self._warned = True
        self._last = time.monotonic()


def write_sweep_page(sweep_dir: Path, jobs: list[JobRecord]) -> Path:
    """The sweep's index.html beside sweep.jsonl (OSError when it cannot be written)."""
    return write_page(sweep_dir, sweep_page_data(sweep_dir, jobs))


def rebuild(directory: Path) -> Path:
    """Write the page of an existing run or sweep directory from its files; OutputError when it is neither."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OutputError(f"{directory} is not a directory; give a run or sweep directory")
    try:
        if (directory / MANIFEST).exists():
            return write_page(directory, run_page_data(directory, live=False))
        if (directory / INDEX_FILE).exists() or (directory / "multirun.yaml").exists():
            return write_sweep_page(directory, collect(directory))
    except OSError as exc:
        raise OutputError(describe_os_error(exc, directory / PAGE)) from None
    raise OutputError(f"{directory} holds neither {MANIFEST} (a run) nor {INDEX_FILE} or multirun.yaml (a sweep); "
                      "give the folder an sdbatch run or multirun wrote")

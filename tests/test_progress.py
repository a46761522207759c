"""Progress bars: log lines written above the bars, the first hash of a big file, a multirun's bar of jobs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from sdbatch.cli.progress import SweepProgress, console_through_tqdm, sweep_jobs
from sdbatch.engine.models import checkpoint

ROOT = Path(__file__).resolve().parents[1]
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:  # tqdm's disable=None shows a bar only on a terminal
        return True


def _segments(text: str) -> list[str]:
    """What a terminal shows as separate writes: text between carriage returns and newlines."""
    return [part for part in re.split(r"[\r\n]", text) if part.strip()]


@contextlib.contextmanager
def _terminal() -> Iterator[io.StringIO]:
    """A terminal-like sys.stderr for the block (set in the test itself: pytest's capture replaces sys.stderr
    between a fixture's set-up and the test)."""
    real, sys.stderr = sys.stderr, _Terminal()
    try:
        yield sys.stderr
    finally:
        sys.stderr = real


@contextlib.contextmanager
def _root_handlers(*handlers: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def test_a_log_record_during_a_bar_is_written_above_it(tmp_path, monkeypatch) -> None:
    written = []
    write = tqdm.write
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, **kw: (written.append(s), write(s, **kw))))
    with _terminal() as stderr:
        console, file = logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "run.log")
        with _root_handlers(console, file), tqdm(total=3, desc="images") as bar, console_through_tqdm():
            bar.update(1)
            logging.getLogger("sdbatch.test").warning("a line above the bar")
            bar.update(1)
            assert file.stream is not stderr and file.stream.name == str(tmp_path / "run.log")  # never routed
        assert console.stream is stderr  # handed back
    assert "".join(written) == "a line above the bar\n"
    assert "a line above the bar" in _segments(stderr.getvalue())  # on a line of its own, not after the bar
    assert (tmp_path / "run.log").read_text() == "a line above the bar\n"


def test_the_first_hash_of_a_big_file_shows_a_bar(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "HASH_BAR_BYTES", 4096)
    big, small = tmp_path / "big.safetensors", tmp_path / "small.safetensors"
    big.write_bytes(b"x" * 10_000)
    small.write_bytes(b"x" * 4096)
    with _terminal() as stderr:
        assert checkpoint.file_sha256_short(big) == hashlib.sha256(big.read_bytes()).hexdigest()[:10]
        shown = stderr.getvalue()
        checkpoint.file_sha256_short(big)  # known now: no bar
        checkpoint.file_sha256_short(small)  # not above the threshold: no bar
    assert "hashing big.safetensors:" in shown and "/9.77k [" in shown  # bytes, 1024 to the k
    assert stderr.getvalue() == shown


def _multirun_config(launcher: str = BASIC_LAUNCHER, **params: str):
    return OmegaConf.create({"perf": {"progress": True}, "hydra": {
        "launcher": {"_target_": launcher}, "sweeper": {"_target_": BASIC_SWEEPER, "params": params},
        "overrides": {"task": ["model=tiny", "seed=1,2,3", "width=64,72"]}}})


def test_sweep_jobs_counts_as_the_basic_sweeper() -> None:
    jobs = sweep_jobs(_multirun_config(seed="range(0,8)", height="64,128"))  # the command line's seed wins
    assert len(jobs) == 2 * 3 * 2 and jobs[0] == ["seed=1", "height=64", "model=tiny", "width=64"]
    other = _multirun_config()
    other.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweep_jobs(other) is None


def _sweep(callback: SweepProgress, config, jobs: int) -> None:
    """Hydra's order of callbacks in a multirun: each job with a console handler of its own, and between two
    jobs the launcher's, which logs the next job's overrides and which no callback sees."""
    callback.on_multirun_start(config)
    for num in range(jobs):
        with _root_handlers(logging.StreamHandler(sys.stderr)):
            logging.getLogger("hydra.test").warning("#%d : seed=%d", num, num)
        console = logging.StreamHandler(sys.stderr)
        with _root_handlers(console):
            callback.on_job_start(config)
            logging.getLogger("sdbatch.test").warning("job %d", num)
            callback.on_job_end(config)
            assert console.stream is sys.stderr  # handed back at the job's end
    callback.on_multirun_end(config)


def test_sweep_bar_counts_jobs_and_keeps_log_lines_whole() -> None:
    with _terminal() as stderr:
        _sweep(SweepProgress(), _multirun_config(), 6)
    segments = _segments(stderr.getvalue())
    assert "sweep: 100%" in segments[-1] and "6/6" in segments[-1]
    logged = [s for s in segments if re.search(r"#\d+ : |job \d", s)]
    assert logged == [line for n in range(6) for line in (f"#{n} : seed={n}", f"job {n}")]


def test_no_sweep_bar_for_jobs_in_other_processes() -> None:
    with _terminal() as stderr:
        _sweep(SweepProgress(), _multirun_config("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
               2)
    assert "sweep:" not in stderr.getvalue()


def _run(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"SDBATCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_multirun_shows_a_sweep_bar_above_whole_log_lines(cache_dir, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "model=tiny", "prompt=a cat", "seed=1,2,3", "width=64", "height=64", "sampler.steps=2",
                 f"hydra.sweep.dir={sweep}", "hydra.callbacks.sweep_index.contact_sheet=false"], cache_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    segments = _segments(proc.stderr)
    assert any(s.startswith("sweep: 100%") and "3/3" in s for s in segments), proc.stderr
    logged = [s for s in segments if re.search(r"\]\[\w+\] - |\[HYDRA\]", s)]
    assert len(logged) >= 9 and all(s.startswith("[20") for s in logged), logged  # none glued to a bar
    for num in range(3):  # the log files are untouched by the routing
        assert "Output dir:" in (sweep / str(num) / "run.log").read_text()

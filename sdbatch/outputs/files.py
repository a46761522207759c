"""Safe writing: the one atomic-write helper, the run directory's writer lock and interrupts (SIGINT/SIGTERM).

Every file sdbatch writes whole (PNGs, config.yaml, grid and contact sheets, job.json, sweep.jsonl) goes
through `atomic_write`: a temporary file in the target's directory, fsync, os.replace, fsync of the
directory. A reader, a crash, a full disk or an interrupt sees the previous file or the new one, never a
partial one. Only a crash (kill -9) can leave the temporary file; the next run into the directory removes it.

`install_interrupt_handlers` (called by the command line) turns SIGINT and SIGTERM into `Interrupted`.
Inside `deferred_interrupts()` (one image: its PNG and its manifest line) the signal waits for the block to
end, so an interrupt never separates an image from its manifest line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from sdbatch.errors import OutputError

LOCK_FILE = ".sdbatch.lock"  # in the run directory while a process writes into it (flock)
PID_FILE = ".sdbatch.lock.pid"  # the holder's PID, for the message another process prints


def mtime_ns(path: Path | None) -> int | None:
    """The file's modification time in nanoseconds; None when there is no path or no such file."""
    try:
        return path.stat().st_mtime_ns if path else None
    except OSError:
        return None


# ---------------------------------------------------------------- atomic writes


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some file systems do not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write `target` whole or not at all: `write(fh)` fills a temporary file in the same directory, which is
    fsynced and renamed over the target. On any failure the temporary file is removed and the error raised."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with deferred_interrupts():
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
    return target


def atomic_write_text(target: Path, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(target, lambda fh: fh.write(data))


def atomic_save_image(target: Path, image, **save_args) -> Path:
    """`atomic_write` of a PIL image, as PNG unless `save_args` name another format (they go to Image.save, e.g.
    pnginfo, exif, quality)."""
    return atomic_write(target, lambda fh: image.save(fh, **{"format": "PNG", **save_args}))


def describe_os_error(exc: OSError, path: Path | str | None = None) -> str:
    """'cannot write PATH: reason; what to do', for an error writing a run or sweep directory.

    PATH is `path` when given (the file meant, not its temporary name), else the error's own file name.
    """
    where = path if path is not None else exc.filename
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space, then rerun to resume"
    else:
        advice = "set hydra.run.dir (or hydra.sweep.dir) to a writable folder"
    return f"cannot write {where}: {reason}; {advice}" if where is not None else f"{reason}; {advice}"


# ---------------------------------------------------------------- one writer per run directory


class DirectoryBusy(OutputError):
    """Another process holds the run directory's lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"PID {pid}" if pid else "PID unknown"
        super().__init__(f"run directory {path} is in use by another sdbatch process ({holder}); wait for it to "
                         "finish, or set hydra.run.dir to another folder")
        self.path, self.pid = path, pid


def acquire_writer_lock(directory: Path) -> Callable[[], None]:
    """Take the exclusive lock on `directory` (its .sdbatch.lock, with the PID beside it); returns the release.

    Does not wait: raises DirectoryBusy when another process holds it, OSError when it cannot be created.
    Temporaries a killed writer left in the directory are removed once the lock is held.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    lock = FileLock(str(directory / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DirectoryBusy(directory, _holder_pid(directory)) from None
    with contextlib.suppress(OSError):  # the PID is for messages only
        atomic_write_text(directory / PID_FILE, f"{os.getpid()}\n")
    remove_stale_temporaries(directory)

    def release() -> None:
        with contextlib.suppress(OSError):
            (directory / PID_FILE).unlink(missing_ok=True)
        lock.release()

    return release


def remove_stale_temporaries(directory: Path) -> None:
    """Remove the `atomic_write` temporaries a killed process left (call while holding the writer lock)."""
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.name.rsplit(".", 2)[-2].isdigit() and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _holder_pid(directory: Path) -> int | None:
    try:
        return int((directory / PID_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- interrupts


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so that `except Exception` handlers let it through.

    The runner adds how far the run got (done of total images), the command line prints it as one line.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.done: int | None = None
        self.total: int | None = None
        self.job: int | None = None  # the multirun job that was running
        self.interactive = False  # an interactive session (interactive=true) was running: nothing to resume


_deferred = {"depth": 0, "pending": None}


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (when `install_interrupt_handlers` is active) until the block ends, then raise.

    Only the main thread's blocks count: signals reach only the main thread, and a worker (the background image
    writer) is waited for by the main thread before an interrupt leaves the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        pending = _deferred["pending"]
        if _deferred["depth"] == 0 and pending is not None:
            _deferred["pending"] = None
            raise Interrupted(pending)


def _on_signal(signum: int, frame) -> None:
    if _deferred["depth"]:
        _deferred["pending"] = signum
        return
    raise Interrupted(signum)


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (held while an image is being written). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def ignore_interrupts() -> None:
    """After an interrupt: let the process finish reporting it without a second one cutting in."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)

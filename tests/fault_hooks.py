"""Test helper for tests/test_faults.py: `python tests/fault_hooks.py run.py ARGS...` runs run.py with a fault.

The fault comes from the environment (tests only; the product has no hooks):
- SDBATCH_FAULT=enospc-png:N  after N images are written, writing any further PNG fails with ENOSPC (the disk
  fills up with images; the small files, job.json and sweep.jsonl, still fit once the temporary PNG is gone);
- SDBATCH_FAULT=enospc-all:N  after N images, every atomic write fails with ENOSPC (job.json, sweep.jsonl too);
- SDBATCH_FAULT=eacces:DIR    opening anything below DIR for writing fails with EACCES (a directory the
  user may not write, as `chmod 0o555` gives a non-root user);
- SDBATCH_FAULT=full:DIR      writing anything below DIR fails with ENOSPC, with no file name, as a write
  to a full disk does (here at open: the disk is full from the start).
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import runpy
import sys
from pathlib import Path


def _fills_up(fh) -> None:
    fh.write(b"\0" * 100)  # part of the file is written, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _enospc(limit: int, every_write: bool) -> None:
    import sdbatch.outputs.files as files

    real = files.atomic_write
    images = [0]

    def atomic_write(target, write):
        target = Path(target)
        is_image = target.suffix == ".png" and not target.name.startswith(("grid", "contact_sheet"))
        if images[0] >= limit and (is_image or every_write):
            return real(target, _fills_up)
        images[0] += is_image
        return real(target, write)

    files.atomic_write = atomic_write


def _deny(directory: str, code: int) -> None:
    root = os.path.realpath(directory)

    def denied(path) -> bool:
        try:
            full = os.path.realpath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return full == root or full.startswith(root + os.sep)

    real_open, real_os_open = builtins.open, os.open

    def error(path) -> OSError:
        if code == errno.ENOSPC:
            return OSError(code, os.strerror(code))
        return OSError(code, os.strerror(code), os.fspath(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and denied(file):
            raise error(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
            raise error(path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    logging.FileHandler._builtin_open = staticmethod(guarded_open)  # logging keeps its own reference
    os.open = guarded_os_open


def main() -> None:
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python run.py` would: this checkout's sdbatch
    kind, _, arg = os.environ.get("SDBATCH_FAULT", "").partition(":")
    if kind in ("enospc-png", "enospc-all"):
        _enospc(int(arg), every_write=kind == "enospc-all")
    elif kind in ("eacces", "full"):
        _deny(arg, errno.EACCES if kind == "eacces" else errno.ENOSPC)
    elif kind:
        raise SystemExit(f"unknown SDBATCH_FAULT {kind!r}")
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

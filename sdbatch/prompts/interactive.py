"""Interactive mode (`interactive=true`): prompt lines typed on standard input, previews, saved-path report.

Each line typed (or piped) is one prompt line, with in-prompt options as in a prompt file; blank lines and
lines starting with ``#`` are skipped. The ``prompt> `` marker is shown (on standard error) only when the input
is a terminal, so piping a file in (``python run.py ... interactive=true < prompts.txt``) prints nothing extra.
End of input ends the run: Ctrl-D on Linux and macOS, Ctrl-Z then Enter on Windows; Ctrl-C while waiting for a
line ends it the same way, quietly. The path of every saved image is printed on standard output, one per line,
and, unless ``no_preview=true`` or there is no display, the images are opened in the system image viewer.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


def read_lines(stream: TextIO, *, prompt: str = "prompt> ", out: TextIO | None = None) -> Iterator[str]:
    """Yield the stripped, non-empty, non-'#' lines of `stream` until end of input (EOF, Ctrl-D).

    `prompt` is written to `out` (default: sys.stderr at call time) before each line is read, only when
    `stream` is a terminal. Ctrl-C (KeyboardInterrupt) while waiting for a line ends the input like EOF,
    without a traceback; Ctrl-C while the caller works on a yielded line is the caller's to handle.
    """
    out = sys.stderr if out is None else out
    tty = _isatty(stream)
    while True:
        try:
            if tty:
                out.write(prompt)
                out.flush()
            raw = stream.readline()
        except KeyboardInterrupt:
            if tty:
                out.write("\n")
                out.flush()
            return
        except OSError as ex:
            if ex.errno == errno.EIO:  # the terminal hung up (some systems): end of input
                return
            raise
        if not raw:
            return
        line = raw.strip()
        if line and not line.startswith("#"):
            yield line


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def preview_available(no_preview: bool) -> bool:
    """True when previews are wanted (not `no_preview`) and a display exists.

    Linux and other Unix systems need DISPLAY or WAYLAND_DISPLAY set; macOS and Windows always have one.
    """
    if no_preview:
        return False
    if sys.platform == "darwin" or sys.platform.startswith(("win", "cygwin")):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show_preview(paths: list[Path], title: str) -> None:
    """Open the images in the system viewer (Pillow's ImageShow; the viewer runs on its own, we don't wait).

    Never raises: a missing or failing viewer logs one warning and the remaining images are not shown.
    """
    if not paths:
        return
    path = paths[0]
    try:
        from PIL import Image, ImageShow

        for number, path in enumerate(paths, start=1):
            name = title if len(paths) == 1 else f"{title} ({number}/{len(paths)})"
            with Image.open(path) as image:
                if not ImageShow.show(image, title=name):
                    raise OSError("no image viewer found (Pillow's ImageShow has none registered)")
    except Exception as ex:
        log.warning("preview failed for %s: %s; set no_preview=true to stop trying", path, " ".join(str(ex).split()))


def report_saved(paths: Iterable[Path | str], out: TextIO | None = None) -> None:
    """Print each saved image path on its own line to `out` (default: sys.stdout at call time), then flush."""
    out = sys.stdout if out is None else out
    for path in paths:
        out.write(f"{path}\n")
    out.flush()

"""Write-behind for a run's images: PNG encoding, metadata, fsync and the manifest line of batch k happen on one
worker thread while batch k+1 denoises.

Written with a thread and a bounded queue rather than a process pool: the work is zlib and fsync, which release the
GIL, and a thread shares the run's RunDir (its manifest and resume state) without copying images between
processes. Order and safety stay those of `RunDir.save`, called on the worker for one image at a time, in the order
submitted: each image is written whole before its manifest line, so a kill still loses nothing that is listed.
Signals reach only the main thread; it leaves the block through `__exit__`, which first waits for every image
already submitted (holding a second interrupt until then), so an interrupt or an error loses no finished image.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from sdbatch.outputs.files import deferred_interrupts
from sdbatch.outputs.run_dir import RunDir

_DONE = object()  # the sentinel that ends the worker


class BackgroundWriter:
    """`with BackgroundWriter(out, depth) as writer: writer.submit(image, params)`; at most `depth` images wait.
    `depth=0` writes each image in `submit`, on the calling thread (where no CPU core is free for a writer).

    The first error of the worker (a full disk) is raised in the main thread by the next `submit` or by the end of
    the block; images submitted after it are not written.
    """

    def __init__(self, out: RunDir, depth: int) -> None:
        self.out = out
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))  # bounds the images held in memory
        self._error: BaseException | None = None  # the worker's first error
        self._raised = False  # whether the main thread has raised it already
        self._thread = threading.Thread(target=self._work, name="sdbatch-writer", daemon=True) if depth > 0 else None

    def __enter__(self) -> BackgroundWriter:
        if self._thread is not None:
            self._thread.start()
        return self

    def submit(self, image: Image.Image, params: dict[str, Any]) -> Path:
        """Queue one image (blocking while `depth` images wait); its path, written by the time the block ends."""
        if self._thread is None:
            return self.out.save(image, params)
        self._raise_error()
        self._queue.put((image, params))
        return self.out.path / params["file"]

    def __exit__(self, kind, error, traceback) -> None:
        if self._thread is None:
            return
        with deferred_interrupts():  # a second Ctrl-C waits until the images already made are on disk
            self._queue.put(_DONE)
            self._thread.join()
        if error is None:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _work(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is None:  # after a failure the rest would fail the same way: drop them
                try:
                    self.out.save(*item)
                except BaseException as exc:  # handed to the main thread, which raises it
                    self._error = exc

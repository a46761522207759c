"""The run directory: config.yaml, images written atomically with their metadata (and NAME.txt sidecars),
manifest.jsonl, resume, grids."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sdbatch import __version__
from sdbatch.errors import OutputError
from sdbatch.outputs.files import (
    DirectoryBusy,
    acquire_writer_lock,
    atomic_write_text,
    deferred_interrupts,
    describe_os_error,
)
from sdbatch.outputs.image_formats import intact_image, save_image
from sdbatch.outputs.metadata import infotext
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.png_info import MANIFEST  # one name: read-back finds a JPEG's or WebP's record there too

CONFIG = "config.yaml"
GRID = "grid.png"


class RunDir:
    """One run's output directory: config.yaml, images written atomically, manifest.jsonl, resume.

    Images are written in the format their file name says (`image_formats`), JPEG and WebP at `quality`;
    with `sidecar` each image's infotext is also written beside it as NAME.txt (A1111's option). `on_save`
    is called after each image and its manifest line are written.
    """

    def __init__(self, path: Path, *, resume: bool = True, quality: int = 95, sidecar: bool = False,
                 on_save: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.on_save = on_save  # called after each saved image (the gallery page)
        self.resume = resume
        self.quality, self.sidecar = quality, sidecar
        self.manifest = self.path / MANIFEST
        self.saved: list[str] = []  # files this RunDir wrote, in order
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError("permission denied")
            self._done = self._load_manifest()
        except OSError as exc:
            raise OutputError(
                f"cannot write to output directory {self.path}: {exc.strerror or exc}; "
                "set hydra.run.dir to a writable folder"
            ) from None

    def _load_manifest(self) -> dict[str, dict[str, Any]]:
        """{file: its last complete manifest line}; a partial last line (killed process) is cut off.

        A file can have several lines (an image redone on resume because it was damaged): the last one wins.
        """
        if not self.manifest.exists():
            return {}
        data = self.manifest.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        records = [_json_line(line) for line in lines]
        last = _json_line(tail) if tail else None
        if tail:
            self._repair_tail(len(data) - len(tail), complete=last is not None)
        records.append(last)
        return {rec["file"]: rec for rec in records if rec and isinstance(rec.get("file"), str)}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Be the only writer of this directory for the block (its .sdbatch.lock; a second process gets
        OutputError naming the holder's PID). The manifest is read again under the lock."""
        try:
            release = acquire_writer_lock(self.path)
        except DirectoryBusy:
            raise
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.path)) from None
        try:
            try:
                self._done = self._load_manifest()
            except OSError as exc:
                raise _write_error(self.manifest, exc) from None
            yield
        finally:
            release()

    def _repair_tail(self, offset: int, *, complete: bool) -> None:
        """Terminate a whole last record, or drop a partial one, so the next append starts a fresh line."""
        with open(self.manifest, "r+b") as fh:
            if complete:
                fh.seek(0, os.SEEK_END)
                fh.write(b"\n")
            else:
                fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())

    def write_config(self, resolved: Mapping[str, Any] | DictConfig, models: Mapping[str, str]) -> Path:
        """Write config.yaml: the resolved run spec, the sdbatch version and {model file: short sha256}."""
        if isinstance(resolved, DictConfig):
            resolved = OmegaConf.to_container(resolved, resolve=True)
        data = {**dict(resolved), "sdbatch_version": __version__, "model_hashes": dict(models)}
        text = OmegaConf.to_yaml(OmegaConf.create(data))
        target = self.path / CONFIG
        try:
            atomic_write_text(target, text)
        except OSError as exc:
            raise _write_error(target, exc) from None
        return target

    def done_files(self) -> set[str]:
        """File names already listed in manifest.jsonl (from earlier runs and this one)."""
        return set(self._done)

    def is_done(self, job: ImageJob) -> bool:
        """True when resuming and the image is both in the manifest and on disk, undamaged (`intact_image`)."""
        return self.resume and job.file_name in self._done and intact_image(self.path / job.file_name)

    def damaged(self, jobs: Iterable[ImageJob]) -> list[str]:
        """Files of `jobs` the manifest lists that are missing or damaged on disk (resume makes them again)."""
        if not self.resume:
            return []
        return [job.file_name for job in jobs if job.file_name in self._done and not self.is_done(job)]

    def save(self, image: Image.Image, params: Mapping[str, Any]) -> Path:
        """Write the image atomically with its metadata (and its sidecar), then append its manifest line."""
        target = self.path / params["file"]
        try:
            with deferred_interrupts():  # an interrupt waits until the image and its line are both written
                save_image(target, image, params, self.quality)
                if self.sidecar:
                    atomic_write_text(target.with_suffix(".txt"), infotext(params) + "\n")
                self._append_manifest(params)
                self._done[params["file"]] = dict(params)
                self.saved.append(params["file"])
        except OSError as exc:
            raise _write_error(target, exc) from None
        if self.on_save is not None:
            self.on_save()
        return target

    def save_grid(self, files: list[str], cols: int) -> Path:
        """grid.png: the given images in order, `cols` per row, each cell as large as the largest image."""
        images = [Image.open(self.path / name).convert("RGB") for name in files]
        cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
        cols = max(1, min(cols, len(images)))
        grid = Image.new("RGB", (cols * cell_w, math.ceil(len(images) / cols) * cell_h))
        for i, im in enumerate(images):
            grid.paste(im, ((i % cols) * cell_w, (i // cols) * cell_h))
        return self.save_sheet(grid, GRID)

    def save_sheet(self, image: Image.Image, name: str) -> Path:
        """A contact sheet or grid image in the run directory, written atomically, without metadata."""
        target = self.path / name
        try:
            save_image(target, image, None, self.quality)
        except OSError as exc:
            raise _write_error(target, exc) from None
        return target

    def _append_manifest(self, params: Mapping[str, Any]) -> None:
        line = json.dumps(dict(params), ensure_ascii=False) + "\n"
        with open(self.manifest, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def _write_error(target: Path, exc: OSError) -> OutputError:
    """One line naming the file; `.errno` is kept (a full disk stops a multirun)."""
    error = OutputError(describe_os_error(exc, target))
    error.errno = exc.errno
    return error


def _json_line(line: bytes) -> dict[str, Any] | None:
    """One manifest record, or None for a blank, partial or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None

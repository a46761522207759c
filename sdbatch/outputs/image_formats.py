"""Image files in the format their name says (output.format): how each is written with its metadata, the way
A1111 writes it, and how resume checks that a file is whole.

PNG: text chunks (`parameters`, the reference tool's keys, `sdbatch`). JPEG and WebP: the infotext in EXIF
UserComment (sdbatch.prompts.exif_comment); sdbatch's JSON record stays in manifest.jsonl, which read-back uses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from sdbatch.outputs.files import atomic_save_image
from sdbatch.outputs.metadata import infotext, pnginfo
from sdbatch.prompts.exif_comment import MAX_EXIF_BYTES, exif_with_comment

log = logging.getLogger(__name__)

PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: empty, with its fixed CRC
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"  # start and end of image markers


def save_image(target: Path, image: Image.Image, params: Mapping[str, Any] | None, quality: int) -> Path:
    """Write `image` atomically in the format of `target`'s suffix (PNG when unknown), with `params`' metadata
    (none when None); `quality` for JPEG and WebP."""
    kind = PIL_FORMATS.get(Path(target).suffix.lower(), "PNG")
    if kind == "PNG":
        return atomic_save_image(target, image, format="PNG", pnginfo=pnginfo(params) if params is not None else None)
    if kind == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha
    args: dict[str, Any] = {"format": kind, "quality": quality}
    if params is not None:
        exif = exif_with_comment(infotext(params))
        if len(exif) <= MAX_EXIF_BYTES:
            args["exif"] = exif
        else:  # JPEG keeps EXIF in one 64 KiB segment; the manifest (and a sidecar) keep the text
            log.warning("%s: the infotext is too long for EXIF (%d bytes); written without it", target.name,
                        len(exif))
    return atomic_save_image(target, image, **args)


def intact_image(path: Path) -> bool:
    """Cheap check of a listed image (two small reads): not empty, and a PNG, JPEG or WebP starts and ends as a
    whole file of its format does (PNG signature … IEND; JPEG SOI … EOI; WebP's RIFF size = the file's)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - len(_PNG_END)))
            tail = fh.read()
    except OSError:
        return False
    kind = PIL_FORMATS.get(path.suffix.lower())
    if kind == "PNG":
        return size >= len(_PNG_START) + len(_PNG_END) and head.startswith(_PNG_START) and tail == _PNG_END
    if kind == "JPEG":
        return size >= 4 and head.startswith(_JPEG_START) and tail.endswith(_JPEG_END)
    if kind == "WEBP":
        riff_size = int.from_bytes(head[4:8], "little")
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP" and riff_size + 8 == size
    return size > 0

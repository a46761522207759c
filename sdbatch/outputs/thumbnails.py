"""Gallery thumbnails: a small WebP (JPEG where Pillow lacks WebP) under thumbs/ for images over 512 px.

Smaller images are their own thumbnails: the page shows the image itself, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, features

from sdbatch.outputs.files import atomic_save_image

THUMBS = "thumbs"  # beside the images, in the run directory
LARGEST = 512  # images wider or taller than this get a thumbnail
SIZE = 384  # the thumbnail's longer side: sharp in a ~190 px card on a 2x screen
_FORMAT, _SUFFIX = ("WEBP", ".webp") if features.check("webp") else ("JPEG", ".jpg")


def thumbnail_name(file: str) -> str:
    """The thumbnail's path, relative to the run directory, for image `file`."""
    return f"{THUMBS}/{Path(file).stem}{_SUFFIX}"


def thumbnail(run_dir: Path, file: str) -> str:
    """The path (relative to run_dir) the gallery shows for image `file`: its thumbnail, written atomically if
    missing or older than the image, or the image itself when it is small (or unreadable: the page says so)."""
    source = Path(run_dir) / file
    target = Path(run_dir) / thumbnail_name(file)
    try:
        if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            return thumbnail_name(file)
        with Image.open(source) as image:
            if max(image.size) <= LARGEST:
                return file
            small = image.convert("RGB")
        small.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
        target.parent.mkdir(exist_ok=True)
        atomic_save_image(target, small, format=_FORMAT, quality=82)
    except OSError:
        return file
    return thumbnail_name(file)

"""Image metadata read back: A1111 infotext parsed as A1111 does, a PNG's text chunks (`parameters`, `sdbatch`)
and a JPEG's or WebP's EXIF UserComment, where A1111 and sdbatch put the infotext in those formats.

A JPEG or WebP has no room for sdbatch's JSON record (EXIF is one 64 KiB segment, and the infotext fills it
first); for sdbatch's own JPEG/WebP images the record comes from the run's manifest.jsonl beside them.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from sdbatch.errors import OutputError
from sdbatch.prompts.exif_comment import read_comment

MANIFEST = "manifest.jsonl"  # a run directory's record of its images (written by sdbatch.outputs.run_dir)

# A1111 modules/infotext_utils.py: one `key: value` pair of the parameters line, and an image size value.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def _split_prompts(lines: Iterable[str]) -> tuple[str, str]:
    """Prompt and negative prompt from the text lines above the parameters line."""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative)


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parse_params_line(line: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, raw in RE_PARAM.findall(line):
        if not raw:  # A1111 fails on an empty value and skips the entry
            continue
        value = _unquote(raw)
        size = RE_IMAGESIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def parse_infotext(text: str) -> dict[str, str]:
    """Read infotext back as A1111's parse_generation_parameters does (values stay strings)."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    result = _parse_params_line(last)
    result["Prompt"], result["Negative prompt"] = _split_prompts(lines)
    result.setdefault("Clip skip", "1")  # a missing Clip skip means 1
    return result


def image_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """An image's text metadata: a PNG's text chunks; for any format without a `parameters` chunk, the EXIF
    UserComment (A1111's JPEG/WebP infotext) as `parameters`. Raises OSError for an unreadable image."""
    with Image.open(path) as image:
        text = {key: value for key, value in (getattr(image, "text", None) or image.info).items()
                if isinstance(value, str)}
        if "parameters" not in text and (comment := read_comment(image)):
            text["parameters"] = comment
    return text


def sdbatch_record(path: str | os.PathLike[str], text: dict[str, str]) -> dict[str, Any] | None:
    """sdbatch's JSON record of an image: its `sdbatch` chunk, or for a JPEG/WebP (no such chunk) the last line
    of the manifest.jsonl beside it that lists it; None for another tool's image."""
    data = text.get("sdbatch")
    if data is None and Path(path).suffix.lower() != ".png":
        manifest = Path(path).parent / MANIFEST
        try:
            stat = manifest.stat()
            return _manifest_records(str(manifest), stat.st_mtime_ns, stat.st_size).get(Path(path).name)
        except OSError:  # no run directory around the image
            return None
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else None


@functools.lru_cache(maxsize=4)
def _manifest_records(manifest: str, mtime_ns: int, size: int) -> dict[str, dict[str, Any]]:
    """{file: its last manifest line}; cached per file version, as a folder of images asks once per image."""
    records: dict[str, dict[str, Any]] = {}
    with open(manifest, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and isinstance(record.get("file"), str):
                records[record["file"]] = record
    return records


def read_image_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """`image_text`, with an unreadable file as one OutputError line."""
    try:
        return image_text(path)
    except OSError as exc:
        raise OutputError(f"cannot read image metadata from {path}: {exc}; check that it is a PNG, JPEG or "
                          "WebP image") from None


def read_png_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An image's `parameters` (infotext) and `sdbatch` (parsed JSON) record; None where absent. For PNG, JPEG
    and WebP (`image_text`, `sdbatch_record`)."""
    text = read_image_text(path)
    return {"parameters": text.get("parameters"), "sdbatch": sdbatch_record(path, text)}

"""PNG metadata read back: A1111 infotext parsed as A1111 does, and a PNG's `parameters` and `sdbatch` chunks."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

from PIL import Image

from sdbatch.errors import OutputError

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


def read_png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """Every text chunk of a PNG (tEXt, zTXt, iTXt), by key."""
    try:
        with Image.open(path) as image:
            return {str(k): str(v) for k, v in (getattr(image, "text", {}) or {}).items()}
    except OSError as exc:
        raise OutputError(f"cannot read image metadata from {path}: {exc}; check that it is a PNG") from None


def read_png_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `parameters` (infotext) and `sdbatch` (parsed JSON) text chunks of a PNG; None where absent."""
    text = read_png_text(path)
    data = text.get("sdbatch")
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = None
    return {"parameters": text.get("parameters"), "sdbatch": parsed if isinstance(parsed, dict) else None}

"""`sdbatch-info FILE...`: what one file says about itself, for people.

An image (PNG, JPEG, WebP) shows the parameters it was made with (A1111's `parameters` infotext, sdbatch's own
JSON record and any other text, such as gen_img's `prompt`/`seed` keys); a model file shows its kind, family, key
count, short hash and metadata, and a LoRA its training metadata (the `+info=lora` block). Nothing is generated and
no model is built."""

from __future__ import annotations

import json
from pathlib import Path

from sdbatch.cli.info import format_lora_meta, line, print_blocks, printable
from sdbatch.config.model_folders import KINDS
from sdbatch.prompts.png_info import read_image_text, sdbatch_record

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_SHOWN_META = 12  # metadata entries of a model file shown (LoRA training metadata has its own block)


def show_files(files: list[str]) -> int:
    """Print each file's block (`print_blocks`: a file that cannot be read is one line on stderr, status 2)."""
    return print_blocks(files, describe_file)


def describe_file(file: str) -> str:
    """An image's parameters, or a model file's description, by the file's extension."""
    return describe_image(file) if Path(file).suffix.lower() in IMAGE_SUFFIXES else describe_model(file)


def describe_image(file: str) -> str:
    """An image's generation parameters: infotext as written (a PNG chunk, or A1111's EXIF UserComment in a JPEG or
    WebP), sdbatch's JSON (its chunk, or the run's manifest line; keys with a value), other text keys."""
    text = read_image_text(file)
    if "sdbatch" not in text and (record := sdbatch_record(file, text)) is not None:
        text["sdbatch"] = json.dumps(record)
    lines = [printable(file)]
    if "parameters" in text:
        lines += ["  A1111 parameters:", *(f"    {printable(row)}" for row in text["parameters"].splitlines())]
    if "sdbatch" in text:
        lines += ["  sdbatch parameters:", *_sdbatch_lines(text["sdbatch"])]
    others = {k: v for k, v in text.items() if k not in ("parameters", "sdbatch")}
    if others:  # gen_img's own keys (prompt, seed, scale, ...) or another tool's
        lines += ["  other text:", *(line(key, value, indent=4) for key, value in others.items())]
    if len(lines) == 1:
        lines.append("  (no generation parameters: no parameters, sdbatch or other text chunk)")
    return "\n".join(lines)


def _sdbatch_lines(data: str) -> list[str]:
    try:
        params = json.loads(data)
    except ValueError:
        return ["    (not valid JSON)"]
    if not isinstance(params, dict):
        return ["    (not a JSON object)"]
    return [line(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), indent=4)
            for key, value in params.items() if value not in (None, "", [], {})]


def describe_model(file: str) -> str:
    """A model file's kind, family, keys, hash and metadata; a LoRA's training metadata block."""
    from sdbatch.engine.models.file_info import model_file_info  # torch loads only now
    from sdbatch.engine.models.lora_meta import read_lora_meta

    info = model_file_info(file)
    if info.kind == "lora" and Path(file).suffix.lower() == ".safetensors":
        return format_lora_meta(read_lora_meta(file)) + "\n" + line("kind", f"LoRA, {info.keys} tensors")
    label = KINDS[info.kind].label if info.kind in KINDS else info.kind
    kind = f"{label} ({info.family})" if info.family else label
    lines = [printable(info.path), line("kind", kind), line("tensors", str(info.keys)), line("short hash", info.hash)]
    shown = list(info.metadata.items())[:_SHOWN_META]
    lines += [line(key, value) for key, value in shown]
    if len(info.metadata) > len(shown):
        lines.append(f"  ... {len(info.metadata) - len(shown)} more metadata entries")
    return "\n".join(lines)

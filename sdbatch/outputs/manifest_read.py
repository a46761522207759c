"""A run directory's manifest.jsonl read back: each image's last complete record, in the order images first
appear (a line cut short by a killed process, or a foreign line, is skipped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdbatch.prompts.png_info import MANIFEST


def manifest_records(run_dir: Path) -> list[dict[str, Any]]:
    """{...} per image listed in run_dir/manifest.jsonl, the last line of a file winning; [] without a manifest."""
    try:
        text = (Path(run_dir) / MANIFEST).read_text(encoding="utf-8")
    except OSError:
        return []
    records: dict[str, dict[str, Any]] = {}
    for line in text.split("\n"):  # not splitlines(): a prompt may hold U+2028, which it would split at
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            records[record["file"]] = record
    return list(records.values())

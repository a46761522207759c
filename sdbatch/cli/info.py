"""LoRA training metadata for people: `python run.py +info=lora FILE...` and `network.show_meta=true`; and the
`+info=...` commands' entry (`+info=models` lists paths.models: sdbatch.cli.info_models).

`+info=lora` only reads the files' .safetensors headers: no model loads and nothing is generated. Hydra never
sees it (a bare FILE is not an override), so run.py hands the command line here first.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sdbatch.config.spec import NetworkConfig
from sdbatch.errors import SdbatchError

if TYPE_CHECKING:
    from sdbatch.engine.models.lora_meta import LoraMeta

log = logging.getLogger(__name__)

INFO_PREFIX = "+info="
USAGE = "python run.py +info=lora FILE [FILE...]"
MODELS_USAGE = "python run.py +info=models [paths.models=DIR]"
TOP_TAGS = 10
_MAX_VALUE = 400  # characters of one value shown; a training comment can be any length
_LABEL_WIDTH = 18

# (metadata key, label) in the order shown; kohya's sd-scripts write them (ss_*) and its hash tool (sshs_*)
_FIELDS = (
    ("ss_sd_model_name", "base model"),
    ("ss_network_module", "network module"),
    ("ss_network_dim", "network dim"),
    ("ss_network_alpha", "network alpha"),
    ("ss_network_args", "network args"),
    ("ss_resolution", "resolution"),
    ("ss_num_train_images", "train images"),
    ("ss_num_epochs", "epochs"),
    ("ss_steps", "steps"),
    ("ss_output_name", "output name"),
    ("sshs_model_hash", "sshs model hash"),
    ("ss_training_comment", "training comment"),
)

_shown: set[str] = set()  # files whose metadata network.show_meta printed in this process


def info_command(argv: list[str]) -> int | None:
    """`+info=lora FILE...` or `+info=models [OVERRIDES]` in argv: print the information, return the exit status;
    else None (a run)."""
    at = next((i for i, arg in enumerate(argv) if arg.startswith(INFO_PREFIX)), None)
    if at is None:
        return None
    kind, rest = argv[at].removeprefix(INFO_PREFIX), argv[:at] + argv[at + 1 :]
    if kind == "models":
        from sdbatch.cli.info_models import models_command

        return models_command(rest)
    if kind != "lora":
        return error(f"{argv[at]}: unknown info command; the info commands are {USAGE} and {MODELS_USAGE}")
    return lora_command(rest)


def lora_command(files: list[str]) -> int:
    """Print each LoRA file's training metadata block; the exit status (2 if any file could not be read)."""
    if not files:
        return error(f"+info=lora needs one or more LoRA files: {USAGE}")
    if files[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\nprints each .safetensors file's training metadata; loads no model")
        return 0
    from sdbatch.engine.models.lora_meta import read_lora_meta  # torch loads only now (the short hash)

    return print_blocks(files, lambda file: format_lora_meta(read_lora_meta(file)))


def print_blocks(files: list[str], describe: Callable[[str], str]) -> int:
    """Print `describe(file)` for each file, blank-line separated; the exit status. A file that cannot be read is
    one line on stderr (status 2), and the others are still shown."""
    status, printed = 0, 0
    for file in files:
        try:
            block = describe(file)
        except SdbatchError as ex:
            status = error(str(ex))
            continue
        print(("\n" if printed else "") + block, flush=True)
        printed += 1
    return status


def error(message: str) -> int:
    """Print one error line on stderr; the exit status of a user mistake (2)."""
    print(f"sdbatch: error: {printable(message)}", file=sys.stderr)
    return 2


def show_network_meta(network: NetworkConfig) -> None:
    """network.show_meta=true: log the training metadata of the run's network files, each once per process."""
    if not network.show_meta:
        return
    from sdbatch.engine.models.lora_meta import read_lora_meta
    from sdbatch.engine.models.tiny_lora import lora_path

    for lora in network.loras:
        path = Path(lora_path(lora.path)).expanduser()
        key = str(path.resolve())
        if key in _shown or not path.is_file():  # a missing file: the run stops on it with its own error
            continue
        _shown.add(key)
        try:
            log.info("training metadata <network.show_meta>\n%s", format_lora_meta(read_lora_meta(path)))
        except SdbatchError as ex:  # a .pt file, a damaged header: the run goes on (loading has its own checks)
            log.warning("network.show_meta: %s", printable(str(ex)))


def format_lora_meta(meta: LoraMeta) -> str:
    """A readable block: the file, its short hash, its training settings and most frequent tags."""
    lines = [printable(meta.name), line("short hash", meta.hash)]
    values = meta.metadata
    for key, label in _FIELDS:
        if key in values:
            shown = _compact_json(values[key]) if key == "ss_network_args" else values[key]
            lines.append(line(label, shown))
    if "ss_tag_frequency" in values:
        lines += _tag_lines(values["ss_tag_frequency"])
    if not any(key.startswith(("ss_", "sshs_")) for key in values):
        lines.append("  (no training metadata)")
    return "\n".join(lines)


def line(label: str, value: str, indent: int = 2) -> str:
    """One `label: value` row of an info block, the values aligned; the value made safe for a terminal."""
    return f"{' ' * indent}{label + ':':<{_LABEL_WIDTH - 1}} {printable(value)}"


def _compact_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        return f"{text} (not valid JSON)"


def _tag_lines(text: str) -> list[str]:
    """ss_tag_frequency ({dataset: {tag: count}}, JSON text) → the most frequent tags over all datasets."""
    try:
        datasets = json.loads(text)
    except ValueError:
        return [line("top tags", "(ss_tag_frequency is not valid JSON)")]
    counts: Counter[str] = Counter()
    sets = [tags for tags in datasets.values() if isinstance(tags, dict)] if isinstance(datasets, dict) else []
    for tags in sets:
        for tag, count in tags.items():
            if isinstance(count, int | float) and not isinstance(count, bool) and math.isfinite(count):
                counts[str(tag).strip()] += int(count)
    if not counts:
        return [line("top tags", "(ss_tag_frequency holds no tag counts)")]
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAGS]
    width = len(str(top[0][1]))
    summed = f"counts summed over {len(sets)} datasets" if len(sets) > 1 else "with their counts"
    return [line("top tags", f"{len(top)} of {len(counts)} ({summed})"),
            *(f"  {'':<{_LABEL_WIDTH}}{count:>{width}}  {printable(tag)}" for tag, count in top)]


def printable(text: str, limit: int = _MAX_VALUE) -> str:
    """Text from a file, safe for a terminal: control characters (ANSI escapes, newlines, bidi overrides) as
    backslash escapes, and at most `limit` characters of it."""
    more = f"... ({len(text)} characters)" if len(text) > limit else ""
    text = text[:limit]
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text) + more

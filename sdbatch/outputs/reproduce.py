"""The `sdbatch` command that makes one image of a run again, from the run's overrides and the image's record.

The run's own overrides (Hydra's `.hydra/overrides.yaml` in the run directory: the model, sampler, LoRA and other
settings the user gave) are kept, except those that choose which images a run makes (prompt source, seed,
count, grid axes, prompt S/R). The image's own values replace them: its prompt and negative prompt as they were
used (dynamic prompts and S/R already applied, `<lora:>` tags kept), its seed, `images_per_prompt=1`, and the
in-prompt options of its line other than seeds, negative prompt and file name. A fused-grid cell's values come
back as the overrides of their keys (a `network_muls` cell as `--am`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sdbatch.config.override_text import override, shell_override

OVERRIDES = ".hydra/overrides.yaml"  # Hydra's record of the run's command-line overrides
# keys whose values choose the run's images: the image's own values stand in for them
_IMAGE_CHOICE = re.compile(
    r"^[+~]*(prompt|prompt_file|prompt_module|prompts\.module_args|negative_prompt|seed|images_per_prompt|n_iter"
    r"|iter_same_seed|shuffle_prompts|interactive|prompt_sr|prompt_sr_words|grid(\..*)?|sweeps|init_image"
    r"|mask_image|hydra\..*)(=|$)")
_LINE_OPTIONS_DROPPED = ("d", "n", "f")  # seeds, negative prompt, file name: given as keys, or not needed
# grid axis keys that the image's prompt, negative prompt or seed already carry
_CARRIED = ("prompt", "negative_prompt", "seed", "prompt_sr")
_ALIASES = {"cfg_scale": "sampler.cfg_scale", "steps": "sampler.steps"}  # grid axis names that are not config keys


def run_overrides(run_dir: Path) -> list[str] | None:
    """The overrides the run was started with, or None when Hydra kept no record (hydra.output_subdir=null)."""
    try:
        data = yaml.safe_load((Path(run_dir) / OVERRIDES).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return [str(item) for item in data] if isinstance(data, list) else None


def command(record: Mapping[str, Any], overrides: Sequence[str] | None,
            cell: Mapping[str, str] | None = None) -> str:
    """One bash command line: `sdbatch <the run's overrides> prompt=... seed=... images_per_prompt=1 ...`."""
    cell = dict(cell or {})
    muls = cell.pop("network_muls", None)
    from_cell = _cell_words(record, cell)
    given = {word.partition("=")[0] for word in from_cell}  # a key given twice is an error in Hydra
    kept = [o for o in overrides or () if not _IMAGE_CHOICE.match(o) and _key(o) not in given]
    prompt = _with_options(str(record.get("prompt") or ""), str(record.get("raw_prompt") or ""), muls)
    words = [shlex.quote(o) for o in kept]
    words.append(shell_override("prompt", prompt, text=True))
    if record.get("negative_prompt"):
        words.append(shell_override("negative_prompt", str(record["negative_prompt"]), text=True))
    if isinstance(record.get("seed"), int):
        words.append(f"seed={record['seed']}")
    words.append("images_per_prompt=1")
    for key in ("init_image", "mask_image"):
        if record.get(key):
            words.append(shell_override(key, str(record[key]), text=True))
    return " ".join(["sdbatch", *words, *(shlex.quote(word) for word in from_cell)])


def _cell_words(record: Mapping[str, Any], cell: Mapping[str, str]) -> list[str]:
    """A fused-grid cell's values as overrides (unquoted for bash): each axis key as the config key it stands for.

    A sampler cell runs with the sampler's own schedule, and a guidance.weights cell ("0.5;1", the first models')
    comes back as every model's weight from the image's record.
    """
    words = []
    for key, value in cell.items():
        if key in _CARRIED:
            continue
        if key in ("sampler", "sampler.name"):
            words += [override("sampler.name", value), "sampler.schedule=default"]
        elif key == "guidance.weights":
            units = ((record.get("guidance") or {}).get("units")) or []
            words.append("guidance.weights=[" + ",".join(str(unit.get("weight")) for unit in units) + "]")
        else:
            words.append(override(_ALIASES.get(key, key), value))
    return words


def _with_options(prompt: str, raw: str, muls: str | None) -> str:
    """The image's prompt with its line's in-prompt options (but seeds, negative and file name), and a grid cell's
    network multipliers as `--am`."""
    options = [part for part in (" " + raw.strip()).split(" --")[1:]
               if part.split(maxsplit=1)[0:1] and part.split(maxsplit=1)[0].lower() not in _LINE_OPTIONS_DROPPED]
    if muls is not None:
        options = [o for o in options if o.split(maxsplit=1)[0].lower() != "am"]
        options.append("am " + muls.replace(";", ","))
    return " --".join([prompt.strip(), *(o.strip() for o in options)])


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")

"""Prompt sources: the inline `prompt` (string or list) and `prompt_file` → PromptLines with their origin.

Control characters (C0, U+0000 to U+001F, except tab and newline) cannot be stored in a PNG text chunk and
mean nothing to the tokenizer: every PromptLine drops them from its text and negative prompt, with a warning
naming the line (`clean_text`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sdbatch.errors import ConfigError

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")  # C0 control characters except tab (\x09) and newline (\x0a)


def clean_text(text: str, where: str) -> str:
    """`text` without C0 control characters (tab and newline kept), warning once naming `where` if any went."""
    if not isinstance(text, str) or not _CONTROL.search(text):
        return text
    found = sorted(set(_CONTROL.findall(text)))
    names = ", ".join(f"U+{ord(c):04X}" for c in found[:5]) + (", ..." if len(found) > 5 else "")
    log.warning("%s: removed %d control character(s) (%s); a PNG text chunk cannot hold them", where,
                len(_CONTROL.findall(text)), names)
    return _CONTROL.sub("", text)


@dataclass(frozen=True, slots=True)
class PromptLine:
    """One prompt as the user wrote it, and where it came from."""

    text: str
    negative: str
    origin: str  # "prompt", "prompt[2]" or "file.txt:14"
    init_image: str | None = None  # img2img: the image this line starts from
    mask_image: str | None = None  # inpainting: the mask of that image

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", clean_text(self.text, self.origin))
        object.__setattr__(self, "negative", clean_text(self.negative, f"{self.origin} (negative prompt)"))


def read_prompts(prompt: str | list[str] | None, negative: str, prompt_file: str | None) -> list[PromptLine]:
    """All prompt lines of a run: the file's lines first (if any), then the inline prompts."""
    negative = clean_text(negative, "negative_prompt")  # once for the run, not once per line
    lines = read_prompt_file(Path(prompt_file), negative) if prompt_file else []
    if isinstance(prompt, str):
        lines.append(PromptLine(prompt, negative, "prompt"))
    elif prompt:
        lines.extend(PromptLine(p, negative, f"prompt[{i}]") for i, p in enumerate(prompt))
    if not lines:
        raise ConfigError(f"prompt_file {prompt_file} holds no prompt lines (only blanks or '#' comments)")
    return lines


def read_prompt_file(path: Path, negative: str) -> list[PromptLine]:
    """UTF-8 (a BOM is dropped), one prompt per line; blank lines and lines starting with '#' are skipped."""
    if path.is_dir():
        raise ConfigError(f"prompt_file {path} is a folder, not a file; give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"prompt_file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as ex:
        raise ConfigError(f"prompt_file {path} cannot be read as UTF-8 text: {ex}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            line = clean_text(line, f"{path.name}:{number}").strip()
        if line and not line.startswith("#"):
            lines.append(PromptLine(line, negative, f"{path.name}:{number}"))
    return lines

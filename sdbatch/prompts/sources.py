"""Prompt sources: the inline `prompt` (string or list) and `prompt_file` → PromptLines with their origin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdbatch.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PromptLine:
    """One prompt as the user wrote it, and where it came from."""

    text: str
    negative: str
    origin: str  # "prompt", "prompt[2]" or "file.txt:14"
    init_image: str | None = None  # img2img: the image this line starts from
    mask_image: str | None = None  # inpainting: the mask of that image


def read_prompts(prompt: str | list[str] | None, negative: str, prompt_file: str | None) -> list[PromptLine]:
    """All prompt lines of a run: the file's lines first (if any), then the inline prompts."""
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
            lines.append(PromptLine(line, negative, f"{path.name}:{number}"))
    return lines

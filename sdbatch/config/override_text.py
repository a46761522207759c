"""Text as a value of Hydra's override grammar: the one quoting the command line, gen_img's translation and the
gallery's "copy command" all use, so a value written by one reads back the same through Hydra."""

from __future__ import annotations

import re
import shlex


def hydra_quoted(text: str) -> str:
    """`text` as a double-quoted value of Hydra's override grammar (commas, brackets, colons kept literally)."""
    text = re.sub(r'(\\+)(?="|$)', lambda m: m[1] * 2, text)  # backslashes before a quote are escapes there
    return '"' + text.replace('"', '\\"').replace("${", "\\${") + '"'


def override(key: str, value: str, *, text: bool = False) -> str:
    """`key=value` as Hydra reads it back as `value`: quoted for Hydra when it must be, and always when `text`
    (a prompt "123" or "true" stays a string)."""
    plain = not text and re.fullmatch(r"[\w.+\-/@%]+", value) is not None
    return f"{key}={value if plain else hydra_quoted(value)}"


def shell_override(key: str, value: str, *, text: bool = False) -> str:
    """`override` as one bash word."""
    return shlex.quote(override(key, value, text=text))

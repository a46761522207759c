"""Quoting for Hydra's override grammar and for bash: the value forms a user can copy and paste.

Hydra reads `key=value` with its own grammar: commas make a sweep, and parentheses, brackets, colons, `<`, `>`
and spaces next to them are syntax. A prompt like `masterpiece, (red:1.2) cube` must reach Hydra in double quotes,
and those quotes must survive bash, so the working form is `'prompt="masterpiece, (red:1.2) cube"'`. Hydra's own
error ("mismatched input ' ' expecting <EOF>") names neither the key nor the fix; `quoting_hint` finds the
override Hydra could not read and writes that form.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from sdbatch.config.override_text import hydra_quoted

# characters that make Hydra read a value as syntax (or a sweep) rather than text
_SPECIAL = re.compile(r"[,()\[\]{}:<>='\"]")
_FLAG = re.compile(r"^-")  # Hydra's own flags (-m, --cfg job, ...) are not overrides


def bash_form(key: str, value: str) -> str:
    """The override as one bash word that reaches Hydra as `key="value"`: `'prompt="a, (b:1.2)"'`."""
    return shlex.quote(f"{key}={_quoted_value(value)}")


def quoting_hint(overrides: Iterable[str], multirun: bool) -> str | None:
    """'; KEY: quote ...' for the first override Hydra cannot read whose value has commas, parentheses,
    brackets, colons or <...>; in a single run, a comma sweep counts too ("Ambiguous value"). None when none."""
    parser = OverridesParser.create()
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or _FLAG.match(override) or not _SPECIAL.search(value):
            continue
        try:
            parsed = parser.parse_override(override)
        except HydraException:
            return _hint(key, value)
        if parsed.is_sweep_override() and not multirun and not _is_sweep_function(value):
            return _hint(key, value)
    return None


def _hint(key: str, value: str) -> str:
    name = key.lstrip("+~")
    if name.startswith("grid.") and name.count(".") == 1 and ":" in value:
        axis, _, values = value.partition(":")
        items = ",".join(_list_item(v.strip()) for v in values.split(","))
        return (f"; {name}: Hydra reads KEY:V1,V2 as its own syntax unless quoted; give the axis as "
                f"{name}.key={axis.strip()} {shlex.quote(f'{name}.values=[{items}]')} (or quote it: "
                f"{bash_form(key, value)})")
    return (f"; {name}: Hydra cannot read this value as text (commas, parentheses, brackets, colons and <...> are "
            f"its syntax); quote it for Hydra inside bash quotes: {bash_form(key, value)}")


def _quoted_value(value: str) -> str:
    """A list `[a, (b)]` keeps its brackets with each item quoted; anything else becomes one quoted string."""
    inner = value.strip()
    if inner.startswith("[") and inner.endswith("]"):
        return "[" + ",".join(_list_item(item.strip()) for item in _split_items(inner[1:-1])) + "]"
    return hydra_quoted(value)


def _list_item(item: str) -> str:
    """A list item quoted only when Hydra would read it as syntax."""
    if (item.startswith('"') and item.endswith('"')) or (item.startswith("'") and item.endswith("'")):
        return item
    return hydra_quoted(item) if _SPECIAL.search(item) or " " in item else item


def _split_items(text: str) -> list[str]:
    """List items split at commas outside quotes and parentheses (an item may be `(red:1.2)`)."""
    items, depth, quote, start = [], 0, "", 0
    for at, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:at])
            start = at + 1
    return [*items, text[start:]]


def _is_sweep_function(value: str) -> bool:
    """range(...), choice(...), glob(...): a sweep the user meant (Hydra says so itself in a single run)."""
    return re.match(r"\s*(range|choice|glob|interval|tag|shuffle|sort)\(", value) is not None

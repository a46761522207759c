"""One prompt line → its prompt text and validated in-prompt options (`--n`, `--w`, `--d`, ...), table-driven.

A line is split on " --" (space, dash, dash) like the reference tool: the first part is the prompt, each
other part is one option, its name (case-insensitive) up to the first whitespace and its value after it.
`a--b` is not split, so a prompt can hold "--" but never " --". A line that is only options has an empty
prompt. Unlike the reference, nothing is ignored or clamped silently: an unknown option, a missing or
malformed value, an out-of-range value or an option given twice raises `PromptError` with one line naming
the origin ("prompts.txt:4"), the option as written and what would fix it.

Every field of `LineOptions` is None when the line does not give it; the planner falls back to the run's
config then. A per-image feature's options ("dsd1" → "deep_shrink.depth_1") fill that feature's line-override
class (`LINE` of its config class, see `sdbatch.config.spec.image_features`) in the LineOptions field named after
the feature: a feature's options are its rows of `_OPTIONS` and its field of `LineOptions`.
Dynamic prompts (`{a|b}`, `__wildcard__`) are not handled here (see `dynamic.py`).
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdbatch.config.deep_shrink_schema import DeepShrink
from sdbatch.config.gradual_latent_schema import GradualLatent
from sdbatch.config.sdxl_schema import SdxlLine
from sdbatch.config.spec import RunSpec, image_features
from sdbatch.errors import PromptError


class Off(enum.Enum):
    """An option written as `none` on the line: explicitly off, overriding the run's value."""

    OFF = "none"

    def __repr__(self) -> str:
        return "OFF"


OFF = Off.OFF  # `--nl none`: no negative scale for this prompt, even when the run sets one


@dataclass(frozen=True, slots=True)
class LineOptions:
    """The options one prompt line sets; every field is None when the line does not give it."""

    negative: str | None = None  # --n
    width: int | None = None  # --w, pixels, positive multiple of 8
    height: int | None = None  # --h
    steps: int | None = None  # --s, 1..1000
    seeds: tuple[int, ...] | None = None  # --d, one per image of the prompt
    cfg_scale: float | None = None  # --l
    negative_scale: float | Off | None = None  # --nl; OFF = written as "none"
    strength: float | None = None  # --t, img2img strength in (0, 1]
    network_muls: tuple[float, ...] | None = None  # --am, one per network (may be negative)
    clip_prompt: str | None = None  # --c
    file_name: str | None = None  # --f, plain name ending in .png (added when missing)
    # per-image features: their LINE overrides (sdbatch.config.*_schema), named as the feature
    deep_shrink: DeepShrink | None = None  # --dsd1 --dst1 --dsd2 --dst2 --dsr
    gradual_latent: GradualLatent | None = None  # --glt --glr --gle --gls --glsn --glus
    sdxl: SdxlLine | None = None  # --ow --oh --nw --nh --ct --cl (SDXL models only)


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """A prompt line split into prompt text and options, with the raw line and its origin."""

    prompt: str
    options: LineOptions
    raw: str
    origin: str


class _Bad(ValueError):
    """A value that does not fit its option; args[0] (optional) is a hint appended to the message."""


_INT = re.compile(r"[+-]?[0-9]{1,30}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_BAD_NAME_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')


def _int(value: str) -> int:
    if not _INT.fullmatch(value):
        raise _Bad()
    return int(value)


def _float(value: str) -> float:
    if not _FLOAT.fullmatch(value) or not math.isfinite(number := float(value)):
        raise _Bad()
    return number


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not lo <= (number := _int(value)) <= hi:
            raise _Bad()
        return number

    return parse


def _float_if(test: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(value: str) -> float:
        if not test(number := _float(value)):
            raise _Bad()
        return number

    return parse


def _list_of(item: Callable[[str], Any], counts: range | None = None) -> Callable[[str], tuple]:
    """Comma-separated items (spaces around them allowed); `counts` limits how many."""

    def parse(value: str) -> tuple:
        items = []
        for part in value.split(","):
            try:
                items.append(item(part.strip()))
            except _Bad:
                raise _Bad(f" (bad item {part.strip()!r})") from None
        if counts is not None and len(items) not in counts:
            raise _Bad(f" ({len(items)} items)")
        return tuple(items)

    return parse


def _size(value: str) -> int:
    number = _int(value)
    if number <= 0 or number % 8:
        raise _Bad(f" (nearest: {max(8, (number + 4) // 8 * 8)})")
    return number


def _text(value: str) -> str:
    return value


def _negative_scale(value: str) -> float | Off:
    return OFF if value.lower() == "none" else _float(value)


def _file_name(value: str) -> str:
    if _BAD_NAME_CHARS.search(value) or ".." in value or value.startswith("."):
        raise _Bad()
    if value.lower().endswith(".png") and len(value) > 4:
        return value
    if "." not in value:
        return value + ".png"
    stem, _, ext = value.rpartition(".")
    suggestion = (stem if ext.isalpha() and len(ext) <= 4 else value.rstrip(".")) + ".png"
    raise _Bad(f"; sdbatch writes PNG: try {suggestion!r}")


@dataclass(frozen=True, slots=True)
class _Option:
    name: str  # as written after "--", lower case
    field: str  # LineOptions field, or "feature.field" for a per-image feature's LINE class (deep_shrink.ratio)
    parse: Callable[[str], Any]  # raises _Bad
    expects: str  # completes "--x expects ..."


_TIMESTEP = "a timestep from 0 to 1000"
_RATIO = "a number in (0, 1]"
_OPTIONS: tuple[_Option, ...] = (
    _Option("n", "negative", _text, "a negative prompt"),
    _Option("w", "width", _size, "a positive multiple of 8"),
    _Option("h", "height", _size, "a positive multiple of 8"),
    _Option("s", "steps", _int_in(1, 1000), "an integer from 1 to 1000"),
    _Option("d", "seeds", _list_of(_int_in(0, 2**32 - 1)), "comma-separated seeds from 0 to 4294967295"),
    _Option("l", "cfg_scale", _float, "a number, e.g. 7.5"),
    _Option("nl", "negative_scale", _negative_scale, "a number or 'none'"),
    _Option("t", "strength", _float_if(lambda x: 0 < x <= 1), _RATIO),
    _Option("am", "network_muls", _list_of(_float), "comma-separated numbers, e.g. 0.8,-0.5"),
    _Option("c", "clip_prompt", _text, "a prompt"),
    _Option("f", "file_name", _file_name, "a plain file name (no folders, no '..'), ending in .png or without one"),
    _Option("dsd1", "deep_shrink.depth_1", _int_in(0, 3), "a down-block index from 0 to 3"),
    _Option("dst1", "deep_shrink.timesteps_1", _int_in(0, 1000), _TIMESTEP),
    _Option("dsd2", "deep_shrink.depth_2", _int_in(0, 3), "a down-block index from 0 to 3"),
    _Option("dst2", "deep_shrink.timesteps_2", _int_in(0, 1000), _TIMESTEP),
    _Option("dsr", "deep_shrink.ratio", _float_if(lambda x: 0 < x <= 1), _RATIO),
    _Option("glt", "gradual_latent.timesteps", _int_in(1, 1000), "a timestep from 1 to 1000"),
    _Option("glr", "gradual_latent.ratio", _float_if(lambda x: 0 < x <= 1), _RATIO),
    _Option("gle", "gradual_latent.every_n_steps", _int_in(1, 1000), "a positive integer (steps)"),
    _Option("gls", "gradual_latent.ratio_step", _float_if(lambda x: x > 0), "a positive number"),
    _Option("glsn", "gradual_latent.s_noise", _float_if(lambda x: x >= 0), "a number >= 0"),
    _Option("glus", "gradual_latent.unsharp", _list_of(_float, range(3, 5)),
            "ksize,sigma,strength[,target_x], e.g. 3,0.5,0.5,1"),
    _Option("ow", "sdxl.original_width", _int_in(1, 100_000), "a positive integer (pixels)"),
    _Option("oh", "sdxl.original_height", _int_in(1, 100_000), "a positive integer (pixels)"),
    _Option("nw", "sdxl.negative_original_width", _int_in(1, 100_000), "a positive integer (pixels)"),
    _Option("nh", "sdxl.negative_original_height", _int_in(1, 100_000), "a positive integer (pixels)"),
    _Option("ct", "sdxl.crop_top", _int_in(0, 100_000), "an integer >= 0 (pixels)"),
    _Option("cl", "sdxl.crop_left", _int_in(0, 100_000), "an integer >= 0 (pixels)"),
)
_BY_NAME = {option.name: option for option in _OPTIONS}


def parse_line(raw: str, origin: str) -> ParsedLine:
    """Split `raw` into prompt and options; raises PromptError (one line, starting with `origin`)."""
    prompt, *parts = (" " + raw.strip()).split(" --")
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for part in parts:
        token, value = _split_option(part)
        option = _lookup(token, origin)
        if option.name in seen:
            raise PromptError(f"{origin}: --{token} is given twice (first as --{seen[option.name]}); keep one")
        seen[option.name] = token
        values[option.field] = _value(option, token, value, origin)
    return ParsedLine(prompt.strip(), _build(values), raw, origin)


def _split_option(part: str) -> tuple[str, str]:
    """'w 512' → ('w', '512'); the name ends at the first whitespace, the value is stripped."""
    if not part or part[0].isspace():
        return "", part.strip()
    name, *value = part.split(None, 1)
    return name, value[0].strip() if value else ""


def _lookup(token: str, origin: str) -> _Option:
    name = token.lower()
    if name in _BY_NAME:
        return _BY_NAME[name]
    if not token:
        raise PromptError(f"{origin}: ' --' without an option name; options look like '--w 768' "
                          "(a prompt cannot contain ' --')")
    raise PromptError(f"{origin}: unknown prompt option --{token}{_unknown_hint(token)}")


def _unknown_hint(token: str) -> str:
    """'w512' → put a space; 'wdth' → did you mean; else the list of options."""
    name = token.lower()
    glued = [o for o in _BY_NAME if len(name) > len(o) and name.startswith(o) and name[len(o)] in "0123456789.-+"]
    if glued:
        cut = len(max(glued, key=len))
        return f"; put a space before the value: --{token[:cut]} {token[cut:]}"
    close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
    if close:
        return f"; did you mean --{close[0]}?"
    return "; known options: " + " ".join(f"--{o}" for o in _BY_NAME)


def _value(option: _Option, token: str, value: str, origin: str) -> Any:
    if not value:
        raise PromptError(f"{origin}: --{token} needs a value: {option.expects}")
    try:
        return option.parse(value)
    except _Bad as bad:
        hint = bad.args[0] if bad.args else ""
        raise PromptError(f"{origin}: --{token} expects {option.expects}, got {_show(value)}{hint}") from None


def _show(value: str, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _build(values: dict[str, Any]) -> LineOptions:
    """Field paths ("width", "deep_shrink.ratio") → LineOptions with each feature's LINE overrides in `features`."""
    fields: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        group, _, name = path.rpartition(".")
        if group:
            groups.setdefault(group, {})[name] = value
        else:
            fields[name] = value
    features = image_features(RunSpec)
    for group, group_fields in groups.items():
        fields[group] = features[group].LINE(**group_fields)
    return LineOptions(**fields)

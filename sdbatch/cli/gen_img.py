"""`sdbatch-gen-img`: kohya-ss gen_img.py's command line, run as the equivalent `sdbatch` command.

The flags are the reference's (sdbatch.config.gen_img_flags), with its defaults; sdbatch.cli.gen_img_translate
turns them into Hydra overrides, and the run is exactly `sdbatch OVERRIDES...` (the same Hydra app in this
process), so its images equal that command's. `--print-overrides` prints the command instead of running it,
`--save-config FILE.yaml` writes it as a config to keep (`sdbatch --config-dir DIR --config-name NAME`).
A flag sdbatch does not support stops here with one line naming it (exit status 2), never silently.

argparse reads the flags (the reference uses it too, so spellings and abbreviations behave the same); the
quoting is ours: Hydra's grammar for values, then shlex for the shell.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from sdbatch.cli.gen_img_translate import Override, translate
from sdbatch.cli.quoting import hydra_quoted
from sdbatch.config.gen_img_flags import FLAGS
from sdbatch.errors import SdbatchError

PROG = "sdbatch-gen-img"
_BARE = re.compile(r"[A-Za-z_/][\w./:+\-]*", re.ASCII)  # strings Hydra reads as themselves without quotes (not ~)
_KEYWORDS = {"true", "false", "null", "nan", "inf", "yes", "no", "on", "off"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (an unknown flag, a bad value) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message}; see {PROG} --help")


def build_parser() -> argparse.ArgumentParser:
    """gen_img.py's flags (names, types, list arity, defaults) plus --print-overrides and --save-config."""
    parser = _Parser(prog=PROG, allow_abbrev=False, description="Run kohya-ss gen_img.py's command line with "
                     "sdbatch: the flags become sdbatch overrides (README: Migrating from gen_img.py).")
    parser.add_argument("--print-overrides", action="store_true",
                        help="print the equivalent sdbatch command instead of running it")
    parser.add_argument("--save-config", metavar="FILE.yaml",
                        help="write the run as a config (sdbatch --config-dir DIR --config-name NAME) and exit")
    for flag in FLAGS:
        names = [f"--{flag.name}", *(f"--{alias}" for alias in flag.aliases)]
        note = f"{flag.status}: {flag.note}" if flag.note else flag.status
        help_text = f"sdbatch: {flag.key or '-'} ({note})".replace("%", "%%")  # argparse %-formats help
        if flag.type is None:
            parser.add_argument(*names, dest=flag.name, action="store_true", help=help_text)
        else:
            nargs = int(flag.nargs) if flag.nargs and flag.nargs.isdigit() else flag.nargs
            parser.add_argument(*names, dest=flag.name, type=flag.type, nargs=nargs, default=flag.default,
                                help=help_text)
    return parser


# ---------------------------------------------------------------- quoting


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar: plain words bare, other strings quoted; lists and dicts nested."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {hydra_value(item)}" for key, item in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    return hydra_quoted(text)  # quoted, a literal ${...} escaped (not read as an interpolation)


def override_text(override: Override) -> str:
    """`key=value` as Hydra reads it on the command line."""
    value = override.value if override.group else hydra_value(override.value)
    return f"{override.key}={value}"


def command_line(overrides: list[Override]) -> str:
    """The equivalent `sdbatch ...` command, quoted for bash."""
    return " ".join(["sdbatch", *(shlex.quote(override_text(o)) for o in overrides)])


def config_yaml(overrides: list[Override], argv: list[str]) -> str:
    """A primary config: sdbatch's `config` with the groups chosen and the values set (ours win: `_self_`)."""
    defaults: list[Any] = ["config"]
    defaults += [{f"override {o.key}": o.value} for o in overrides if o.group]
    body: dict[str, Any] = {"defaults": [*defaults, "_self_"]}
    for override in overrides:
        if not override.group:
            *parents, leaf = override.key.split(".")
            node = body
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _escape(override.value)
    header = f"# made by: {PROG} {shlex.join(_without_save_config(argv))}\n"
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000)


def _without_save_config(argv: list[str]) -> list[str]:
    """The command line the config stands for: --save-config FILE itself left out."""
    kept, skip = [], False
    for word in argv:
        if not skip and not word.startswith("--save-config"):
            kept.append(word)
        skip = word == "--save-config"
    return kept


def _escape(value: Any) -> Any:
    """OmegaConf reads ${...} in a YAML string as an interpolation: escape it (lists and dicts too)."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [_escape(item) for item in value]
    if isinstance(value, dict):
        return {key: _escape(item) for key, item in value.items()}
    return value


def save_config(path: Path, overrides: list[Override], argv: list[str]) -> None:
    """Write the config and say how to run it; the name must not shadow sdbatch's own `config`."""
    if path.suffix not in (".yaml", ".yml") or path.stem == "config":
        _fail(f"--save-config {path}: give a FILE.yaml whose name is not 'config' (sdbatch's own config)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_yaml(overrides, argv), encoding="utf-8")
    except OSError as ex:
        _fail(f"--save-config {path}: cannot write it: {ex.strerror or ex}")
    folder = shlex.quote(str(path.parent.resolve()))
    print(f"{PROG}: saved {path}; run it with: sdbatch --config-dir {folder} --config-name {path.stem}",
          file=sys.stderr)


# ---------------------------------------------------------------- entry point


def _fail(message: str) -> NoReturn:
    for line in message.splitlines():
        print(f"{PROG}: error: {line}", file=sys.stderr)
    sys.exit(2)


def overrides_for(argv: list[str]) -> list[Override]:
    """The sdbatch overrides of a gen_img.py command line (flags only, without the program name)."""
    return translate(build_parser().parse_args(argv)).overrides


def run_overrides(overrides: list[Override]) -> int:
    """Run `sdbatch OVERRIDES...` in this process (the same Hydra app); its exit status."""
    from sdbatch.cli import main as sdbatch_main

    saved = sys.argv
    sys.argv = ["sdbatch", *(override_text(o) for o in overrides)]
    try:
        sdbatch_main.main()
    except SystemExit as ex:
        return ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> None:
    """The console script: translate, then print (--print-overrides), save (--save-config) or run."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        result = translate(args)
    except SdbatchError as ex:
        _fail(str(ex))
    for note in result.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if args.save_config:
        save_config(Path(args.save_config), result.overrides, argv)
    if args.print_overrides:
        print(command_line(result.overrides))
    if args.save_config or args.print_overrides:
        sys.exit(0)
    sys.exit(run_overrides(result.overrides))

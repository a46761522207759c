"""The `sdbatch-info` console command: `sdbatch-info models`, `sdbatch-info lora FILE...`, `sdbatch-info FILE...`.

The same information as `python run.py +info=...`, without Hydra's override syntax for the common case: a PNG's
parameters, a model file's kind and hash, a LoRA's training metadata, or the models under paths.models.
"""

from __future__ import annotations

import sys

from sdbatch.cli.info import info_command
from sdbatch.cli.info_files import show_files

USAGE = """usage: sdbatch-info models [paths.models=DIR]   the models under paths.models (SDBATCH_MODELS), with hashes
       sdbatch-info lora FILE...                 LoRA training metadata
       sdbatch-info FILE...                      an image's parameters, or a model file's kind, hash and metadata"""


def main(argv: list[str] | None = None) -> int:
    """Run one info command from `argv` (default: the command line); the exit status (2: a user mistake)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("models", "lora"):
        status = info_command([f"+info={args[0]}", *args[1:]])
        return 0 if status is None else status
    return show_files(args)


def console() -> None:
    """The console script's entry: exits with main's status."""
    sys.exit(main())

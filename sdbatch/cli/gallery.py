"""The `sdbatch-gallery DIR...` command (also `python -m sdbatch.gallery DIR...`): rebuild the index.html of
existing run or sweep directories from their manifests, including directories made before pages existed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdbatch.errors import OutputError
from sdbatch.outputs.gallery import rebuild


def main(argv: list[str] | None = None) -> int:
    """Rebuild each directory's page; print where it is. Exit status 2 when a directory is not a run or sweep."""
    parser = argparse.ArgumentParser(prog="sdbatch-gallery", description=__doc__.split("\n")[0].strip())
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a run or sweep directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    status = 0
    for directory in args.dirs:
        try:
            page = rebuild(directory)
        except OutputError as ex:
            print(f"sdbatch-gallery: {ex}", file=sys.stderr)
            status = 2
            continue
        print(f"{page}  (open it in a browser: file://{page.resolve()})")
    return status


def console() -> None:
    """The console script's entry: exits with main's status."""
    sys.exit(main())

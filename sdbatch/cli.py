"""Command-line glue: the Hydra task, and one-line reports for user mistakes (exit status 2)."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sdbatch.config.resolve import resolve
from sdbatch.errors import SdbatchError

log = logging.getLogger("sdbatch")

_QUOTING_HINT = (
    "; prompts with commas, parentheses or colons must be quoted for Hydra, e.g. "
    "prompt='masterpiece, (red:1.2) cube' (or put them in a prompt_file)"
)


def task(cfg: DictConfig) -> None:
    """The Hydra task: resolve the composed config and run it into Hydra's output directory."""
    from pathlib import Path

    from sdbatch.runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        spec = resolve(cfg)
        result = None
        try:
            result = run(spec, run_dir)
        finally:
            made = f"{len(result.written)} new image(s), {result.skipped} already done; " if result else ""
            log.info("%sOutput dir: %s", made, run_dir)
    except SdbatchError as ex:
        # Exit here: past this point Hydra would print its own "Error executing job" line first.
        print(f"sdbatch: error: {ex}", file=sys.stderr)
        raise SystemExit(2) from None


def guarded(main: Callable[[], None]) -> int:
    """Run Hydra's main; user mistakes become one line on stderr and exit status 2."""
    try:
        main()
    except SdbatchError as ex:
        print(f"sdbatch: error: {ex}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as ex:
        print(f"sdbatch: config error: {describe_config_error(ex)}", file=sys.stderr)
        return 2
    except OSError as ex:
        if ex.filename is None:
            raise
        # Hydra creates the run directory itself, before our task can turn this into an OutputError.
        print(f"sdbatch: error: cannot write {ex.filename}: {ex.strerror}; set hydra.run.dir "
              "(or hydra.sweep.dir) to a writable folder", file=sys.stderr)
        return 2
    return 0


def describe_config_error(ex: BaseException) -> str:
    """Hydra's multi-line compose errors → one line that keeps the key and the reason."""
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else ex
    text = str(cause)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    reason = next((ln for ln in lines if not re.match(r"(full_key|reference_type|object_type|To append)", ln)), "")
    message = f"{reason} (key: {full_key})" if full_key and full_key not in reason else reason
    options = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)+)", text)
    if options:
        message += f"; available options in '{options[1]}': {', '.join(options[2].split())}"
    whole = str(ex)
    if re.search(r"\b(negative_)?prompt=", whole) and ("Ambiguous value" in whole or "mismatched input" in whole):
        message += _QUOTING_HINT
    return message

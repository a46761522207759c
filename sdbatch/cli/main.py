"""The `sdbatch` console command: the same Hydra app as the checkout's `python run.py`, usable from any directory.

The configs ship inside the package as `sdbatch._conf` (pyproject.toml maps the repository's conf/ and sweeps/
there); from a checkout whose install predates that mapping, the checkout's conf/ is used. A user's own configs
join Hydra's search path with `--config-dir DIR` (Hydra's flag) or SDBATCH_CONFIG_DIR (one or more directories,
separated by the OS path separator), both searched after sdbatch's own configs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Let compose errors reach sdbatch.cli.hydra_app.guarded, which prints them as one line (exit 2).
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra  # noqa: E402
from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery  # noqa: E402
from hydra.core.plugins import Plugins  # noqa: E402
from hydra.plugins.search_path_plugin import SearchPathPlugin  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sdbatch.cli.hydra_app import guarded, task  # noqa: E402
from sdbatch.cli.info import info_command  # noqa: E402
from sdbatch.config.schema import register_configs  # noqa: E402
from sdbatch.errors import ConfigError  # noqa: E402

CONFIG_DIR_ENV = "SDBATCH_CONFIG_DIR"
JOB_NAME = "run"  # Hydra names the log after the job: run.log, as under `python run.py`


def packaged_config_dir() -> Path:
    """The directory holding config.yaml: the packaged sdbatch._conf, else a checkout's conf/."""
    spec = importlib.util.find_spec("sdbatch._conf")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "config.yaml").is_file():
            return Path(location).resolve()
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise ConfigError("sdbatch's configs are missing: neither the sdbatch._conf package nor a checkout's conf/ "
                      "holds config.yaml; reinstall sdbatch (pip install .)")


def user_config_dirs() -> list[Path]:
    """The directories SDBATCH_CONFIG_DIR names (os.pathsep-separated), each checked to exist."""
    dirs = [Path(d).expanduser().resolve() for d in os.environ.get(CONFIG_DIR_ENV, "").split(os.pathsep) if d]
    for folder in dirs:
        if not folder.is_dir():
            raise ConfigError(f"{CONFIG_DIR_ENV}: config directory {folder} not found")
    return dirs


class UserConfigSearchPath(SearchPathPlugin):
    """SDBATCH_CONFIG_DIR → Hydra's search path, after sdbatch's configs (where --config-dir goes too)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in user_config_dirs():
            search_path.append(provider=CONFIG_DIR_ENV, path=f"file://{folder}",
                               anchor=SearchPathQuery(provider="main"))


def prepare() -> None:
    """What both entries do before Hydra starts: the structured configs and the SDBATCH_CONFIG_DIR search path."""
    register_configs()
    plugins = Plugins.instance()
    if UserConfigSearchPath not in plugins.discover(SearchPathPlugin):
        plugins.register(UserConfigSearchPath)


def run_app(hydra_main: Callable[[], None], argv: list[str] | None = None) -> int:
    """`+info=lora FILE...` or `+info=models` (not runs), else Hydra's main under `guarded`: the exit status."""
    if (code := info_command(sys.argv[1:] if argv is None else argv)) is not None:
        return code
    prepare()
    return guarded(hydra_main)  # a missing SDBATCH_CONFIG_DIR raises ConfigError there: one line, status 2


def main() -> None:
    """The console script: Hydra's app on the packaged configs; exits with sdbatch's status."""
    try:
        config_dir = packaged_config_dir()
    except ConfigError as ex:
        print(f"sdbatch: error: {ex}", file=sys.stderr)
        sys.exit(2)

    # Hydra names the job, and so its log, after the task function's module (here "main"); under that name the
    # job would log to main.log. HYDRA_MAIN_MODULE is Hydra's way to name it: run.log, as under `python run.py`.
    named_here = "HYDRA_MAIN_MODULE" not in os.environ
    if named_here:
        os.environ["HYDRA_MAIN_MODULE"] = f"sdbatch.cli.{JOB_NAME}"

    @hydra.main(version_base="1.3", config_path=str(config_dir), config_name="config")
    def sdbatch_app(cfg: DictConfig) -> None:
        if named_here:  # read once, before the task: keep it from the jobs' own processes
            os.environ.pop("HYDRA_MAIN_MODULE", None)
        task(cfg)

    sys.exit(run_app(sdbatch_app))

"""sdbatch entry point: `python run.py prompt='a cat' model=tiny` (see README.md).

The checkout's twin of the installed `sdbatch` command (sdbatch/cli/main.py): the same app on the same configs,
read here from the repository's conf/ (sweeps/ joins it through the conf/sweeps link).
"""

import os
import sys

# Let compose errors reach sdbatch.cli.hydra_app.guarded, which prints them as one line (exit 2).
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sdbatch.cli.hydra_app import task  # noqa: E402
from sdbatch.cli.main import run_app  # noqa: E402
from sdbatch.config.schema import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    task(cfg)


if __name__ == "__main__":
    # +info=lora FILE... and +info=models are not runs; else Hydra's main under guarded (one-line errors)
    sys.exit(run_app(main))

"""sdbatch entry point: `python run.py prompt='a cat' model=tiny` (see README.md)."""

import os
import sys

# Let compose errors reach sdbatch.cli.hydra_app.guarded, which prints them as one line (exit 2).
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sdbatch.cli.hydra_app import guarded, task  # noqa: E402
from sdbatch.cli.info import info_command  # noqa: E402
from sdbatch.config.schema import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    task(cfg)


if __name__ == "__main__":
    if (code := info_command(sys.argv[1:])) is not None:  # +info=lora FILE...: not a run, so not for Hydra
        sys.exit(code)
    sys.exit(guarded(main))

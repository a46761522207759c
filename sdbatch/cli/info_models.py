"""`python run.py +info=models` and `sdbatch-info models`: what paths.models holds, by kind, with short hashes.

paths.models comes from the composed config (SDBATCH_MODELS, conf/local, or `paths.models=DIR` on the command
line), so the listing shows exactly what a run would find. Each model is listed under the name a run takes
(`model.checkpoint=NAME`) with the hash its images record, so a model named by an image's metadata is found
here; hashes are kept in sdbatch's hash cache, so only new or changed files are read in full.
"""

from __future__ import annotations

from pathlib import Path

from sdbatch.cli.info import error, printable
from sdbatch.config.model_folders import KINDS, Entry, kind_folders, scan
from sdbatch.errors import ConfigError, SdbatchError

USAGE = "python run.py +info=models [paths.models=DIR] (or sdbatch-info models [paths.models=DIR])"
_TITLES = {"checkpoint": "checkpoints", "vae": "VAEs", "lora": "LoRAs", "embedding": "embeddings",
           "controlnet": "ControlNets"}


def models_command(overrides: list[str]) -> int:
    """List the models under paths.models (from the config with `overrides`); the exit status."""
    if overrides[:1] in (["-h"], ["--help"]):
        print(f"usage: {USAGE}\nlists the models under paths.models by kind, with their short hashes")
        return 0
    try:
        root = models_root(overrides)
    except SdbatchError as ex:
        return error(str(ex))
    if root is None:
        return error(f"paths.models is not set: export SDBATCH_MODELS=DIR or add paths.models=DIR; {USAGE}")
    if not Path(root).expanduser().is_dir():
        return error(f"paths.models: {root} is not a folder; give the models folder (A1111's models/ or one "
                     "with checkpoints/, loras/, ...)")
    list_models(root)
    return 0


def models_root(overrides: list[str]) -> str | None:
    """paths.models of the config a run with these overrides composes; ConfigError for a bad override."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from sdbatch.cli.main import packaged_config_dir, prepare  # main imports this module's caller: import late

    prepare()
    try:
        with initialize_config_dir(str(packaged_config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        return OmegaConf.select(cfg, "paths.models")
    except (HydraException, OmegaConfBaseException) as ex:
        first = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise ConfigError(f"+info=models: {first}") from None


def list_models(root: str) -> None:
    """Print each kind's folders and models: short hash, name, size; one line per model as it is hashed."""
    from sdbatch.engine.models.file_info import short_hash  # torch loads only now

    print(f"models under {Path(root).expanduser().resolve()}", flush=True)
    for kind, spec in KINDS.items():
        folders = kind_folders(root, kind)
        entries = scan(folders, kind)
        where = ", ".join(f"{f.name}/" for f in folders) or "no " + " or ".join(f"{n}/" for n in spec.folders)
        print(f"{_TITLES[kind]} ({where}): {len(entries) or 'none'}", flush=True)
        width = max((len(e.name) for e in entries), default=0)
        for entry in entries:
            try:
                digest = short_hash(entry.path, kind)
            except (OSError, SdbatchError):  # unreadable: listed all the same
                digest = "?"
            print(f"  {digest:<12}  {printable(entry.name):<{width}}  {_size(entry)}", flush=True)


def _size(entry: Entry) -> str:
    if entry.path.is_dir():
        return "folder"
    size = float(entry.path.stat().st_size)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"

"""Model names in a run spec replaced by the files they name under paths.models, once, before any check.

So every later stage (checks, planner, engine, config.yaml, manifest) sees real paths. Precedence, per value:
1. `builtin:...` and a path that exists (a file, or a folder for kinds with diffusers folders; relative to the
   working directory) are kept as they are;
2. with paths.models set, a name found under the kind's folder (sdbatch.config.model_folders) becomes its path;
3. a model.checkpoint shaped like a hub id (`owner/name`) not found there, whose `owner` is no subfolder there,
   is kept: the loader looks for it in the Hugging Face cache, as without paths.models;
4. anything else is an error naming the key and the closest names there are.
Without paths.models, values are kept as they are and the later checks report a missing file as before.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from sdbatch.config.model_folders import KINDS, Entry, describe, find, kind_folders, scan, suggest
from sdbatch.config.spec import RunSpec
from sdbatch.errors import ConfigError

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # the loader's own rule (sdbatch.engine.models.loading)


class _Lookup:
    """Name → path under one paths.models root; each kind's folders are walked once per run spec."""

    def __init__(self, root: str) -> None:
        self.root = str(Path(root).expanduser().resolve())  # absolute: config.yaml records where files were
        self._entries: dict[str, list[Entry]] = {}

    def path(self, value: str, kind: str, key: str) -> str:
        if value.startswith("builtin:") or _is_model_path(Path(value).expanduser(), kind):
            return value
        if kind not in self._entries:
            self._entries[kind] = scan(kind_folders(self.root, kind), kind)
        entry = find(value, self._entries[kind], kind)
        if entry is not None:
            return str(entry.path)
        if kind == "checkpoint" and _HUB_ID.fullmatch(value) and not self._has_folder(value.split("/")[0], kind):
            return value
        raise ConfigError(f"{key}={value}: no {KINDS[kind].label} file named {value} in {describe(self.root, kind)}; "
                          f"{suggest(value, self._entries[kind], kind)}")

    def _has_folder(self, name: str, kind: str) -> bool:
        """Whether a kind's folder has a subfolder `name` ("sd15/x" then means a file there, not a hub id)."""
        return any((folder / name).is_dir() for folder in kind_folders(self.root, kind))


def resolve_model_names(spec: RunSpec) -> RunSpec:
    """`spec` with each model name under paths.models replaced by its file or folder (see the module docstring)."""
    root = spec.paths.models
    if root is None:
        return spec
    if not Path(root).expanduser().is_dir():
        found = "it is a file" if Path(root).expanduser().exists() else "it does not exist"
        raise ConfigError(f"paths.models: {root} is not a folder ({found}); give the models folder (A1111's models/ "
                          "or one with checkpoints/, loras/, ...), or unset SDBATCH_MODELS")
    look = _Lookup(root)
    model, network, guidance = spec.model, spec.network, spec.guidance
    model = dataclasses.replace(
        model,
        checkpoint=look.path(model.checkpoint, "checkpoint", "model.checkpoint"),
        vae=model.vae and look.path(model.vae, "vae", "model.vae"),
        textual_inversion=_each(look, model.textual_inversion, "embedding", "model.textual_inversion"),
        xti_embeddings=_each(look, model.xti_embeddings, "embedding", "model.xti_embeddings"))
    loras = [dataclasses.replace(lora, path=look.path(lora.path, "lora", f"network.loras[{i}].path"))
             for i, lora in enumerate(network.loras)]
    network = dataclasses.replace(network, loras=loras)
    guidance = dataclasses.replace(guidance, models=_each(look, guidance.models, "controlnet", "guidance.models"))
    return dataclasses.replace(spec, model=model, network=network, guidance=guidance)


def _is_model_path(path: Path, kind: str) -> bool:
    """An existing file, or folder for kinds that have diffusers folders: a LoRA named `ink` is not a folder ink/."""
    return path.is_file() or (KINDS[kind].marker is not None and path.is_dir())


def _each(look: _Lookup, values: list[str], kind: str, key: str) -> list[str]:
    return [look.path(value, kind, f"{key}[{i}]") for i, value in enumerate(values)]

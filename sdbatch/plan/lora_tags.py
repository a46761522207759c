"""`<lora:NAME:WEIGHT>` and `<lora:NAME:TE:UNET>` tags applied to planned jobs: per-image network_muls (a number,
or a (text encoder, UNet) pair), the tagged LoRA files added.

The tag syntax (parsing, stripping for the text encoder) is in sdbatch.prompts.extra_networks. A NAME not in
network.loras is looked up (by A1111's rules, sdbatch.config.model_folders) in network.lora_dir, else in the
LoRA folder of paths.models.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdbatch.config.model_folders import Entry, find, kind_folders, scan, suggest
from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.extra_networks import tags


def apply_tags(jobs: list[ImageJob], network: NetworkConfig,
               models: str | None = None) -> tuple[list[ImageJob], NetworkConfig]:
    """Jobs with each tag's weight in their network_muls, and the run's networks with the tagged files added;
    `models` is paths.models (its LoRA folder serves tags when network.lora_dir is unset)."""
    tagged = [tags(job.prompt, job.origin) for job in jobs]
    if not any(tagged):
        return jobs, network
    if network.mode == "merge":
        raise PromptError(f"{next(j.origin for j, t in zip(jobs, tagged, strict=True) if t)}: <lora:...> tags set "
                          "per-image weights; use network.mode=hooked or precalc (merge bakes weights in once)")
    index: dict[str, int] = {}  # tag name → the run's network it sets
    for i, lora in enumerate(network.loras):
        index.setdefault(_tag_name(lora.path), i)
    files, folder = [_file(lora.path) for lora in network.loras], _TagFolder(network, models)
    for job, found in zip(jobs, tagged, strict=True):
        for name in (n for n in found if n not in index):
            path = _file(str(folder.find(name, job.origin)))
            if path not in files:  # `<lora:styles/ink>` and `<lora:ink>` may name one file: one network
                files.append(path)
            index[name] = files.index(path)
    added = [LoraConfig(path=path, mul=0.0) for path in files[len(network.loras):]]
    run_network = dataclasses.replace(network, name="lora", loras=[*network.loras, *added])
    defaults = network.multipliers() if network.loras else ()
    return ([_with_weights(job, found, index, len(files), defaults) for job, found in zip(jobs, tagged, strict=True)],
            run_network)


def _with_weights(job: ImageJob, found: dict[str, float | tuple[float, float]], index: dict[str, int], count: int,
                  defaults: tuple) -> ImageJob:
    base = job.network_muls if job.network_muls is not None else defaults
    muls = [*base, *[0.0] * (count - len(base))]
    for name, weight in found.items():
        muls[index[name]] = weight
    return dataclasses.replace(job, network_muls=tuple(muls))


def _tag_name(path: str) -> str:
    """The name a tag uses for a network.loras file: its stem; `tiny-lora` for builtin:tiny-lora."""
    return path.removeprefix(BUILTIN) if path.startswith(BUILTIN) else Path(path).stem


def _file(path: str) -> str:
    """A LoRA file's absolute path, to tell two names of one file apart from two files (builtin: names as they are)."""
    return path if path.startswith("builtin:") else str(Path(path).expanduser().resolve())


BUILTIN = "builtin:"
DEMO_LORA = "tiny-lora"  # <lora:tiny-lora:W> is the built-in demo LoRA (builtin:tiny-lora) for model=tiny


class _TagFolder:
    """Where tags' LoRA files are: network.lora_dir, else paths.models' LoRA folder; walked once, when first asked."""

    def __init__(self, network: NetworkConfig, models: str | None) -> None:
        if network.lora_dir is not None:
            self.folders, self.where = [Path(network.lora_dir).expanduser()], f"network.lora_dir ({network.lora_dir})"
        elif models is not None:
            self.folders = kind_folders(models, "lora")
            self.where = f"paths.models ({', '.join(map(str, self.folders)) or f'{models}: no Lora/ or loras/'})"
        else:
            self.folders, self.where = [], ""
        self._entries: list[Entry] | None = None

    def find(self, name: str, origin: str) -> Path | str:
        """The file `<lora:NAME>` names: in the folders, else the built-in demo LoRA for its name."""
        try:
            return self._find(name, origin)
        except PromptError:
            if name == DEMO_LORA:  # a file of that name in the folders wins
                return BUILTIN + DEMO_LORA
            raise

    def _find(self, name: str, origin: str) -> Path:
        if not self.where:
            raise PromptError(f"{origin}: <lora:{name}>: no LoRA file named {name} in network.loras (network.lora_dir "
                              "and paths.models are not set); set network.lora_dir=FOLDER or add it to network.loras")
        if self._entries is None:
            self._entries = scan(self.folders, "lora")
        try:
            entry = find(name, self._entries, "lora")
        except ConfigError as ex:  # several files of that name
            raise PromptError(f"{origin}: <lora:{name}>: {ex}") from None
        if entry is None:
            raise PromptError(f"{origin}: <lora:{name}>: no LoRA file named {name} in {self.where}; "
                              f"{suggest(name, self._entries, 'lora')}")
        return entry.path

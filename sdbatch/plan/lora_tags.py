"""`<lora:NAME:WEIGHT>` and `<lora:NAME:TE:UNET>` tags applied to planned jobs: per-image network_muls (a number,
or a (text encoder, UNet) pair), the tagged LoRA files added.

The tag syntax (parsing, stripping for the text encoder) is in sdbatch.prompts.extra_networks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.errors import PromptError
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.extra_networks import tags

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def apply_tags(jobs: list[ImageJob], network: NetworkConfig) -> tuple[list[ImageJob], NetworkConfig]:
    """Jobs with each tag's weight in their network_muls, and the run's networks with the tagged files added."""
    tagged = [tags(job.prompt, job.origin) for job in jobs]
    if not any(tagged):
        return jobs, network
    if network.mode == "merge":
        raise PromptError(f"{next(j.origin for j, t in zip(jobs, tagged, strict=True) if t)}: <lora:...> tags set "
                          "per-image weights; use network.mode=hooked or precalc (merge bakes weights in once)")
    names = [Path(lora.path).stem for lora in network.loras]
    added = []
    for job, found in zip(jobs, tagged, strict=True):
        for name in found:
            if name not in names:
                added.append(LoraConfig(path=str(_find(name, network, job.origin)), mul=0.0))
                names.append(name)
    run_network = dataclasses.replace(network, name="lora", loras=[*network.loras, *added])
    defaults = network.multipliers() if network.loras else ()
    return [_with_weights(job, found, names, defaults) for job, found in zip(jobs, tagged, strict=True)], run_network


def _with_weights(job: ImageJob, found: dict[str, float | tuple[float, float]], names: list[str],
                  defaults: tuple) -> ImageJob:
    base = job.network_muls if job.network_muls is not None else defaults
    muls = [*base, *[0.0] * (len(names) - len(base))]
    for name, weight in found.items():
        muls[names.index(name)] = weight
    return dataclasses.replace(job, network_muls=tuple(muls))


def _find(name: str, network: NetworkConfig, origin: str) -> Path:
    folder = network.lora_dir
    if folder is not None:
        for suffix in LORA_SUFFIXES:
            candidate = Path(folder).expanduser() / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    where = f"network.lora_dir ({folder})" if folder else "network.loras (network.lora_dir is not set)"
    raise PromptError(f"{origin}: <lora:{name}>: no LoRA file named {name} in {where}; set network.lora_dir=FOLDER "
                      "or add it to network.loras")

"""A1111's extra-network tags: `<lora:NAME>` or `<lora:NAME:WEIGHT>` in a prompt applies that LoRA to its image.

The tag stays in the image's prompt (so the metadata reproduces it, in sdbatch and in A1111) and is removed
from the text the text encoder sees. NAME is a file of network.loras (by its name without extension) or a
file in network.lora_dir; networks that only tags name join the run with weight 0 for every other image.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from sdbatch.config.spec import LoraConfig, NetworkConfig
from sdbatch.errors import PromptError
from sdbatch.plan.jobs import ImageJob

TAG = re.compile(r"<lora:([^<>]*)>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def strip_tags(prompt: str) -> str:
    """The prompt as the text encoder sees it: every `<lora:...>` tag removed (A1111 does the same)."""
    return TAG.sub("", prompt)


def tags(prompt: str, origin: str) -> dict[str, float]:
    """{name: weight} of the prompt's `<lora:...>` tags (weight 1 when omitted; a later tag of a name wins)."""
    found = {}
    for match in TAG.finditer(prompt):
        name, *weights = [part.strip() for part in match[1].split(":")]
        if not name or len(weights) > 1:
            raise PromptError(f"{origin}: {match[0]} is not a LoRA tag; write <lora:NAME> or <lora:NAME:WEIGHT> "
                              "(separate text-encoder/UNet weights are not supported)")
        try:
            found[name] = float(weights[0]) if weights else 1.0
        except ValueError:
            raise PromptError(f"{origin}: {match[0]}: the weight must be a number, e.g. <lora:{name}:0.8>") from None
    return found


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


def _with_weights(job: ImageJob, found: dict[str, float], names: list[str], defaults: tuple) -> ImageJob:
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

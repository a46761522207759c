"""A1111's extra-network tags: `<lora:NAME>`, `<lora:NAME:WEIGHT>` or `<lora:NAME:TE:UNET>` in a prompt applies
that LoRA to its image (TE: the text-encoder weight, UNET: the UNet's; also `te=`/`unet=` by name, as in A1111).

The tag stays in the image's prompt (so the metadata reproduces it, in sdbatch and in A1111) and is removed
from the text the text encoder sees. NAME is a file of network.loras (by its name without extension) or a file in
network.lora_dir (else in paths.models' LoRA folder); networks that only tags name join the run with weight 0 for
every other image.
This module reads the tags; sdbatch.plan.lora_tags applies them to the planned jobs.
"""

from __future__ import annotations

import re

from sdbatch.config.spec import LoraConfig
from sdbatch.errors import PromptError
from sdbatch.prompts.weighting import strip_weights

TAG = re.compile(r"<lora:([^<>]*)>")
_FORMS = "write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>"


def strip_tags(prompt: str) -> str:
    """The prompt as the text encoder sees it: every `<lora:...>` tag removed (A1111 does the same)."""
    return TAG.sub("", prompt)


def plain_text(prompt: str) -> str:
    """The prompt as words: without `<lora:>` tags and weighting syntax (guided=clip's text for a CLIP model)."""
    return " ".join(strip_weights(strip_tags(prompt)).split())


def tags(prompt: str, origin: str) -> dict[str, float | tuple[float, float]]:
    """{name: weight} of the prompt's `<lora:...>` tags: one number for both models, or a (text encoder, UNet)
    pair when they differ (`LoraConfig.pair`); weight 1 when omitted; a later tag of a name wins."""
    found = {}
    for match in TAG.finditer(prompt):
        name, *params = [part.strip() for part in match[1].split(":")]
        if not name:
            raise PromptError(f"{origin}: {match[0]} is not a LoRA tag; {_FORMS}")
        found[name] = _weights(match[0], name, params, origin)
    return found


def _weights(tag: str, name: str, params: list[str], origin: str) -> float | tuple[float, float]:
    """A1111's reading: positional TE then UNET (UNET defaults to TE), or te=/unet= by name."""
    positional = [p for p in params if "=" not in p]
    named = dict(p.split("=", 1) for p in params if "=" in p)
    named = {key.strip(): value.strip() for key, value in named.items()}
    if "dyn" in named or len(positional) > 2:
        raise PromptError(f"{origin}: {tag}: a dynamic rank (dyn, A1111's fourth value) is not supported; {_FORMS}")
    if named.keys() - {"te", "unet"}:
        raise PromptError(f"{origin}: {tag}: unknown parameter {sorted(named.keys() - {'te', 'unet'})[0]}=; "
                          f"{_FORMS}, or te=/unet= by name")
    try:
        te = float(named.get("te", positional[0] if positional else 1.0))
        return LoraConfig.pair(te, float(named.get("unet", positional[1] if len(positional) > 1 else te)))
    except ValueError:
        raise PromptError(f"{origin}: {tag}: the weight must be a number, e.g. <lora:{name}:0.8>") from None

"""A1111's extra-network tags: `<lora:NAME>` or `<lora:NAME:WEIGHT>` in a prompt applies that LoRA to its image.

The tag stays in the image's prompt (so the metadata reproduces it, in sdbatch and in A1111) and is removed
from the text the text encoder sees. NAME is a file of network.loras (by its name without extension) or a
file in network.lora_dir; networks that only tags name join the run with weight 0 for every other image.
This module reads the tags; sdbatch.plan.lora_tags applies them to the planned jobs.
"""

from __future__ import annotations

import re

from sdbatch.errors import PromptError

TAG = re.compile(r"<lora:([^<>]*)>")


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

"""The prompt a ComfyUI PNG was made with, read from the node graph ComfyUI saves in it.

ComfyUI writes two text chunks: `prompt`, the graph it ran (API format: {node id: {"class_type", "inputs"}},
an input that comes from another node being [node id, output slot]), and `workflow`, the editor's graph
(nodes with widget values, and links). The text is where the sampler's `positive` and `negative` inputs lead:
CLIPTextEncode nodes, possibly behind nodes that pass one conditioning through (ControlNet, area, timestep
range). A graph where that is not one text each (two samplers with other prompts, ConditioningCombine of two
texts, a text made by another node) is ambiguous: the caller warns and uses its own prompt. No library reads
these graphs; each tool (sd-parsers, sd-prompt-reader) carries its own walker, so this is ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustom")
TEXT_ENCODERS = ("CLIPTextEncode",)
# nodes that hand on one conditioning unchanged in text: the input to follow, by output slot
PASS_THROUGH: dict[str, tuple[str, ...]] = {
    "ControlNetApply": ("conditioning",),
    "ControlNetApplyAdvanced": ("positive", "negative"),
    "ConditioningSetArea": ("conditioning",),
    "ConditioningSetAreaPercentage": ("conditioning",),
    "ConditioningSetAreaStrength": ("conditioning",),
    "ConditioningSetMask": ("conditioning",),
    "ConditioningSetTimestepRange": ("conditioning",),
}
# nodes that merge two conditionings: a text only when both sides hold the same one
COMBINE: dict[str, tuple[str, str]] = {
    "ConditioningCombine": ("conditioning_1", "conditioning_2"),
    "ConditioningConcat": ("conditioning_to", "conditioning_from"),
    "ConditioningAverage": ("conditioning_to", "conditioning_from"),
}
_MAX_DEPTH = 32  # a link chain longer than this is a cycle in a damaged graph


class Ambiguous(ValueError):
    """The graph does not lead to one positive and one negative text; the message says why."""


def is_comfyui(text: Mapping[str, Any]) -> bool:
    """Whether an image's text chunks are ComfyUI's: a `workflow` chunk, or a `prompt` chunk holding JSON."""
    if "workflow" in text:
        return True
    return isinstance(_json(text.get("prompt")), dict | list)


def comfyui_prompt(text: Mapping[str, Any]) -> tuple[str, str]:
    """(positive, negative) text of the graph's sampler(s), from the `prompt` graph, else the `workflow`."""
    graph = _json(text.get("prompt"))
    if not isinstance(graph, dict):
        workflow = _json(text.get("workflow"))
        if not isinstance(workflow, dict):
            raise Ambiguous("neither its prompt nor its workflow chunk holds a readable node graph")
        graph = api_graph(workflow)
    return sampler_texts(graph)


def sampler_texts(graph: Mapping[str, Any]) -> tuple[str, str]:
    """The one (positive, negative) pair the graph's samplers use (several samplers must agree)."""
    nodes = {str(key): node for key, node in graph.items() if isinstance(node, dict)}
    samplers = [key for key, node in nodes.items() if node.get("class_type") in SAMPLERS]
    if not samplers:
        raise Ambiguous(f"its graph has no sampler node ({', '.join(SAMPLERS)})")
    pairs = {(_text(nodes, _input(nodes[key], "positive"), 0), _text(nodes, _input(nodes[key], "negative"), 0))
             for key in samplers}
    if len(pairs) > 1:
        raise Ambiguous(f"its {len(samplers)} sampler nodes use different prompts")
    return pairs.pop()


def _input(node: Mapping[str, Any], name: str) -> Any:
    inputs = node.get("inputs")
    if not isinstance(inputs, dict) or name not in inputs:
        raise Ambiguous(f"its {node.get('class_type')} node has no {name} input")
    return inputs[name]


def _text(nodes: Mapping[str, Any], link: Any, depth: int) -> str:
    """The text a conditioning link leads to."""
    if not (isinstance(link, list) and len(link) == 2) or str(link[0]) not in nodes:
        raise Ambiguous(f"a conditioning input is {link!r}, not a link to a node of the graph")
    if depth > _MAX_DEPTH:
        raise Ambiguous("its conditioning links go round in a circle")
    node = nodes[str(link[0])]
    kind = node.get("class_type")
    if kind in TEXT_ENCODERS:
        text = _input(node, "text")
        if not isinstance(text, str):
            raise Ambiguous(f"its {kind} text comes from another node")
        return text
    if kind in PASS_THROUGH:
        names = PASS_THROUGH[kind]
        slot = link[1] if isinstance(link[1], int) and 0 <= link[1] < len(names) else 0
        return _text(nodes, _input(node, names[slot]), depth + 1)
    if kind in COMBINE:
        first, second = (_text(nodes, _input(node, name), depth + 1) for name in COMBINE[kind])
        if first != second:
            raise Ambiguous(f"its {kind} node merges two different texts")
        return first
    raise Ambiguous(f"a conditioning comes from a {kind} node, not from a text encoder")


# ---------------------------------------------------------------- the editor's workflow → API graph


def api_graph(workflow: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The parts of a `workflow` the walker needs, in the API graph's shape: each node's linked inputs as
    [source id, slot], and a text encoder's text from its first widget value."""
    links = {}
    for link in workflow.get("links") or []:  # [id, from node, from slot, to node, to slot, type]
        if isinstance(link, list) and len(link) >= 3:
            links[link[0]] = [str(link[1]), link[2]]
    graph = {}
    for node in workflow.get("nodes") or []:
        if not isinstance(node, dict):
            continue
        inputs = {item["name"]: links.get(item.get("link"))
                  for item in node.get("inputs") or [] if isinstance(item, dict) and "name" in item}
        widgets = node.get("widgets_values")
        if node.get("type") in TEXT_ENCODERS and "text" not in inputs and isinstance(widgets, list) and widgets:
            inputs["text"] = widgets[0]
        graph[str(node.get("id"))] = {"class_type": node.get("type"), "inputs": inputs}
    return graph


def _json(value: Any) -> Any:
    if not isinstance(value, str):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None

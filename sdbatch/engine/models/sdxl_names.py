"""The SDXL UNet's module paths in the original (SGM) layout, which kohya's SDXL networks are named after.

kohya's SDXL LoRA and ControlNet-LLLite files name UNet modules after Stability's generative-models UNet
(``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``middle_block.0.in_layers.2``), not diffusers'
(``down_blocks.1.attentions.0...``). diffusers renames such keys inside its loaders for a fixed SDXL depth; we
need the map between live modules both ways and for any width and depth (the tiny test UNet and the real one),
so it is derived here from the UNet's own blocks: input block n counts 1 + (resnet, attention) pairs and
downsamplers in order, output block n counts the up blocks' layers, a resnet's norm1/conv1/time_emb_proj/norm2/
conv2/conv_shortcut are in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection.
"""

from __future__ import annotations

import torch

# diffusers ResnetBlock2D child → SGM ResBlock child
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# top-level modules (modules, not prefixes: a path equal to one of these, or under it)
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _block_prefixes(unet: torch.nn.Module) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix → (SGM prefix, is a resnet) for every block-level module of the UNet."""
    prefixes: dict[str, tuple[str, bool]] = {}
    _layers(prefixes, unet.down_blocks, "down_blocks", "input_blocks", 1)  # input_blocks.0 is conv_in
    prefixes["mid_block.resnets.0"] = ("middle_block.0", True)
    for j, _ in enumerate(getattr(unet.mid_block, "attentions", None) or ()):
        prefixes[f"mid_block.attentions.{j}"] = (f"middle_block.{1 + 2 * j}", False)
        prefixes[f"mid_block.resnets.{j + 1}"] = (f"middle_block.{2 + 2 * j}", True)
    _layers(prefixes, unet.up_blocks, "up_blocks", "output_blocks", 0)
    prefixes.update({path: (sgm, False) for path, sgm in _TOP.items()})
    return prefixes


def _layers(prefixes: dict[str, tuple[str, bool]], blocks: torch.nn.ModuleList, side: str, sgm: str, n: int) -> None:
    """One SGM layer (resnet at .0, attention at .1) per resnet of each block, from layer n on; a downsampler is
    a layer of its own (``op``), an upsampler the last layer's next slot."""
    for i, block in enumerate(blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"{side}.{i}.resnets.{j}"] = (f"{sgm}.{n}.0", True)
            if attentions is not None:
                prefixes[f"{side}.{i}.attentions.{j}"] = (f"{sgm}.{n}.1", False)
            n += 1
        if getattr(block, "downsamplers", None) is not None:
            prefixes[f"{side}.{i}.downsamplers.0.conv"] = (f"{sgm}.{n}.0.op", False)
            n += 1
        if getattr(block, "upsamplers", None) is not None:
            slot = 2 if attentions is not None else 1
            prefixes[f"{side}.{i}.upsamplers.0.conv"] = (f"{sgm}.{n - 1}.{slot}.conv", False)


def sgm_paths(unet: torch.nn.Module) -> dict[str, str]:
    """Every Linear and Conv2d of a diffusers SDXL-layout UNet: diffusers path → SGM path."""
    prefixes = _block_prefixes(unet)
    paths: dict[str, str] = {}
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            paths[path] = _sgm_path(path, prefixes)
    return paths


def _sgm_path(path: str, prefixes: dict[str, tuple[str, bool]]) -> str:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):  # the longest block prefix the path is under
        found = prefixes.get(".".join(parts[:cut]))
        if found is None:
            continue
        sgm, resnet = found
        rest = parts[cut:]
        if resnet and rest:
            rest = [*_RESNET.get(rest[0], rest[0]).split("."), *rest[1:]]
        return ".".join([sgm, *rest])
    raise ValueError(f"{path} is not a module of an SDXL-layout UNet (no SGM name for it)")


def kohya_unet_names(unet: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d by its kohya name: prefix + the SGM path with dots as underscores."""
    return {prefix + sgm.replace(".", "_"): unet.get_submodule(path) for path, sgm in sgm_paths(unet).items()}

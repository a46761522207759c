"""Tiny LyCORIS-family files for the tiny SD1 models, in the kohya/LyCORIS key layout (``lora_unet_<path>.hada_w1_a``,
``lora_te_text_model_<path>.lokr_w1``, ...): LoHa (plain and Tucker), LoKr (whole, decomposed and Tucker factors),
DoRA over LoRA/LoHa/LoKr, LoCon with a CP core (``lora_mid``), and LoRA files for one model only.

Shapes follow LyCORIS's modules (lycoris/modules/{loha,lokr,locon}.py); values are seeded random numbers sized so
that each file visibly changes the tiny model's images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdbatch.engine.models.tiny_lora import random_lora

RANK, ALPHA = 4, 2.0
# UNet Linear layers (in ≠ out in attn2.to_k and ff), 1×1 and 3×3 convs (one with stride 2), text-encoder Linears
UNET_LINEAR = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
               "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
               "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"]
UNET_CONV1 = ["down_blocks.1.attentions.0.proj_in", "up_blocks.0.resnets.1.conv_shortcut"]
UNET_CONV3 = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.1.conv1"]
TEXT_LINEAR = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]


def kohya_name(path: str, text: bool = False) -> str:
    return ("lora_te_text_model_" if text else "lora_unet_") + path.replace(".", "_")


def targets(unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
            convs: bool = True) -> dict[str, torch.nn.Module]:
    """kohya name → module of the layers these files cover."""
    paths = UNET_LINEAR + (UNET_CONV1 + UNET_CONV3 if convs else [])
    found = {kohya_name(p): unet.get_submodule(p) for p in paths}
    if text_encoder is not None:
        found |= {kohya_name(p, True): text_encoder.get_submodule(p) for p in TEXT_LINEAR}
    return found


def _shape(module: torch.nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d."""
    out, inp, *kernel = module.weight.shape
    return out, inp, tuple(kernel)


def _split(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b as close as possible (LyCORIS's factorization with factor -1)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def _factor(rnd, rows: int, cols: int, kernel: tuple[int, ...], tucker: bool) -> tuple[torch.Tensor, ...]:
    """A low-rank factor of rows × cols·k·k: (a (rows, rank), b (rank, cols·k·k)), or with `tucker`
    (core (rank, rank, k, k), a (rank, rows), b (rank, cols))."""
    if tucker:
        return rnd(RANK, RANK, *kernel), rnd(RANK, rows), rnd(RANK, cols)
    return rnd(rows, RANK), rnd(RANK, cols * math.prod(kernel))


def _random(gen: torch.Generator, std: float):
    return lambda *shape: torch.randn(*shape, generator=gen) * std


def loha_state(modules: dict[str, torch.nn.Module], seed: int = 0, tucker: bool = False,
               std: float = 0.6) -> dict[str, torch.Tensor]:
    """LoHa tensors: (out, rank) @ (rank, in·k·k) factors, or with `tucker` Tucker cores on the k×k convs."""
    rnd = _random(torch.Generator().manual_seed(seed), std)
    state = {}
    for name, module in modules.items():
        out, inp, kernel = _shape(module)
        for i in ("1", "2"):
            factor = _factor(rnd, out, inp, kernel, tucker and math.prod(kernel) > 1)
            if len(factor) == 3:
                state[f"{name}.hada_t{i}"] = factor[0]
            state[f"{name}.hada_w{i}_a"], state[f"{name}.hada_w{i}_b"] = factor[-2:]
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    return state


# LoKr factor layouts, in turn per module: (w1 stored whole?, w2 form) with w2 form "whole", "low" or "tucker"
# (with targets()' order: Tucker on a 3×3 conv, two whole factors (scale 1) on a Linear and a 1×1 conv)
LOKR_LAYOUTS = [(True, "low"), (True, "tucker"), (False, "low"), (False, "whole"), (True, "whole")]


def lokr_state(modules: dict[str, torch.nn.Module], seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """LoKr tensors: out = a·b, in = c·d, ΔW = kron(w1 (a, c), w2 (b, d[, k, k])); the factor layouts cycle
    through LOKR_LAYOUTS (Tucker only on k×k convs, else decomposed)."""
    rnd = _random(torch.Generator().manual_seed(seed), std)
    state = {}
    for index, (name, module) in enumerate(modules.items()):
        out, inp, kernel = _shape(module)
        (a, b), (c, d) = _split(out), _split(inp)
        whole_w1, w2_form = LOKR_LAYOUTS[index % len(LOKR_LAYOUTS)]
        if whole_w1:
            state[f"{name}.lokr_w1"] = rnd(a, c)
        else:
            state[f"{name}.lokr_w1_a"], state[f"{name}.lokr_w1_b"] = _factor(rnd, a, c, (), False)
        if w2_form == "whole":
            state[f"{name}.lokr_w2"] = rnd(b, d, *kernel)
        else:
            factor = _factor(rnd, b, d, kernel, w2_form == "tucker" and math.prod(kernel) > 1)
            if len(factor) == 3:
                state[f"{name}.lokr_t2"] = factor[0]
            state[f"{name}.lokr_w2_a"], state[f"{name}.lokr_w2_b"] = factor[-2:]
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    return state


def lora_state(modules: dict[str, torch.nn.Module], seed: int = 0, cp: bool = False,
               std: float = 0.3) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon tensors (k×k down, 1×1 up on convs); with `cp` the k×k convs get LyCORIS's CP layout:
    1×1 down, k×k lora_mid, 1×1 up."""
    rnd = _random(torch.Generator().manual_seed(seed), std)
    state = {}
    for name, module in modules.items():
        out, inp, kernel = _shape(module)
        ones = (1,) * len(kernel)
        if cp and kernel and kernel != (1, 1):
            state[f"{name}.lora_down.weight"] = rnd(RANK, inp, 1, 1)
            state[f"{name}.lora_mid.weight"] = rnd(RANK, RANK, *kernel) * 2
        else:
            state[f"{name}.lora_down.weight"] = rnd(RANK, inp, *kernel)
        state[f"{name}.lora_up.weight"] = rnd(out, RANK, *ones)
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    return state


def with_dora(state: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], seed: int = 0,
              on_input: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`state` plus LyCORIS dora_scale tensors: the weight's norms per output channel (out, 1, ...) times a
    random factor around 1; per input channel (1, in, ...) for the names in `on_input` (wd_on_out=False)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name, module in modules.items():
        weight = module.weight.detach().float()
        axis = 1 if name in on_input else 0
        rest = [d for d in range(weight.dim()) if d != axis]
        norm = torch.linalg.vector_norm(weight, dim=rest, keepdim=True)
        out[f"{name}.dora_scale"] = norm * (1 + 0.5 * torch.rand(norm.shape, generator=gen))
    return out


def only(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one model: prefix "lora_unet_" or "lora_te_"."""
    return {key: value for key, value in state.items() if key.startswith(prefix)}


def lora_for(unet: torch.nn.Module, text_encoder: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """The usual random kohya LoRA of tests/lora_files.py (UNet and text encoder)."""
    return random_lora(unet, text_encoder, seed=seed)


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path

"""Tiny SDXL-layout models and random kohya SDXL LoRA / ControlNet-LLLite files for the SDXL network tests.

`tiny_sdxl` has real SDXL's three UNet levels (no attention, then attention with 1 and 2 transformer blocks), which
the built-in tiny_xl (two levels, for speed) does not: kohya's SDXL block names and LLLite's module selection
depend on them, so the name-mapping tests run on this layout.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdbatch.engine.models.tiny_lora import random_factors

TE_WIDTH, TE2_WIDTH, TIME_DIM = 32, 32, 8


def tiny_sdxl(seed: int = 0) -> SimpleNamespace:
    """unet, text_encoder, text_encoder_2 in SDXL's layout at small widths (eval mode, fp32, seeded)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=TE_WIDTH + TE2_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TE2_WIDTH + 6 * TIME_DIM)
    text = {"vocab_size": 1000, "max_position_embeddings": 77, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TE_WIDTH, hidden_act="quick_gelu", **text))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TE2_WIDTH, projection_dim=TE2_WIDTH,
                                                     hidden_act="gelu", **text))
    for model in (unet, te1, te2):
        with torch.no_grad():  # zero-initialised layers (conv_out, proj_out) would hide a LoRA on them
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.eval()
    return SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2)


def unet_inputs(batch: int = 2, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latents, encoder hidden states, added_cond_kwargs) for the tiny SDXL UNet."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=gen)
    emb = torch.randn(batch, 7, TE_WIDTH + TE2_WIDTH, generator=gen)
    added = {"text_embeds": torch.randn(batch, TE2_WIDTH, generator=gen),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return x, emb, added


def kohya_sdxl_lora(path: Path, modules: dict[str, torch.nn.Module], rank: int = 4, alpha: float = 2.0,
                    seed: int = 0, scale: float = 0.3) -> Path:
    """A kohya LoRA file with random lora_down/lora_up/alpha for these modules (kohya name → module)."""
    save_file(random_factors(modules, rank=rank, alpha=alpha, seed=seed, scale=scale), str(path))
    return path


def lllite_state(unet: torch.nn.Module, cond_dim: int = 8, mlp_dim: int = 8, seed: int = 0,
                 scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A kohya ControlNet-LLLite state dict for this SDXL-layout UNet, built the way kohya's ControlNetLLLite
    picks modules: attn1 q/k/v and attn2 q of the input and middle blocks' transformers, the conditioning depth
    by block (input_blocks ≤2: 1, ≤5: 2, else 3; middle: 3); random weights (kohya zero-inits `up`)."""
    from sdbatch.engine.models.sdxl_names import sgm_paths

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for path, sgm in sgm_paths(unet).items():
        if not (sgm.startswith(("input_blocks.", "middle_block.")) and "transformer_blocks" in sgm and
                sgm.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q"))):
            continue
        block, index = sgm.split(".")[:2]
        depth = 3 if block == "middle_block" else (1 if int(index) <= 2 else 2 if int(index) <= 5 else 3)
        convs = {1: [(3, cond_dim // 2, 4), (cond_dim // 2, cond_dim, 2)],
                 2: [(3, cond_dim // 2, 4), (cond_dim // 2, cond_dim, 4)],
                 3: [(3, cond_dim // 2, 4), (cond_dim // 2, cond_dim // 2, 4), (cond_dim // 2, cond_dim, 2)]}[depth]
        name = "lllite_unet_" + sgm.replace(".", "_")
        width = unet.get_submodule(path).in_features
        shapes = {f"conditioning1.{2 * i}": ((o, c, k, k), o) for i, (c, o, k) in enumerate(convs)}
        shapes |= {"down.0": ((mlp_dim, width), mlp_dim), "mid.0": ((mlp_dim, mlp_dim + cond_dim), mlp_dim),
                   "up.0": ((width, mlp_dim), width)}
        for part, (weight, bias) in shapes.items():
            state[f"{name}.{part}.weight"] = torch.randn(weight, generator=gen) * scale
            state[f"{name}.{part}.bias"] = torch.randn(bias, generator=gen) * scale
    return state


def diffusers_peft(xl, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya SDXL LoRA file as diffusers' SDXL loader converts it: PEFT keys (``<module path>.lora_A.weight``)
    per model ("unet", "text_encoder", "text_encoder_2"), as load_lora_weights hands them to peft."""
    state, _alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(load_file(str(path)), unet_config=xl.unet.config)
    out = {}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        part = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.split(".")[0] == prefix}
        out[prefix] = (convert_unet_state_dict_to_peft(part) if prefix == "unet" else
                       convert_state_dict_to_peft(convert_state_dict_to_diffusers(part, StateDictType.DIFFUSERS_OLD)))
    return out


def diffusers_merged(xl, path: Path, scale: float):
    """A copy of the models (unet, text_encoder, text_encoder_2 attributes) with the file merged the way
    diffusers' SDXL LoRA loader resolves it: W += scale · up·down (scale = α/r, the same for every module); and
    how many modules it resolved. Without peft (load_lora_weights needs it) the merge is done here."""
    merged = copy.deepcopy(xl)
    count = 0
    for prefix, part in diffusers_peft(xl, path).items():
        model, drop = getattr(merged, prefix), "text_model." if prefix == "text_encoder" else ""
        for key in [k for k in part if k.endswith(".lora_A.weight")]:
            module = model.get_submodule(key.removesuffix(".lora_A.weight").removeprefix(drop))
            down, up = part[key], part[key.replace("lora_A", "lora_B")]
            delta = torch.einsum("or,ri...->oi...", up.flatten(1), down) * scale
            with torch.no_grad():
                module.weight += delta.reshape(module.weight.shape)
            count += 1
    return merged, count

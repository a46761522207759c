"""Turn an original-layout (LDM/CompVis, or SGM for SDXL) state dict into diffusers modules, configs read from shapes.

Nothing is fetched: the layer shapes give channels, depths and widths; the family (SD1 CLIP, SD2 OpenCLIP, or
SDXL's two encoders under ``conditioner.embedders.``) gives what shapes cannot (heads, activation, the VAE's
latent scale). diffusers' own functions rename keys.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdbatch.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
# SDXL (SGM layout): CLIP ViT-L in transformers' layout, OpenCLIP bigG in OpenCLIP's
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_ADDED_EMB = "label_emb.0.0.weight"  # the UNet's "text_time" added embedding (pooled text + 6 size values)
SDXL_TIME_IDS = 6  # original size, crop top-left, target size: each embedded in addition_time_embed_dim sinusoids
CONTROLNET_PREFIX = "control_model."  # lllyasviel's ControlNet files
DIFFERENCE_KEY = "difference"  # in a ControlNet file: its UNet-part tensors are offsets from the base model
VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025
# LDM's normalization() is GroupNorm(32, C) everywhere; the group count leaves no trace in the shapes.
NORM_GROUPS = 32
SD1_UNET_HEADS = 8
HEAD_CHANNELS = 64  # SD2 UNet and every CLIP text encoder: 64 channels per attention head

State = dict[str, torch.Tensor]


def strip(state: State, prefix: str) -> State:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _indices(keys: State, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) at the start of the keys."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.match(k))})


def detect_family(state: State, name: str, v2: str = "auto") -> str:
    """Family of the weights: "sdxl" (two encoders), "sd2" (OpenCLIP) or "sd1" (CLIP); a forced ``v2`` must agree."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        if not any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in state) or not any(
                k.startswith(SDXL_CLIP_PREFIX) for k in state):
            raise ModelError(f"{name} is an SGM checkpoint without SDXL base's two text encoders (a refiner?); "
                             "sdbatch runs SD 1.x, 2.x and SDXL base models")
        if v2 == "true":
            raise ModelError(f"model.v2=true but {name} is an SDXL model; set model.v2=auto")
        return "sdxl"
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        family = "sd2"
    elif any(k.startswith(CLIP_PREFIX) for k in state):
        family = "sd1"
    else:
        raise ModelError(
            f"{name} is not a Stable Diffusion checkpoint: no text encoder keys "
            f"({CLIP_PREFIX}* or {OPENCLIP_PREFIX}*) found"
        )
    forced = {"true": "sd2", "false": "sd1"}.get(v2)
    if forced is not None and forced != family:
        found = "an SD2 (OpenCLIP)" if family == "sd2" else "an SD1 (CLIP)"
        raise ModelError(f"model.v2={v2} but {name} has {found} text encoder; set model.v2=auto")
    return family


def _load(module: torch.nn.Module, state: State, name: str, part: str) -> None:
    """Load into a meta-device module, taking the checkpoint tensors as they are (no copy, no random init)."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise ModelError(
            f"{name}: the {part} weights do not fit the layout read from their shapes: {detail}"
        ) from exc


def _unet_levels(u: State, name: str) -> list[list[int]]:
    """LDM input block numbers grouped by resolution level (a downsample block closes a level)."""
    levels: list[list[int]] = [[]]
    for i in _indices(u, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])
        else:
            levels[-1].append(i)
    if len({len(level) for level in levels}) != 1 or not levels[0]:
        raise ModelError(f"{name}: the UNet has an unsupported layout (uneven blocks per level)")
    return levels


def _attention_depth(u: State, block: str) -> int:
    return len(_indices(u, rf"{re.escape(block)}\.1\.transformer_blocks\.(\d+)\."))


def unet_config(state: State, family: str, name: str) -> dict[str, Any]:
    """UNet2DConditionModel config read from the shapes of the ``model.diffusion_model.*`` tensors."""
    u = strip(state, UNET_PREFIX)
    if any(k.startswith("label_emb.") for k in u) and family != "sdxl":
        raise ModelError(f"{name}: class-conditioned UNets (upscalers, unCLIP) are not supported")
    config = {**encoder_config(u, family, name), **(_sdxl_added(state, u) if family == "sdxl" else {})}
    per_level, levels = config["layers_per_block"], len(config["block_out_channels"])
    up_depths = [_attention_depth(u, f"output_blocks.{b * (per_level + 1)}") for b in range(levels)]
    return {
        "sample_size": 64,
        **config,
        "out_channels": u["out.2.weight"].shape[0],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "time_embedding_dim": u["time_embed.0.weight"].shape[0],
    }


def _sdxl_added(state: State, u: State) -> dict[str, Any]:
    """SDXL's added embedding: its input is bigG's pooled projection plus 6 size values of d sinusoids each."""
    width = u[SDXL_ADDED_EMB].shape[1]
    pooled = state[SDXL_OPENCLIP_PREFIX + "text_projection"].shape[1]
    return {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": width,
            "addition_time_embed_dim": (width - pooled) // SDXL_TIME_IDS}


def encoder_config(u: State, family: str, name: str) -> dict[str, Any]:
    """The config entries the encoder half (input and middle blocks, unprefixed keys) determines.

    A ControlNet is a copy of that half, so it reads its config here too.
    """
    levels = _unet_levels(u, name)
    channels = [u[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    depths = [_attention_depth(u, f"input_blocks.{level[0]}") for level in levels]
    proj_in = next((v for k, v in u.items() if k.endswith(".1.proj_in.weight")), None)
    to_k = next((v for k, v in u.items() if k.endswith("attn2.to_k.weight")), None)
    if proj_in is None or to_k is None or not _attention_depth(u, "middle_block"):
        raise ModelError(f"{name}: the UNet has no cross-attention layers; not an SD 1.x/2.x/XL UNet")
    return {
        "in_channels": u["input_blocks.0.0.weight"].shape[1],  # 4, or 9 for inpainting models
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "block_out_channels": channels,
        "layers_per_block": len(levels[0]),
        # diffusers' mid block takes the last entry; levels without attention ignore theirs.
        "transformer_layers_per_block": [d or _attention_depth(u, "middle_block") for d in depths],
        "cross_attention_dim": to_k.shape[1],
        "attention_head_dim": _unet_heads(family, channels, name),
        "use_linear_projection": proj_in.ndim == 2,  # SD2 projects with Linear, SD1 with 1x1 Conv
        "norm_num_groups": NORM_GROUPS,
        # SD2.x overflows in fp16 attention without fp32 softmax; in fp32 this changes nothing.
        "upcast_attention": family == "sd2",
    }


def _unet_heads(family: str, channels: list[int], name: str) -> int | list[int]:
    # diffusers' ``attention_head_dim`` is the number of heads for these (legacy-named) UNets.
    if family == "sd1":
        if any(c % SD1_UNET_HEADS for c in channels):
            raise ModelError(f"{name}: UNet widths {channels} do not split into {SD1_UNET_HEADS} heads")
        return SD1_UNET_HEADS
    if any(c % HEAD_CHANNELS for c in channels):
        raise ModelError(f"{name}: UNet widths {channels} are not multiples of {HEAD_CHANNELS} (SD2/SDXL heads)")
    return [c // HEAD_CHANNELS for c in channels]


def vae_config(state: State, name: str, scaling: float = VAE_SCALING_FACTOR) -> dict[str, Any]:
    """AutoencoderKL config read from the shapes of the ``first_stage_model.*`` tensors."""
    v = strip(state, VAE_PREFIX)
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    if not levels or "decoder.conv_in.weight" not in v:
        raise ModelError(f"{name}: incomplete VAE (no encoder.down.* or decoder.conv_in weights)")
    return {
        "in_channels": v["encoder.conv_in.weight"].shape[1],
        "out_channels": v["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels],
        "layers_per_block": len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": v["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": NORM_GROUPS,
        "sample_size": 512,
        "scaling_factor": scaling,
        "use_quant_conv": "quant_conv.weight" in v,
        "use_post_quant_conv": "post_quant_conv.weight" in v,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in v,
    }


def _heads(width: int, name: str) -> int:
    heads = max(1, width // HEAD_CHANNELS)
    if width % heads:
        raise ModelError(
            f"{name}: text encoder width {width} does not split into {HEAD_CHANNELS}-channel heads"
        )
    return heads


def _clip_state(t: State) -> State:
    # transformers < 4.26 had no ``text_model.`` level; old SD1 files keep keys without it.
    return strip(t, "text_model.") if any(k.startswith("text_model.") for k in t) else t


def text_config(state: State, family: str, name: str) -> CLIPTextConfig:
    """CLIPTextConfig read from the text-encoder shapes; SD2 keeps all but the last OpenCLIP block.

    ``family`` "sdxl" reads SDXL's CLIP-L, "sdxl_2" its OpenCLIP bigG (every block, and the pooled projection).
    """
    projection = None
    if family in ("sd1", "sdxl"):
        t = _clip_state(strip(state, CLIP_PREFIX if family == "sd1" else SDXL_CLIP_PREFIX))
        tokens, positions = t["embeddings.token_embedding.weight"], t["embeddings.position_embedding.weight"]
        layers = len(_indices(t, r"encoder\.layers\.(\d+)\."))
        mlp, act = t["encoder.layers.0.mlp.fc1.weight"], "quick_gelu"
    else:
        t = strip(state, OPENCLIP_PREFIX if family == "sd2" else SDXL_OPENCLIP_PREFIX)
        tokens, positions = t["token_embedding.weight"], t["positional_embedding"]
        # SD2 uses the penultimate layer; SDXL's pooled output needs the last one too
        layers = len(_indices(t, r"transformer\.resblocks\.(\d+)\.")) - (family == "sd2")
        mlp, act = t["transformer.resblocks.0.mlp.c_fc.weight"], "gelu"
        projection = t["text_projection"].shape[1] if family == "sdxl_2" else None
    if layers < 1:
        raise ModelError(f"{name}: the text encoder has too few layers")
    vocab, width = tokens.shape
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=mlp.shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_heads(width, name),
        max_position_embeddings=positions.shape[0],
        hidden_act=act,
        projection_dim=projection or width,
    )


def _build(cls: type, config: Any) -> Any:
    # On the meta device nothing is allocated or randomly initialised; _load then assigns the real tensors.
    with torch.device("meta"):
        return cls(config) if isinstance(config, CLIPTextConfig) else cls(**config)


def _materialize_buffers(module: torch.nn.Module) -> None:
    """Rebuild the non-persistent buffers that stayed on the meta device (CLIP's ``position_ids``)."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"no rule to rebuild buffer {name!r} of {type(sub).__name__}")
            sub.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


def convert_unet(state: State, family: str, name: str) -> UNet2DConditionModel:
    """The UNet of an original-layout checkpoint."""
    config = unet_config(state, family, name)
    unet = _build(UNet2DConditionModel, config)
    _load(unet, convert_ldm_unet_checkpoint(state, config), name, "UNet")
    return unet


# An SD ControlNet's hint encoder brings images to the 8x smaller latent size: a first convolution, then three
# stride-2 steps, each after a same-size convolution, and the zero convolution out: 8 convolutions, 4 widths.
HINT_WIDTHS = 4


def controlnet_config(c: State, name: str) -> dict[str, Any]:
    """ControlNetModel config read from the shapes of a ControlNet's tensors (``control_model.`` removed).

    The family, which the shapes do not record, follows the attention projection: SD2 projects with Linear.
    """
    proj_in = next((v for k, v in c.items() if k.endswith(".proj_in.weight")), None)
    family = "sd2" if proj_in is not None and proj_in.ndim == 2 else "sd1"
    hint = _indices(c, r"input_hint_block\.(\d+)\.weight")
    if len(hint) != 2 * HINT_WIDTHS:
        raise ModelError(f"{name}: the hint encoder has {len(hint)} convolutions, not {2 * HINT_WIDTHS}; "
                         "not a ControlNet for SD 1.x/2.x (8x latents)")
    return {
        **encoder_config(c, family, name),
        "conditioning_channels": c["input_hint_block.0.weight"].shape[1],
        # the width after the first convolution and after each stride-2 step (all but the zero convolution)
        "conditioning_embedding_out_channels": [c[f"input_hint_block.{i}.weight"].shape[0] for i in hint[:-1:2]],
    }


def convert_controlnet(c: State, config: dict[str, Any], name: str, base: State | None = None) -> ControlNetModel:
    """The ControlNet of original-layout tensors (``control_model.`` removed), with ``config`` from their shapes.

    ``base`` is for a difference file: the base UNet's (diffusers) state dict. A ControlNet tensor the UNet
    also has (the encoder half: same names in both) is then an offset, added to the UNet's weight.
    """
    state = {k: v for k, v in convert_controlnet_checkpoint(c, config).items() if v is not None}
    if base is not None:
        state = {k: _add_offset(v, base[k], k, name) if k in base else v for k, v in state.items()}
    model = _build(ControlNetModel, config)
    _load(model, state, name, "ControlNet")
    return model


def _add_offset(offset: torch.Tensor, base: torch.Tensor, key: str, name: str) -> torch.Tensor:
    if offset.shape != base.shape:
        raise ModelError(f"{name}: difference weight {key} has shape {tuple(offset.shape)}, the model's UNet "
                         f"{tuple(base.shape)}; use a ControlNet trained for this model")
    return offset.float() + base.detach().to("cpu", torch.float32)


def convert_vae(state: State, name: str, scaling: float = VAE_SCALING_FACTOR) -> AutoencoderKL:
    """The VAE of an original-layout checkpoint (keys under ``first_stage_model.``); ``scaling``: its latent scale."""
    config = vae_config(state, name, scaling)
    # Only the VAE's keys: diffusers' converter picks its prefix from whatever keys it is given.
    vae_state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    vae = _build(AutoencoderKL, config)
    _load(vae, convert_ldm_vae_checkpoint(vae_state, config), name, "VAE")
    return vae


def _openclip_state(state: State, layers: int) -> State:
    """OpenCLIP tensors without the blocks SD2 does not use and without the (unused) projections.

    diffusers' converter only skips block 23 (the real SD2 depth) and sizes its q/k/v split from
    ``text_projection`` when present; leaving both out makes it follow our config for any depth and width.
    """
    block = re.compile(rf"{re.escape(OPENCLIP_PREFIX)}transformer\.resblocks\.(\d+)\.")
    unused = {OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale"}
    kept = {}
    for key, tensor in state.items():
        if not key.startswith(OPENCLIP_PREFIX) or key in unused:
            continue
        m = block.match(key)
        if m is None or int(m[1]) < layers:
            kept[key] = tensor
    return kept


def convert_text_encoder(state: State, family: str, name: str) -> CLIPTextModel:
    """The text encoder: CLIP ViT-L for SD1 and SDXL, OpenCLIP ViT-H minus its last block for SD2, and SDXL's
    OpenCLIP bigG with its pooled projection for family "sdxl_2" (a CLIPTextModelWithProjection)."""
    config = text_config(state, family, name)
    model = _build(CLIPTextModelWithProjection if family == "sdxl_2" else CLIPTextModel, config)
    if family in ("sd1", "sdxl"):
        converted = convert_ldm_clip_checkpoint(state, SDXL_CLIP_PREFIX if family == "sdxl" else None)
    elif family == "sdxl_2":
        bigg = {k: v for k, v in state.items() if k.startswith(SDXL_OPENCLIP_PREFIX) and not k.endswith("logit_scale")}
        converted = convert_open_clip_checkpoint(model, bigg, SDXL_OPENCLIP_PREFIX)
    else:
        converted = convert_open_clip_checkpoint(
            model, _openclip_state(state, config.num_hidden_layers), OPENCLIP_PREFIX
        )
    # Saved position_ids are a buffer transformers rebuilds itself (some merged files hold broken ones).
    prefix = "text_model." if hasattr(model, "text_model") else ""  # transformers >= 5.6 dropped the level
    converted = {  # the projection (SDXL's bigG) sits beside text_model, not in it
        (k if k.startswith("text_projection") else prefix + k.removeprefix("text_model.")): v
        for k, v in converted.items() if "position_ids" not in k
    }
    _load(model, converted, name, "text encoder")
    _materialize_buffers(model)
    return model


def convert_checkpoint(
    state: State, name: str, *, v2: str = "auto", with_vae: bool = True
) -> tuple[UNet2DConditionModel, AutoencoderKL | None, CLIPTextModel, str]:
    """(unet, vae, text_encoder, family) of an original-layout checkpoint; vae is None unless with_vae."""
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ModelError(f"{name} is not a Stable Diffusion checkpoint: no UNet keys ({UNET_PREFIX}*) found")
    family = detect_family(state, name, v2)
    if with_vae and not any(k.startswith(VAE_PREFIX) for k in state):
        raise ModelError(f"{name} has no VAE keys ({VAE_PREFIX}*); give a separate VAE with model.vae=PATH")
    try:
        unet = convert_unet(state, family, name)
        scaling = SDXL_VAE_SCALING_FACTOR if family == "sdxl" else VAE_SCALING_FACTOR
        vae = convert_vae(state, name, scaling) if with_vae else None
        text_encoder = convert_text_encoder(state, family, name)
    except KeyError as exc:
        raise ModelError(
            f"{name}: weight {exc} is missing; the file is incomplete or not SD 1.x/2.x/XL"
        ) from exc
    return unet, vae, text_encoder, family


_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def convert_vae_file(state: State, name: str, scaling: float = VAE_SCALING_FACTOR) -> AutoencoderKL:
    """A VAE from a separate file: bare LDM keys, or under ``first_stage_model.`` / ``vae.``; ``scaling``: the
    model family's latent scale (a VAE file does not record it)."""
    for prefix in (VAE_PREFIX, "vae."):
        if any(k.startswith(prefix) for k in state):
            state = strip(state, prefix)
            break
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
        raise ModelError(f"{name} is a diffusers-format VAE; give its folder (with config.json) as model.vae")
    vae_state = {VAE_PREFIX + k: v for k, v in state.items() if k.startswith(_VAE_PARTS)}
    if not vae_state:
        raise ModelError(f"{name} is not a VAE: no encoder.*/decoder.* keys found")
    try:
        return convert_vae(vae_state, name, scaling)
    except KeyError as exc:
        raise ModelError(f"{name}: VAE weight {exc} is missing; the file is incomplete") from exc

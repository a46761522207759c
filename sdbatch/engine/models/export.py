"""Write diffusers UNet/VAE/CLIP modules and ControlNets as original-layout (LDM/CompVis) files or diffusers folders."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import diffusers
import safetensors.torch
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.models.convert import (
    CLIP_PREFIX,
    CONTROLNET_PREFIX,
    DIFFERENCE_KEY,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from sdbatch.engine.text.tokenizer import PAD_TOKENS, write_hf_tokenizer_files

# Inverse of diffusers' update_unet_resnet_ldm_to_diffusers renames.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Inverse of diffusers' update_vae_attentions_ldm_to_diffusers renames.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Inverse of DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"] within one resblock.
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_UNET_KEY = re.compile(
    r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_KEY = re.compile(
    r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?"
    r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)


def _rename_head(rest: str, names: dict[str, str]) -> str:
    """Rename the sub-module at the start of ``rest`` (``norm1.weight`` -> ``in_layers.0.weight``)."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _map_state(state: dict[str, torch.Tensor], fixed: dict[str, str], rename, what: str) -> dict:
    """Apply the fixed renames, then ``rename`` (parsed block keys); an unplaceable key is a bug, not data."""
    out = {}
    for key, tensor in state.items():
        new = fixed.get(key) or rename(key)
        if new is None:
            raise ValueError(
                f"cannot export {what} weight {key!r}: it has no place in the original SD layout"
            )
        out[new] = tensor
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """UNet weights under original key names, without the ``model.diffusion_model.`` prefix."""
    up_attn = {i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)}
    rename = _unet_renamer(unet.config.layers_per_block, up_attn)
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    return _map_state(unet.state_dict(), fixed, rename, "UNet")


def _unet_renamer(layers_per_block: int, up_attn: set[int]) -> Callable[[str], str | None]:
    """diffusers block key -> original key, for a UNet (or a ControlNet's copy of its encoder half).

    ``up_attn`` holds the up levels that have attention: their upsampler sits one slot further.
    """
    n = layers_per_block + 1  # LDM slots per level: resnets + down/upsampler

    def rename(key: str) -> str | None:
        m = _UNET_KEY.fullmatch(key)
        if m is None:
            return None
        where, block, kind, index, rest = m.groups()
        b, i = int(block or 0), int(index)
        sub = 1 if kind == "attentions" else 0
        rest = _rename_head(rest, _UNET_RESNET) if kind == "resnets" else rest
        if where == "mid_block":
            return f"middle_block.{1 if sub else 2 * i}.{rest}"
        if where == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{b * n + n}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{1 + b * n + i}.{sub}.{rest}"
        if kind == "upsamplers":  # the upsampler follows the level's attention when it has one
            return f"output_blocks.{b * n + n - 1}.{2 if b in up_attn else 1}.{rest}"
        return f"output_blocks.{b * n + i}.{sub}.{rest}"

    return rename


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """VAE weights under original key names, without the ``first_stage_model.`` prefix."""
    # LDM numbers decoder levels from the bottom, diffusers from the top.
    last = len(vae.decoder.up_blocks) - 1

    def rename(key: str) -> str | None:
        m = _VAE_KEY.fullmatch(key)
        if m is None:
            return None
        part, where, block, kind, index, rest = m.groups()
        b, i = int(block or 0), int(index)
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        if where == "mid_block":
            if kind == "attentions":
                return f"{part}.mid.attn_1.{_rename_head(rest, _VAE_ATTN)}"
            return f"{part}.mid.block_{i + 1}.{rest}"
        level = b if where == "down_blocks" else last - b
        letter = "down" if where == "down_blocks" else "up"
        if kind in ("downsamplers", "upsamplers"):
            return f"{part}.{letter}.{level}.{letter}sample.{rest}"
        return f"{part}.{letter}.{level}.block.{i}.{rest}"

    out = _map_state(vae.state_dict(), DIFFUSERS_TO_LDM_MAPPING["vae"], rename, "VAE")
    # The original attention projections are 1x1 convolutions; diffusers stores them as linear weights.
    return {k: v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v for k, v in out.items()}


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD1 CLIP weights under their original names, without ``cond_stage_model.transformer.text_model.``."""
    # transformers < 5.6 nests the model under ``text_model.``; the original layout keeps it in the prefix.
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def _openclip_layer(i: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
    out = {}
    for kind in ("weight", "bias"):
        parts = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat(parts)  # OpenCLIP packs q, k, v into one projection
        for diffusers_name, ldm_name in _OPENCLIP_LAYER.items():
            out[f"{dst}{ldm_name}.{kind}"] = state[f"{src}{diffusers_name}.{kind}"]
    return out


def openclip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD2 text encoder as OpenCLIP weights, without ``cond_stage_model.model.``, plus one extra last block.

    SD2 conditions on OpenCLIP's penultimate layer, so diffusers keeps N-1 of its N blocks. A real SD2 file
    still holds the last block; it gets a copy of the last kept one, which the loader drops again.
    """
    out = _openclip_blocks(text_encoder)
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    layers = text_encoder.config.num_hidden_layers
    extra = _openclip_layer(layers - 1, state)
    last, dropped = f".resblocks.{layers - 1}.", f".resblocks.{layers}."
    out.update({k.replace(last, dropped): v.clone() for k, v in extra.items()})
    dtype = state["final_layer_norm.weight"].dtype
    # (width, width) like OpenCLIP's: SD does not use it, but real SD2 files carry it.
    out["text_projection"] = torch.eye(text_encoder.config.hidden_size, dtype=dtype)
    return out


def bigg_to_ldm(text_encoder: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder as OpenCLIP weights, without ``conditioner.embedders.1.model.``: every block,
    and the pooled projection in OpenCLIP's (width, projection) orientation."""
    out = _openclip_blocks(text_encoder)
    out["text_projection"] = text_encoder.text_projection.weight.T
    return out


def _openclip_blocks(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """Embeddings, every block, the final norm and logit_scale of a text encoder, in OpenCLIP's names."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    for i in range(text_encoder.config.num_hidden_layers):
        out.update(_openclip_layer(i, state))
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=state["final_layer_norm.weight"].dtype)
    return out


def to_ldm_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, family: str,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> dict[str, torch.Tensor]:
    """The whole model as one original-layout state dict (contiguous CPU tensors); SDXL (SGM keys) needs
    ``text_encoder_2``."""
    if family not in ("sd1", "sd2", "sdxl") or (family == "sdxl") != (text_encoder_2 is not None):
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl' (with text_encoder_2), got {family!r}")
    if family == "sdxl":
        text = {**{f"{SDXL_CLIP_PREFIX}text_model.{k}": v for k, v in clip_to_ldm(text_encoder).items()},
                **{SDXL_OPENCLIP_PREFIX + k: v for k, v in bigg_to_ldm(text_encoder_2).items()}}
    elif family == "sd1":
        text = {f"{CLIP_PREFIX}text_model.{k}": v for k, v in clip_to_ldm(text_encoder).items()}
    else:
        text = {OPENCLIP_PREFIX + k: v for k, v in openclip_to_ldm(text_encoder).items()}
    state = {
        **{UNET_PREFIX + k: v for k, v in unet_to_ldm(unet).items()},
        **{VAE_PREFIX + k: v for k, v in vae_to_ldm(vae).items()},
        **text,
    }
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_single_file(
    path: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    family: str,
    metadata: dict[str, str] | None = None,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> Path:
    """Save as ``.safetensors`` or as a ``.ckpt``/``.pt``/``.pth`` holding ``{"state_dict": ...}``; SDXL (its SGM
    keys) with ``text_encoder_2``."""
    path = Path(path)
    state = to_ldm_state_dict(unet, vae, text_encoder, family, text_encoder_2)
    return _write_state(path, state, metadata)


def _write_state(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    """Save as ``.safetensors`` or as a ``.ckpt``/``.pt``/``.pth`` holding ``{"state_dict": ...}``."""
    if path.suffix.lower() == ".safetensors":
        safetensors.torch.save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    elif path.suffix.lower() in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"cannot save {path}: use a .safetensors, .ckpt, .pt or .pth file name")
    return path


def save_diffusers_folder(
    root: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    family: str,
    *,
    weights: bool = True,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> Path:
    """Save as a diffusers StableDiffusionPipeline folder (configs only with ``weights=False``); SDXL (with
    ``text_encoder_2``) as a StableDiffusionXLPipeline folder (text_encoder_2/, tokenizer_2/ padding with "!").

    The folder loads offline with ``from_pretrained``; a configs-only folder is what
    ``from_single_file(config=...)`` needs. Its scheduler is the reference's DDIM configuration.
    """
    root = Path(root)
    for name, module in (("unet", unet), ("vae", vae)):
        module.save_pretrained(root / name) if weights else module.save_config(root / name)
    encoders = [("text_encoder", text_encoder), *([("text_encoder_2", text_encoder_2)] if text_encoder_2 else [])]
    for name, encoder in encoders:
        encoder.save_pretrained(root / name) if weights else encoder.config.save_pretrained(root / name)
    write_hf_tokenizer_files(root / "tokenizer", PAD_TOKENS[family])
    scheduler = make_scheduler("ddim", "default", v_prediction=False)
    scheduler.save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if text_encoder_2 is not None:
        write_hf_tokenizer_files(root / "tokenizer_2", PAD_TOKENS["sd2"])  # OpenCLIP's pad token, as SD2
        for unused in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            del index[unused]
        index.update(_class_name="StableDiffusionXLPipeline", tokenizer_2=["transformers", "CLIPTokenizer"],
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"], force_zeros_for_empty_prompt=False)
    (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return root


# A ControlNet's own layers; everything else in it is a copy of the UNet's encoder half, named as in the UNet.
_CONTROL_KEY = re.compile(
    r"controlnet_(?:down_blocks\.(?P<zero>\d+)|(?P<mid>mid_block)"
    r"|cond_embedding\.(?:(?P<hint_in>conv_in)|(?P<hint_out>conv_out)|blocks\.(?P<hint>\d+)))\.(?P<rest>\w+)"
)


def controlnet_to_ldm(cn: ControlNetModel) -> dict[str, torch.Tensor]:
    """A ControlNet's weights in lllyasviel's original layout, keys under ``control_model.``.

    The encoder half keeps the UNet's original names (the UNet renames apply); the ControlNet's own layers
    are ``zero_convs.N.0``, ``middle_block_out.0`` and the ``input_hint_block`` convolutions 0, 2, 4, ...
    """
    hint_out = 2 * len(cn.controlnet_cond_embedding.blocks) + 2
    unet_rename = _unet_renamer(cn.config.layers_per_block, set())

    def rename(key: str) -> str | None:
        m = _CONTROL_KEY.fullmatch(key)
        if m is None:
            return unet_rename(key)
        if m["zero"] is not None:
            return f"zero_convs.{m['zero']}.0.{m['rest']}"
        if m["mid"]:
            return f"middle_block_out.0.{m['rest']}"
        index = 0 if m["hint_in"] else hint_out if m["hint_out"] else 2 * int(m["hint"]) + 2
        return f"input_hint_block.{index}.{m['rest']}"

    state = _map_state(cn.state_dict(), DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], rename, "ControlNet")
    return {CONTROLNET_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_controlnet(
    cn: ControlNetModel,
    path: str | Path,
    base_unet: UNet2DConditionModel | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save in the original layout: ``.safetensors``, or a ``.pth``/``.ckpt``/``.pt`` of ``{"state_dict": ...}``.

    With ``base_unet`` it is a difference file: every tensor the UNet also has is stored minus the UNet's
    (the encoder half), and a ``difference`` key tells loaders to add the base model's weights back.
    """
    path = Path(path)
    state = controlnet_to_ldm(cn)
    if base_unet is not None:
        base = {CONTROLNET_PREFIX + k: v.detach().to("cpu") for k, v in unet_to_ldm(base_unet).items()}
        state = {k: (v - base[k].to(v.dtype)).contiguous() if k in base else v for k, v in state.items()}
        state[DIFFERENCE_KEY] = torch.zeros(1)
    return _write_state(path, state, metadata)

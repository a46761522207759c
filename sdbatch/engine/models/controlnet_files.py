"""Load ControlNets offline, once per model: lllyasviel's SD 1.x/2.x files, difference files, and diffusers
folders and diffusers-layout single files (SD 1.x/2.x and SDXL).

The format is read from the tensors, never from the file name: ``control_model.*`` keys are the original
layout (converted with the config read from their shapes), a ``difference`` key marks offsets from the base
UNet, a folder with config.json is diffusers', and a file of diffusers' keys is built on the model's UNet config
(diffusers' ``ControlNetModel.from_unet``) with the hint encoder and transformer depths read from its shapes:
diffusers' own single-file loader wants a hub config, which we cannot fetch offline.

A ControlNet is kept in its model's bundle, on the UNet's device and dtype, so it is released together with the
model when the model cache drops it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import ControlNetModel

from sdbatch.engine.models.checkpoint import file_sha256_short, read_state_dict
from sdbatch.engine.models.convert import (
    CONTROLNET_PREFIX,
    DIFFERENCE_KEY,
    UNET_PREFIX,
    controlnet_config,
    convert_controlnet,
    strip,
)
from sdbatch.engine.models.loading import ModelBundle, _first_line, _model_files_in, weights_file
from sdbatch.engine.models.tiny_controlnet import TINY_CONTROLNET, ensure_tiny_controlnet
from sdbatch.errors import ModelError

log = logging.getLogger(__name__)

DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"  # a tensor only diffusers' ControlNet layout has


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedControlNet:
    """One loaded ControlNet with what outputs record about it (A1111 names a ControlNet by name and hash)."""

    model: ControlNetModel  # on the base UNet's device and dtype, eval(), no gradients
    name: str  # file stem, or folder name
    file: str  # the resolved file or folder
    hash: str  # 10 hex digits of the file's sha256 (a folder: of its weights file)
    kind: str  # "original" | "difference" | "diffusers"


def load_controlnet(path: str, bundle: ModelBundle, key: str) -> LoadedControlNet:
    """The ControlNet at ``path`` (a file, a diffusers folder, or builtin:tiny) for ``bundle``'s model.

    ``key`` names the config entry in messages (``guidance.models[1]``). Loaded once per bundle and file
    version (path, mtime, size). A difference file adds the bundle's UNet weights, which must still be the
    pristine ones: load ControlNets before merging LoRAs into the UNet.
    """
    try:
        file = _resolve(path, bundle, key)
        stamp = _stamp(file)
        if stamp not in bundle.controlnets:
            for old in [k for k in bundle.controlnets if k[0] == stamp[0]]:  # an older version of the file
                del bundle.controlnets[old]
            bundle.controlnets[stamp] = _load(file, bundle, key)
    except ModelError as exc:
        raise _keyed(exc, key) from exc
    return bundle.controlnets[stamp]


def _keyed(exc: ModelError, key: str) -> ModelError:
    """The error as one line that names the config key (messages from the file readers name only the file)."""
    text = " ".join(str(exc).split())
    return ModelError(text if text.startswith((f"{key}=", f"{key}:")) else f"{key}: {text}")


def _resolve(path: str, bundle: ModelBundle, key: str) -> Path:
    """The resolved file or folder; builtin:tiny is built on first use."""
    if path == TINY_CONTROLNET:
        return ensure_tiny_controlnet(bundle).resolve()
    if path.startswith("builtin:"):
        raise ModelError(f"{key}={path} is unknown; the built-in ControlNet is {TINY_CONTROLNET} "
                         "(for model=tiny and tiny_xl)")
    file = Path(path).expanduser()
    if not file.exists():
        raise ModelError(f"{key}={path}: no such file; give a ControlNet .safetensors/.pth file or a diffusers "
                         "ControlNet folder")
    file = file.resolve()
    if file.is_dir() and not (file / "config.json").is_file():
        raise ModelError(f"{key}={file} is a folder without config.json (not a diffusers ControlNet)"
                         f"{_model_files_in(file)}; give a ControlNet file or a diffusers ControlNet folder")
    return file


def _stamp(file: Path) -> tuple[str, int, int]:
    """(path, mtime_ns, size) of the file, or of a folder's weights file: a rewritten file is reloaded."""
    stat = (weights_file(file) if file.is_dir() else file).stat()
    return str(file), stat.st_mtime_ns, stat.st_size


def _load(file: Path, bundle: ModelBundle, key: str) -> LoadedControlNet:
    """Read, check and convert one ControlNet, and place it like the model's UNet."""
    start = time.perf_counter()
    where = f"{key}={file}"
    model, kind = (_read_folder(file, bundle, where), "diffusers") if file.is_dir() else _read_file(file, bundle, where)
    file_hash = file_sha256_short(weights_file(file) if file.is_dir() else file)
    unet = bundle.unet
    # torch's own .to: diffusers' override warns about fp32-only modules even when it lists none
    torch.nn.Module.to(model, device=unet.device, dtype=unet.dtype).eval().requires_grad_(False)
    name = file.name if file.is_dir() else file.stem
    log.info("Loaded ControlNet %s (%s) in %.1fs <%s>", name, kind, time.perf_counter() - start, key)
    return LoadedControlNet(model=model, name=name, file=str(file), hash=file_hash, kind=kind)


def _read_file(file: Path, bundle: ModelBundle, where: str) -> tuple[ControlNetModel, str]:
    """(model, kind) of a ControlNet file: original layout, plain or difference, or diffusers' layout."""
    state = read_state_dict(file)  # weights_only: a pickle that holds code is refused unread
    if DIFFUSERS_KEY in state:
        return _diffusers_file(state, bundle, where), "diffusers"
    control = _control_state(state, where)
    kind = "difference" if DIFFERENCE_KEY in state else "original"
    try:
        config = controlnet_config(control, where)
        _check_fit(config, bundle, where)
        base = bundle.unet.state_dict() if kind == "difference" else None
        return convert_controlnet(control, config, where, base), kind
    except KeyError as exc:
        raise ModelError(f"{where}: weight {exc} is missing; the file is incomplete or not an SD 1.x/2.x "
                         "ControlNet") from exc


def _diffusers_file(state: dict[str, torch.Tensor], bundle: ModelBundle, where: str) -> ControlNetModel:
    """A single file of diffusers' ControlNet keys, on the model's UNet config (checked against its shapes)."""
    config = {**_unet_like_config(bundle.unet.config), **_shape_config(state)}
    _check_fit(config, bundle, where)
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    _assign(model, state, where, "the weights do not fit the model's UNet; use a ControlNet made for this model")
    return model


def _unet_like_config(unet: Mapping) -> dict:
    """The ControlNet config diffusers' ``ControlNetModel.from_unet`` derives from a UNet config."""
    keys = ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
            "transformer_layers_per_block", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
            "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
            "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
            "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
            "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim", "mid_block_type")
    return {k: unet[k] for k in keys if k in unet}


def _shape_config(state: Mapping[str, torch.Tensor]) -> dict:
    """What a diffusers ControlNet's weights tell of its config: the family's markers (added embedding, context
    width, projection kind), the hint encoder's widths and each level's transformer depth."""
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")})
    depth = [1 + max((int(k.split(".")[5]) for k in state
                      if k.startswith(f"down_blocks.{i}.attentions.0.transformer_blocks.")), default=0)
             for i in blocks]
    steps = {int(k.split(".")[2]): v.shape[0] for k, v in state.items()  # the odd blocks change the width
             if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")}
    hint = [state[DIFFUSERS_KEY].shape[0], *(steps[i] for i in sorted(steps) if i % 2)]
    context = next((v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((v.ndim for k, v in state.items() if k.endswith(".proj_in.weight")), None)
    config = {"conditioning_embedding_out_channels": tuple(hint), "transformer_layers_per_block": tuple(depth),
              "conditioning_channels": state[DIFFUSERS_KEY].shape[1],
              "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in state else None}
    if context is not None:
        config["cross_attention_dim"] = context
    if proj is not None:
        config["use_linear_projection"] = proj == 2
    return config


def _control_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors without their prefix; some files store them without ``control_model.``."""
    control = strip(state, CONTROLNET_PREFIX)
    if not control and "input_hint_block.0.weight" in state:
        control = {k: v for k, v in state.items() if k != DIFFERENCE_KEY}
    if not control:
        raise ModelError(f"{where} is not a ControlNet: no {CONTROLNET_PREFIX}* keys{_what_it_is(state)}")
    if any(k.startswith("label_emb.") for k in control):
        raise ModelError(f"{where} is an SDXL ControlNet in the original (non-diffusers) layout, which sdbatch does "
                         "not read; use a diffusers-format SDXL ControlNet (a folder with config.json, or its "
                         ".safetensors)")
    return control


def _what_it_is(state: Mapping[str, torch.Tensor]) -> str:
    """A hint for the message when a file is not a ControlNet, naming what it looks like instead."""
    if any(k.startswith(UNET_PREFIX) for k in state):
        return "; it is a whole Stable Diffusion checkpoint (that is model.checkpoint)"
    if any(".lora_down." in k or ".lora_up." in k or k.startswith(("lora_unet_", "lora_te_")) for k in state):
        return "; it is a LoRA (that goes in network.loras)"
    return ""


def _read_folder(folder: Path, bundle: ModelBundle, where: str) -> ControlNetModel:
    """A diffusers ControlNet folder, its weights read with the safe reader (a .bin is never unpickled freely).

    Built on the meta device from config.json and assigned the file's tensors, like a converted file, so
    the weights file read is the one whose hash is recorded and the fit is checked before it is read.
    """
    try:
        config = ControlNetModel.load_config(folder, local_files_only=True)
        _check_family(config, bundle, where)  # another family's config may not even build with these defaults
        with torch.device("meta"):
            model = ControlNetModel.from_config(config)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{where}: cannot read its config.json as a ControlNet: {_first_line(exc)}") from exc
    _check_fit(model.config, bundle, where)
    _assign(model, read_state_dict(weights_file(folder)), where, "the weights do not fit its config.json")
    return model


def _assign(model: ControlNetModel, state: Mapping[str, torch.Tensor], where: str, problem: str) -> None:
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"{where}: {problem}: {_first_line(exc)}") from exc


def _check_fit(config: Mapping, bundle: ModelBundle, where: str) -> None:
    """Refuse a ControlNet of another family or architecture than the model's, before its weights are used."""
    _check_family(config, bundle, where)
    unet = bundle.unet.config
    theirs = (list(config["block_out_channels"]), config["layers_per_block"])
    ours = (list(unet.block_out_channels), unet.layers_per_block)
    if theirs != ours:
        raise ModelError(f"{where} does not fit the model's UNet: its widths {theirs[0]} x{theirs[1]} blocks, "
                         f"the UNet's {ours[0]} x{ours[1]}; use a ControlNet made for this model")


def _check_family(config: Mapping, bundle: ModelBundle, where: str) -> None:
    """Refuse a ControlNet of another family (or text width) than the model's, naming both."""
    context, ours = config.get("cross_attention_dim"), bundle.unet.config.cross_attention_dim
    family = controlnet_family(config)
    if family != bundle.family or context != ours:
        advice = f"trained for {bundle.family.upper()}" if family != bundle.family else "made for this model"
        raise ModelError(f"{where} is a ControlNet for {family.upper()} (context {context}), but the model is "
                         f"{bundle.family.upper()} (context {ours}); use a ControlNet {advice}")


def controlnet_family(config: Mapping) -> str:
    """sdxl (the "text_time" added embedding of pooled text and sizes), sd2 (attention projected with Linear),
    or sd1."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"

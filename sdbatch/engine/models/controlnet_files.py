"""Load SD 1.x/2.x ControlNets offline, once per model: lllyasviel's files, difference files, diffusers folders.

The format is read from the tensors, never from the file name: ``control_model.*`` keys are the original
layout (converted with the config read from their shapes), a ``difference`` key marks offsets from the base
UNet, and a folder with config.json is diffusers'. A ControlNet is kept in its model's bundle, on the UNet's
device and dtype, so it is released together with the model when the model cache drops it.
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

SDXL_CONTEXT = 2048  # SDXL's two text encoders together; SD1 has 768, SD2 1024


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
        raise ModelError(f"{key}={path} is unknown; the built-in ControlNet is {TINY_CONTROLNET} (for model=tiny)")
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
    """(model, kind) of an original-layout ControlNet file, plain or difference."""
    state = read_state_dict(file)  # weights_only: a pickle that holds code is refused unread
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


def _control_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors without their prefix; some files store them without ``control_model.``."""
    control = strip(state, CONTROLNET_PREFIX)
    if not control and "input_hint_block.0.weight" in state:
        control = {k: v for k, v in state.items() if k != DIFFERENCE_KEY}
    if not control:
        raise ModelError(f"{where} is not a ControlNet: no {CONTROLNET_PREFIX}* keys{_what_it_is(state)}")
    if any(k.startswith("label_emb.") for k in control):
        raise ModelError(f"{where} is an SDXL ControlNet; sdbatch runs SD 1.x and 2.x models only")
    return control


def _what_it_is(state: Mapping[str, torch.Tensor]) -> str:
    """A hint for the message when a file is not a ControlNet, naming what it looks like instead."""
    if any(k.startswith(UNET_PREFIX) for k in state):
        return "; it is a whole Stable Diffusion checkpoint (that is model.checkpoint)"
    if any(".lora_down." in k or ".lora_up." in k or k.startswith(("lora_unet_", "lora_te_")) for k in state):
        return "; it is a LoRA (that goes in network.loras)"
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return "; it is the weights file of a diffusers ControlNet: give its folder, with config.json"
    return ""


def _read_folder(folder: Path, bundle: ModelBundle, where: str) -> ControlNetModel:
    """A diffusers ControlNet folder, its weights read with the safe reader (a .bin is never unpickled freely).

    Built on the meta device from config.json and assigned the file's tensors, like a converted file, so
    the weights file read is the one whose hash is recorded and the fit is checked before it is read.
    """
    try:
        config = ControlNetModel.load_config(folder, local_files_only=True)
        _refuse_sdxl(config, where)  # an SDXL config may not even build with this architecture's defaults
        with torch.device("meta"):
            model = ControlNetModel.from_config(config)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{where}: cannot read its config.json as a ControlNet: {_first_line(exc)}") from exc
    _check_fit(model.config, bundle, where)
    try:
        model.load_state_dict(read_state_dict(weights_file(folder)), strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"{where}: the weights do not fit its config.json: {_first_line(exc)}") from exc
    return model


def _check_fit(config: Mapping, bundle: ModelBundle, where: str) -> None:
    """Refuse a ControlNet of another family or architecture than the model's, before its weights are used."""
    _refuse_sdxl(config, where)
    unet, context = bundle.unet.config, config["cross_attention_dim"]
    family = "sd2" if config["use_linear_projection"] else "sd1"  # SD2 projects attention with Linear
    if family != bundle.family or context != unet.cross_attention_dim:
        advice = f"trained for {bundle.family.upper()}" if family != bundle.family else "made for this model"
        raise ModelError(f"{where} is a ControlNet for {family.upper()} (context {context}), but the model is "
                         f"{bundle.family.upper()} (context {unet.cross_attention_dim}); use a ControlNet {advice}")
    theirs = (list(config["block_out_channels"]), config["layers_per_block"])
    ours = (list(unet.block_out_channels), unet.layers_per_block)
    if theirs != ours:
        raise ModelError(f"{where} does not fit the model's UNet: its widths {theirs[0]} x{theirs[1]} blocks, "
                         f"the UNet's {ours[0]} x{ours[1]}; use a ControlNet made for this model")


def _refuse_sdxl(config: Mapping, where: str) -> None:
    if config.get("addition_embed_type") == "text_time" or config.get("cross_attention_dim") == SDXL_CONTEXT:
        raise ModelError(f"{where} is an SDXL ControlNet; sdbatch runs SD 1.x and 2.x models only")

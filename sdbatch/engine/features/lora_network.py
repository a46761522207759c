"""LoRA-family networks (kohya LoRA/LoCon, LyCORIS LoHa/LoKr/DoRA and diffusers/PEFT LoRA files) on the UNet
and text encoder: hooked (per-batch and per-image multipliers), merged, or pre-calculated into the weights.

Every network module is an update of one Linear or Conv2d, ``W + mul · ΔW`` (gen_img_inventory.md §8.2;
the updates and their maths are in :mod:`.lora_updates`). Files are read once into :class:`LoraFile` (kohya
module names, fp32 on the CPU); :class:`NetworkPatch` matches those names against the live models and either
adds the update to the module's output with a forward hook (multipliers can change per batch at no cost) or
writes it into the weights (one merge, or one per batch for pre-calculation), keeping the originals to restore
bit-exactly. A plain LoRA hooks as up(down(x)); every other update hooks as the module's own op with its weight
change (ΔW, or DoRA's W' − W), made once per device. Text-encoder modules take each network's text-encoder
multiplier, UNet modules its UNet multiplier (A1111's ``<lora:NAME:TE:UNET>``).

On SDXL (a second text encoder) the kohya names are SDXL's: ``lora_unet_`` with the UNet's SGM block names
(:mod:`sdbatch.engine.models.sdxl_names`), ``lora_te1_`` for CLIP-L and ``lora_te2_`` for OpenCLIP-bigG; both
encoders take the text-encoder multiplier; a diffusers/PEFT SDXL file's names are renamed to those. A file of the
other family matches nothing and says which it is for.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdbatch.config.spec import LoraConfig
from sdbatch.engine.core.rows import REGIONAL_NETWORKS, row_factor
from sdbatch.engine.core.rows import current as current_rows
from sdbatch.engine.features.lora_updates import (
    KNOWN_SUFFIXES,
    Factors,
    Update,
    fit,
    kind,
    low_rank_output,
    update_of,
    weight_change,
    weight_output,
)
from sdbatch.engine.models.checkpoint import SAFETENSORS_SUFFIX, file_sha256_short, read_state_dict
from sdbatch.engine.models.sdxl_names import kohya_unet_names, sgm_paths
from sdbatch.errors import ModelError

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_text_model_"  # kohya names keep transformers 4's ``text_model.`` level
SDXL_TE_PREFIXES = ("lora_te1_text_model_", "lora_te2_text_model_")  # CLIP-L, OpenCLIP-bigG
_SDXL_UNET_BLOCKS = tuple(UNET_PREFIX + b for b in ("input_blocks_", "middle_block_", "output_blocks_",
                                                    "time_embed_", "label_emb_", "out_"))
# diffusers/PEFT key suffix → the kohya suffix of the same tensor
_DIFFUSERS_ROLES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight", "alpha": "alpha",
                    "lora_magnitude_vector.weight": "lora_magnitude_vector",
                    "lora_magnitude_vector": "lora_magnitude_vector"}
# diffusers/PEFT key prefix → (kohya prefix, path prefix to drop so both transformers layouts give one name)
_DIFFUSERS_PREFIXES = {"unet.": (UNET_PREFIX, ""), "text_encoder.": (TE_PREFIX, "text_model."),
                       "text_encoder_2.": (SDXL_TE_PREFIXES[1], "text_model.")}
# the row-contract data with each image's UNet multipliers, (images, networks): images of one UNet call with
# other multipliers (hooked mode) get their own; without it every row gets set_multipliers'
ROW_MULTIPLIERS = "lora_multipliers"
_CACHE_SIZE = 8  # files; a multirun over a handful of LoRAs reads each once
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True, eq=False)
class LoraFile:
    """A loaded network file. eq=False: identity, which the load cache keeps per (file, mtime, size)."""

    name: str  # file stem, e.g. "style" for style.safetensors
    path: str  # resolved path
    hash: str  # A1111 "addnet" short hash (see addnet_hash)
    modules: dict[str, Update] = field(repr=False)  # by kohya module name: LoraModule, LohaModule, LokrModule
    # read from diffusers/PEFT keys: its UNet names are diffusers module paths (SDXL renames them to SGM's)
    diffusers_keys: bool = False


_cache: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()
_loads = 0


def load_count() -> int:
    """How many LoRA files were actually read (not served from the cache) in this process."""
    return _loads


def load_lora(path: str | Path) -> LoraFile:
    """The LoRA file at ``path``, read once per (file, mtime, size) and then served from a small LRU cache."""
    path = Path(path)
    if not path.is_file():
        found = "is a folder, not a LoRA file" if path.is_dir() else "not found"
        raise ModelError(f"LoRA file {path} {found}; network.loras[].path must point to a LoRA file")
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    lora = _read_lora(resolved)
    _cache[key] = lora
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return lora


def _read_lora(path: Path) -> LoraFile:
    global _loads
    state = read_state_dict(path)  # ModelError for a corrupt file or an unsafe pickle
    _loads += 1
    modules = _parse_modules(path, state)
    diffusers_keys = any(key.startswith(tuple(_DIFFUSERS_PREFIXES)) for key in state)
    return LoraFile(name=path.stem, path=str(path), hash=addnet_hash(path), modules=modules,
                    diffusers_keys=diffusers_keys)


def addnet_hash(path: str | Path) -> str:
    """A1111's LoRA short hash: sha256 of a .safetensors file's tensor data (header skipped, so editing the
    metadata keeps it), or of a whole torch file; first 12 hex digits."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return file_sha256_short(path, 12)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _parse_modules(path: Path, state: dict[str, torch.Tensor]) -> dict[str, Update]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        named = _name_and_role(key)
        if named is not None:
            parts.setdefault(named[0], {})[named[1]] = tensor
    modules = {name: update_of(path, name, p) for name, p in sorted(parts.items())
               if p.keys() - {"alpha", "dora_scale", "lora_magnitude_vector"}}
    if not modules:
        raise ModelError(f"{path} holds no LoRA weights (no lora_down/lora_up, lora_A/lora_B, hada_ or lokr_ "
                         "keys); network.loras[].path must point to a LoRA file")
    return modules


def _name_and_role(key: str) -> tuple[str, str] | None:
    """(kohya module name, kohya key suffix) of a kohya or diffusers/PEFT key; None for other keys."""
    if key.startswith("lora_"):  # kohya: lora_unet_..., lora_te_..., SDXL's lora_te1_/lora_te2_
        name, _, suffix = key.partition(".")
        return (name, suffix) if suffix in KNOWN_SUFFIXES else None
    for prefix, (kohya_prefix, drop) in _DIFFUSERS_PREFIXES.items():
        if not key.startswith(prefix):
            continue
        for suffix, role in _DIFFUSERS_ROLES.items():
            if key.endswith("." + suffix):
                module_path = key[len(prefix) : -len(suffix) - 1].removeprefix(drop)
                return kohya_prefix + module_path.replace(".", "_"), role
    return None


def module_map(unet: torch.nn.Module, text_encoder: torch.nn.Module,
               text_encoder_2: torch.nn.Module | None = None) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of the models by kohya name, e.g. lora_te_text_model_encoder_layers_0_mlp_fc1;
    with a second text encoder (SDXL) lora_te1_/lora_te2_ names and the UNet's SGM names
    (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q)."""
    if text_encoder_2 is None:
        targets = _named_layers(UNET_PREFIX, unet, "")
        return targets | _named_layers(TE_PREFIX, text_encoder, "text_model.")
    targets = kohya_unet_names(unet, UNET_PREFIX)
    for prefix, model in zip(SDXL_TE_PREFIXES, (text_encoder, text_encoder_2), strict=True):
        targets |= _named_layers(prefix, model, "text_model.")
    return targets


def _named_layers(prefix: str, model: torch.nn.Module, drop: str) -> dict[str, torch.nn.Module]:
    # transformers 5's CLIPTextModel has no text_model level (encoder.layers...), 4's has; both give one name.
    return {prefix + path.removeprefix(drop).replace(".", "_"): module for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}


def family_of(names: Sequence[str]) -> str | None:
    """Which model family kohya module names are for: "SDXL", "SD1/SD2", or None when they tell neither."""
    if any(n.startswith(("lora_te1_", "lora_te2_", *_SDXL_UNET_BLOCKS)) for n in names):
        return "SDXL"
    if any(n.startswith(("lora_te_", UNET_PREFIX + "down_blocks_", UNET_PREFIX + "mid_block_",
                         UNET_PREFIX + "up_blocks_")) for n in names):
        return "SD1/SD2"
    return None


@dataclass(frozen=True, slots=True, eq=False)
class _Delta:
    """One network's update of one module: a LoRA's factors shaped for the module, or any other update."""

    network: int  # index into NetworkPatch's loras and multipliers
    update: Update
    factors: Factors | None  # a LoRA's (down, up, mid) shaped for the module, fp32, CPU

    @property
    def low_rank(self) -> bool:
        """Hooked as up(mid(down(x))): a LoRA without DoRA (the others hook with their whole weight change)."""
        return self.factors is not None and self.update.dora_scale is None


class NetworkPatch:
    """LoRA networks matched onto a UNet and text encoder; applied by hooks, by merging, or both in turn."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, loras: Sequence[LoraFile],
                 strict: bool = False, text_encoder_2: torch.nn.Module | None = None) -> None:
        self._targets = module_map(unet, text_encoder, text_encoder_2)
        self._count = len(loras)
        self._deltas: dict[str, list[_Delta]] = {}
        family = "SD1/SD2" if text_encoder_2 is None else "SDXL"
        renames = _sdxl_renames(unet) if text_encoder_2 is not None and any(f.diffusers_keys for f in loras) else {}
        for index, lora in enumerate(loras):
            modules = _renamed(lora.modules, renames) if lora.diffusers_keys and renames else lora.modules
            for name, update in _matched(lora, modules, self._targets, strict, family).items():
                factors = fit(lora.path, name, update, self._targets[name])
                self._deltas.setdefault(name, []).append(_Delta(index, update, factors))
        self.touches_text_encoder = any(not name.startswith(UNET_PREFIX) for name in self._deltas)
        self._muls = ((1.0, 1.0),) * self._count  # (text encoder, UNet) per network
        self._merged = False
        self._backups: dict[str, torch.Tensor] = {}  # original weights (CPU), kept from the first merge on
        self._on_device: dict[tuple[str, int], tuple[torch.Tensor | None, ...]] = {}  # hook tensors
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # whether the UNet hooks read the call's rows (per-image multipliers, regional networks): reading them
        # is a graph break under perf.compile, so a batch whose images share their multipliers does not
        self.reads_rows = True

    def hook(self) -> None:
        """Install a forward hook on every matched module (once); it adds the networks at set_multipliers()."""
        if self._handles:
            return
        for name, deltas in self._deltas.items():
            module = self._targets[name]
            handle = module.register_forward_hook(self._forward_hook(name), with_kwargs=True)
            self._handles.append(handle)
            for delta in deltas:  # made now, not in the first call: a compiled UNet would compile that call twice
                self._tensors_for(module, module.weight, name, delta)

    def set_multipliers(self, muls: Sequence[float | tuple[float, float]]) -> None:
        """One multiplier per network for the hooks, a number or a (text encoder, UNet) pair; 0 skips that
        network's computation."""
        self._muls = self._checked(muls)

    @torch.no_grad()
    def merge(self, muls: Sequence[float | tuple[float, float]]) -> None:
        """W ← W_original + Σ mul·ΔW, in fp32 and cast back; hooks stay inert until restore()."""
        muls = self._checked(muls)
        self.restore()  # a second merge (pre-calculation per batch) replaces the first, never stacks on it
        for name, deltas in self._deltas.items():
            module = self._targets[name]
            total = _merged_delta(module, deltas, [m[_side(name)] for m in muls])
            if total is None:
                continue
            self._backups.setdefault(name, module.weight.detach().to("cpu", copy=True))
            module.weight.copy_((module.weight.float() + total).to(module.weight.dtype))
        self._merged = True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back, bit-exactly; a no-op when nothing is merged."""
        if not self._merged:
            return
        for name, backup in self._backups.items():
            self._targets[name].weight.copy_(backup)
        self._merged = False

    def remove(self) -> None:
        """restore() and remove the hooks: the models are exactly as they were before the patch."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._backups.clear()
        self._on_device.clear()

    def _checked(self, muls: Sequence[float | tuple[float, float]]) -> tuple[tuple[float, float], ...]:
        if len(muls) != self._count:
            raise ValueError(f"{len(muls)} multipliers for {self._count} networks; give one per network")
        return tuple(LoraConfig.split(m) for m in muls)

    def _forward_hook(self, name: str) -> Callable:
        deltas = self._deltas[name]
        side = _side(name)

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            if self._merged:  # the weights already hold every network
                return None
            x = args[0] if args else kwargs["input"]
            rows = current_rows() if side and self.reads_rows else None
            per_row = rows.per_row(ROW_MULTIPLIERS) if rows is not None else None  # (rows, networks) or None
            regional = rows.per_call.get(REGIONAL_NETWORKS) if rows is not None else None
            total = None
            for delta in deltas:
                mul = per_row[:, delta.network] if per_row is not None else self._muls[delta.network][side]
                if not (mul.any() if per_row is not None else mul):
                    continue
                tensors = self._tensors_for(module, x, name, delta)
                scale = delta.update.scale if delta.low_rank else 1.0  # the others hold it in their change
                part = low_rank_output(module, x, *tensors) if delta.low_rank else weight_output(module, x, tensors[0])
                part = part * (row_factor(mul, part) * scale if per_row is not None else mul * scale)
                if regional is not None:  # network i only inside the region of AND part i
                    part = part * regional.factor(delta.network, part, name, rows)
                total = part if total is None else total + part
            return None if total is None else output + total

        return hook

    def _tensors_for(self, module: torch.nn.Module, x: torch.Tensor, name: str,
                     delta: _Delta) -> tuple[torch.Tensor | None, ...]:
        """A LoRA's (down, up, mid), or (weight change,), on x's device and dtype: made on first use and again
        only if the model moves."""
        key = (name, delta.network)
        cached = self._on_device.get(key)
        if cached is None or cached[0].device != x.device or cached[0].dtype != x.dtype:
            if delta.low_rank:
                cached = tuple(t if t is None else t.to(x.device, x.dtype) for t in delta.factors)
            else:  # the original weight is in the module: hooks are inert while the networks are merged
                cached = (weight_change(module, delta.update, delta.factors, x.device).to(x.dtype),)
            self._on_device[key] = cached
        return cached


def _side(name: str) -> int:
    """Which of a network's (text encoder, UNet) multipliers a module takes."""
    return 1 if name.startswith(UNET_PREFIX) else 0


def _sdxl_renames(unet: torch.nn.Module) -> dict[str, str]:
    """A diffusers/PEFT file's names on SDXL → kohya SDXL names: UNet module paths → SGM names, CLIP-L's
    ``text_encoder.`` (read as lora_te_) → lora_te1_."""
    renames = {UNET_PREFIX + path.replace(".", "_"): UNET_PREFIX + sgm.replace(".", "_")
               for path, sgm in sgm_paths(unet).items()}
    return renames | {TE_PREFIX: SDXL_TE_PREFIXES[0]}


def _renamed(modules: dict[str, Update], renames: dict[str, str]) -> dict[str, Update]:
    def name(old: str) -> str:
        if old.startswith(TE_PREFIX):
            return renames[TE_PREFIX] + old.removeprefix(TE_PREFIX)
        return renames.get(old, old)

    return {name(old): update for old, update in modules.items()}


def _matched(lora: LoraFile, modules: dict[str, Update], targets: dict[str, torch.nn.Module], strict: bool,
             family: str) -> dict[str, Update]:
    """The file's modules that exist in the models; the rest raise (strict) or are skipped with one warning."""
    missing = [name for name in modules if name not in targets]
    total = len(modules)
    if len(missing) == total:
        own = family_of(missing)
        if own is not None and own != family:
            raise ModelError(f"LoRA {lora.path} is an {own} LoRA (e.g. {missing[0]}); this model is {family}: "
                             f"use an {family} LoRA or an {own} model")
        raise ModelError(f"LoRA {lora.path} does not fit this model: none of its {total} modules exist "
                         f"(e.g. {missing[0]}); is it for another architecture?")
    if missing:
        what = (f"LoRA {lora.path}: {len(missing)} of its {total} modules are not in this model "
                f"({', '.join(missing[:3])})")
        if strict:
            raise ModelError(f"{what}; set network.strict=false to skip them")
        log.warning("%s; skipped <network.strict=false>", what)
    matched = {name: module for name, module in modules.items() if name in targets}
    unet = sum(name.startswith(UNET_PREFIX) for name in matched)
    kinds = ", ".join(sorted({kind(update) for update in matched.values()}))
    log.info("LoRA %s: %d UNet and %d text-encoder modules (%s)", lora.name, unet, len(matched) - unet, kinds)
    return matched


def _merged_delta(module: torch.nn.Module, deltas: list[_Delta], muls: list[float]) -> torch.Tensor | None:
    """Σ mul·ΔW in fp32 on the weight's device, shaped like the weight; None when every multiplier is 0."""
    total = None
    for delta in deltas:
        mul = muls[delta.network]
        if mul == 0:
            continue
        part = weight_change(module, delta.update, delta.factors, module.weight.device, mul)
        total = part if total is None else total + part
    return total

"""LoRA-family networks (kohya LoRA/LoCon and diffusers/PEFT LoRA files) on the UNet and text encoder:
hooked (per-batch multipliers), merged, or pre-calculated into the weights.

Every network module is a low-rank update of one Linear or Conv2d, ``W + mul · alpha/rank · up @ down``
(gen_img_inventory.md §8.2). Files are read once into :class:`LoraFile` (kohya module names, fp32 on the CPU);
:class:`NetworkPatch` matches those names against the live models and either adds the update to the module's
output with a forward hook (multipliers can change per batch at no cost) or writes it into the weights (one
merge, or one per batch for pre-calculation), keeping the originals to restore bit-exactly.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdbatch.engine.core.rows import current as current_rows
from sdbatch.engine.core.rows import row_factor
from sdbatch.engine.models.checkpoint import SAFETENSORS_SUFFIX, file_sha256_short, read_state_dict
from sdbatch.errors import ModelError

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_text_model_"  # kohya names keep transformers 4's ``text_model.`` level
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                    "lora.up.weight": "up", "alpha": "alpha"}
# diffusers/PEFT key prefix → (kohya prefix, path prefix to drop so both transformers layouts give one name)
_DIFFUSERS_PREFIXES = {"unet.": (UNET_PREFIX, ""), "text_encoder.": (TE_PREFIX, "text_model.")}
# Key fragments of formats whose maths differ from plain LoRA: applying only their down/up would be wrong.
_UNSUPPORTED = {"hada_": "LyCORIS LoHa/LoKr", "lokr_": "LyCORIS LoHa/LoKr", "dora_scale": "DoRA",
                "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon with CP decomposition (lora_mid)"}
# the row-contract data with each image's multipliers, (images, networks): images of one UNet call with other
# multipliers (hooked mode) get their own; without it every row gets set_multipliers'
ROW_MULTIPLIERS = "lora_multipliers"
_CACHE_SIZE = 8  # files; a multirun over a handful of LoRAs reads each once
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True, eq=False)
class LoraModule:
    """One module's low-rank update, fp32 on the CPU. eq=False: tensors have no boolean equality."""

    down: torch.Tensor  # (rank, in) Linear, or (rank, in, k, k) Conv2d
    up: torch.Tensor  # (out, rank) Linear, or (out, rank, 1, 1) Conv2d
    alpha: float  # scale = alpha / rank; a file without alpha → alpha = rank (scale 1)

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]


@dataclass(frozen=True, slots=True, eq=False)
class LoraFile:
    """A loaded network file. eq=False: identity, which the load cache keeps per (file, mtime, size)."""

    name: str  # file stem, e.g. "style" for style.safetensors
    path: str  # resolved path
    hash: str  # A1111 "addnet" short hash (see addnet_hash)
    modules: dict[str, LoraModule] = field(repr=False)  # by kohya module name


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
    return LoraFile(name=path.stem, path=str(path), hash=addnet_hash(path), modules=modules)


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


def _parse_modules(path: Path, state: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    for fragment, kind in _UNSUPPORTED.items():
        if any(fragment in key for key in state):
            raise ModelError(f"{path} is a {kind} network; {kind} networks are not supported yet "
                             "(use a LoRA or LoCon file)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        named = _name_and_role(key)
        if named is not None:
            parts.setdefault(named[0], {})[named[1]] = tensor
    modules = {name: _module(path, name, p) for name, p in sorted(parts.items()) if p.keys() != {"alpha"}}
    if not modules:
        raise ModelError(f"{path} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys); "
                         "network.loras[].path must point to a LoRA file")
    return modules


def _name_and_role(key: str) -> tuple[str, str] | None:
    """(kohya module name, "down" | "up" | "alpha") of a kohya or diffusers/PEFT key; None for other keys."""
    if key.startswith("lora_"):  # kohya: lora_unet_..., lora_te_... (and SDXL's lora_te1_/te2_, which never match)
        name, _, suffix = key.partition(".")
        role = _KOHYA_ROLES.get(suffix)
        return (name, role) if role else None
    for prefix, (kohya_prefix, drop) in _DIFFUSERS_PREFIXES.items():
        if not key.startswith(prefix):
            continue
        for suffix, role in _DIFFUSERS_ROLES.items():
            if key.endswith("." + suffix):
                module_path = key[len(prefix) : -len(suffix) - 1].removeprefix(drop)
                return kohya_prefix + module_path.replace(".", "_"), role
    return None


def _module(path: Path, name: str, parts: dict[str, torch.Tensor]) -> LoraModule:
    if "down" not in parts or "up" not in parts:
        missing = "up (lora_up / lora_B)" if "up" not in parts else "down (lora_down / lora_A)"
        raise ModelError(f"{path}: module {name} has no {missing} weight; the file is incomplete, export it again")
    down, up = (parts[role].to("cpu", torch.float32).contiguous() for role in ("down", "up"))
    alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])  # old files: scale 1
    return LoraModule(down=down, up=up, alpha=alpha)


def module_map(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of the models by kohya name, e.g. lora_te_text_model_encoder_layers_0_mlp_fc1."""
    targets: dict[str, torch.nn.Module] = {}
    # transformers 5's CLIPTextModel has no text_model level (encoder.layers...), 4's has; both give one name.
    for prefix, model, drop in ((UNET_PREFIX, unet, ""), (TE_PREFIX, text_encoder, "text_model.")):
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                targets[prefix + path.removeprefix(drop).replace(".", "_")] = module
    return targets


@dataclass(frozen=True, slots=True, eq=False)
class _Delta:
    """One network's update of one module, its tensors shaped for that module (fp32, CPU)."""

    network: int  # index into NetworkPatch's loras and multipliers
    down: torch.Tensor
    up: torch.Tensor
    scale: float


class NetworkPatch:
    """LoRA networks matched onto a UNet and text encoder; applied by hooks, by merging, or both in turn."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, loras: Sequence[LoraFile],
                 strict: bool = False) -> None:
        self._targets = module_map(unet, text_encoder)
        self._count = len(loras)
        self._deltas: dict[str, list[_Delta]] = {}
        for index, lora in enumerate(loras):
            for name, lora_module in _matched(lora, self._targets, strict).items():
                down, up = _fit(lora, name, lora_module, self._targets[name])
                self._deltas.setdefault(name, []).append(_Delta(index, down, up, lora_module.scale))
        self.touches_text_encoder = any(name.startswith(TE_PREFIX) for name in self._deltas)
        self._muls = (1.0,) * self._count
        self._merged = False
        self._backups: dict[str, torch.Tensor] = {}  # original weights (CPU), kept from the first merge on
        self._on_device: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # hook tensors
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def hook(self) -> None:
        """Install a forward hook on every matched module (once); it adds the networks at set_multipliers()."""
        if self._handles:
            return
        for name in self._deltas:
            handle = self._targets[name].register_forward_hook(self._forward_hook(name), with_kwargs=True)
            self._handles.append(handle)

    def set_multipliers(self, muls: Sequence[float]) -> None:
        """One multiplier per network for the hooks; 0 skips that network's computation."""
        self._muls = self._checked(muls)

    @torch.no_grad()
    def merge(self, muls: Sequence[float]) -> None:
        """W ← W_original + Σ mul·scale·ΔW, in fp32 and cast back; hooks stay inert until restore()."""
        muls = self._checked(muls)
        self.restore()  # a second merge (pre-calculation per batch) replaces the first, never stacks on it
        for name, deltas in self._deltas.items():
            weight = self._targets[name].weight
            total = _merged_delta(self._targets[name], deltas, muls)
            if total is None:
                continue
            self._backups.setdefault(name, weight.detach().to("cpu", copy=True))
            weight.copy_((weight.float() + total).to(weight.dtype))
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

    def _checked(self, muls: Sequence[float]) -> tuple[float, ...]:
        if len(muls) != self._count:
            raise ValueError(f"{len(muls)} multipliers for {self._count} networks; give one per network")
        return tuple(float(m) for m in muls)

    def _forward_hook(self, name: str) -> Callable:
        deltas = self._deltas[name]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            if self._merged:  # the weights already hold every network
                return None
            x = args[0] if args else kwargs["input"]
            rows = current_rows() if name.startswith(UNET_PREFIX) else None
            per_row = rows.per_row(ROW_MULTIPLIERS) if rows is not None else None  # (rows, networks) or None
            total = None
            for delta in deltas:
                mul = per_row[:, delta.network] if per_row is not None else self._muls[delta.network]
                if not (mul.any() if per_row is not None else mul):
                    continue
                down, up = self._tensors_for(x, name, delta)
                part = _low_rank(module, x, down, up)
                part = part * (row_factor(mul, part) * delta.scale if per_row is not None else mul * delta.scale)
                total = part if total is None else total + part
            return None if total is None else output + total

        return hook

    def _tensors_for(self, x: torch.Tensor, name: str, delta: _Delta) -> tuple[torch.Tensor, torch.Tensor]:
        """down/up on x's device and dtype, moved on first use and again only if the model moves."""
        key = (name, delta.network)
        cached = self._on_device.get(key)
        if cached is None or cached[0].device != x.device or cached[0].dtype != x.dtype:
            cached = (delta.down.to(x.device, x.dtype), delta.up.to(x.device, x.dtype))
            self._on_device[key] = cached
        return cached


def _matched(lora: LoraFile, targets: dict[str, torch.nn.Module], strict: bool) -> dict[str, LoraModule]:
    """The file's modules that exist in the models; the rest raise (strict) or are skipped with one warning."""
    missing = [name for name in lora.modules if name not in targets]
    total = len(lora.modules)
    if len(missing) == total:
        raise ModelError(f"LoRA {lora.path} does not fit this model: none of its {total} modules exist "
                         f"(e.g. {missing[0]}); is it for SDXL or another architecture?")
    if missing:
        what = (f"LoRA {lora.path}: {len(missing)} of its {total} modules are not in this model "
                f"({', '.join(missing[:3])})")
        if strict:
            raise ModelError(f"{what}; set network.strict=false to skip them")
        log.warning("%s; skipped <network.strict=false>", what)
    matched = {name: module for name, module in lora.modules.items() if name in targets}
    unet = sum(name.startswith(UNET_PREFIX) for name in matched)
    log.info("LoRA %s: %d UNet and %d text-encoder modules", lora.name, unet, len(matched) - unet)
    return matched


def _fit(lora: LoraFile, name: str, lora_module: LoraModule,
         module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """down/up shaped for ``module`` (a 1×1 update may be stored 2-D or 4-D); ModelError if the sizes differ."""
    down, up = lora_module.down, lora_module.up
    if isinstance(module, torch.nn.Linear):
        down, up = (t.flatten(1) if t.ndim == 4 and t.shape[2:] == (1, 1) else t for t in (down, up))
        ok = down.ndim == up.ndim == 2 and _sizes(down, up) == (module.in_features, module.out_features)
        want, kernel = (module.in_features, module.out_features), ""
    else:
        down, up = (t[:, :, None, None] if t.ndim == 2 else t for t in (down, up))
        kernels_ok = down.ndim == up.ndim == 4 and up.shape[2:] == (1, 1) and (
            down.shape[2:] == module.weight.shape[2:] or (down.shape[2:] == (1, 1) and _centred(module)))
        ok = kernels_ok and module.groups == 1 and _sizes(down, up) == (module.in_channels, module.out_channels)
        want, kernel = (module.in_channels, module.out_channels), f" (kernel {tuple(module.kernel_size)})"
    if not ok or up.shape[1] != down.shape[0]:
        raise ModelError(
            f"LoRA {lora.path}: module {name} is {want[0]}→{want[1]}{kernel} in this model but "
            f"{_sizes(down, up)[0]}→{_sizes(down, up)[1]} (down {tuple(down.shape)}, up {tuple(up.shape)}) "
            "in the file (a LoRA for another model family, e.g. SD2 on SD1?)")
    return down, up


def _sizes(down: torch.Tensor, up: torch.Tensor) -> tuple[int, int]:
    """(in, out) features or channels of a down/up pair."""
    return down.shape[1] if down.ndim > 1 else -1, up.shape[0]


def _centred(module: torch.nn.Conv2d) -> bool:
    """Whether a 1×1 update fits this k×k conv: with "same" padding, a 1×1 conv at the module's stride sees
    exactly the kernel's centre tap, so the hook and the merged centre weight agree."""
    if isinstance(module.padding, str):
        return False
    return all(k % 2 == 1 and p == d * (k - 1) // 2
               for k, p, d in zip(module.kernel_size, module.padding, module.dilation, strict=True))


def _low_rank(module: torch.nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up(down(x)) for a Linear or Conv2d module, before multiplier and scale."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(F.linear(x, down), up)
    if down.shape[2:] == module.weight.shape[2:]:  # LoCon (or 1×1 on 1×1): the module's own conv geometry
        hidden = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
    else:  # 1×1 on a "same"-padded k×k conv (_centred): the centre tap, on the module's output grid
        hidden = F.conv2d(x, down, stride=module.stride)
    return F.conv2d(hidden, up)


def _merged_delta(module: torch.nn.Module, deltas: list[_Delta], muls: tuple[float, ...]) -> torch.Tensor | None:
    """Σ mul·scale·ΔW in fp32 on the weight's device, shaped like the weight; None when every multiplier is 0."""
    total = None
    device = module.weight.device
    for delta in deltas:
        mul = muls[delta.network]
        if mul == 0:
            continue
        part = _weight_delta(module, delta.down.to(device), delta.up.to(device)) * (mul * delta.scale)
        total = part if total is None else total + part
    return total


def _weight_delta(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW = up·down as one weight of the module's shape (gen_img_inventory.md §8.2)."""
    if isinstance(module, torch.nn.Linear):
        return up @ down  # (out, in)
    if down.shape[2:] != (1, 1):  # LoCon k×k: compose the k×k down with the 1×1 up
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # (out, in, k, k)
    delta = up.flatten(1) @ down.flatten(1)  # (out, in)
    if module.weight.shape[2:] == (1, 1):
        return delta[:, :, None, None]
    full = delta.new_zeros(module.weight.shape)  # 1×1 on k×k: the centre tap (see _centred)
    full[:, :, module.kernel_size[0] // 2, module.kernel_size[1] // 2] = delta
    return full

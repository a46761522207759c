"""kohya ControlNet-LLLite files: read, checked against the SDXL UNet, built into small torch modules.

kohya's LLLite (networks/control_net_lllite.py) is not in diffusers. A file holds, per patched UNet Linear
(``lllite_unet_<SGM name>``, e.g. ``lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), a
conditioning embedding ``conditioning1`` (stride = kernel convolutions with ReLUs between: the cond image down to
the module's resolution) and an MLP ``down`` (Linear+ReLU), ``mid`` (Linear+ReLU on [cond, down(x)]), ``up``
(Linear). Every shape is read from the file (kohya's generator reads the MLP width from ``down.0.weight`` and the
embedding width from ``conditioning1.0``), so any trained width and depth loads. Files are read once per
(file, mtime, size).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdbatch.engine.models.checkpoint import file_sha256_short, read_state_dict
from sdbatch.engine.models.sdxl_names import kohya_unet_names
from sdbatch.errors import ModelError

PREFIX = "lllite_unet_"
_PARTS = ("conditioning1", "down", "mid", "up")
_CACHE_SIZE = 4


class LLLiteModule(torch.nn.Module):
    """One patched Linear's LLLite: kohya's LLLiteModule for a Linear target, at inference."""

    def __init__(self, convs: list[torch.Tensor], in_dim: int, mlp_dim: int, cond_dim: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for weight in convs:  # kernel = stride, no padding: each conv shrinks by its kernel size
            out_ch, in_ch, kernel = weight.shape[0], weight.shape[1], weight.shape[-1]
            layers += [torch.nn.Conv2d(in_ch, out_ch, kernel, stride=kernel), torch.nn.ReLU()]
        self.conditioning1 = torch.nn.Sequential(*layers[:-1])
        self.down = torch.nn.Sequential(torch.nn.Linear(in_dim, mlp_dim), torch.nn.ReLU())
        self.mid = torch.nn.Sequential(torch.nn.Linear(mlp_dim + cond_dim, mlp_dim), torch.nn.ReLU())
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp_dim, in_dim))

    def embed(self, cond_image: torch.Tensor) -> torch.Tensor:
        """(images, C, h, w) conditioning map of cond images in [-1, 1] (images, 3, H, W)."""
        return self.conditioning1(cond_image)

    def delta(self, x: torch.Tensor, cond_tokens: torch.Tensor) -> torch.Tensor:
        """What kohya adds to the Linear's input: up(mid([cond, down(x)])) (the multiplier is the caller's)."""
        return self.up(self.mid(torch.cat([cond_tokens, self.down(x)], dim=2)))


@dataclass(frozen=True, slots=True, eq=False)
class LLLiteFile:
    """A loaded LLLite file: its modules by kohya name (fp32, CPU)."""

    name: str
    path: str
    hash: str  # 10 hex digits of the file's sha256, as ControlNet files are named in the records
    mlp_dim: int
    cond_dim: int
    modules: dict[str, LLLiteModule] = field(repr=False)


_cache: OrderedDict[tuple[str, int, int], LLLiteFile] = OrderedDict()


def load_lllite(path: str | Path, key: str) -> LLLiteFile:
    """The LLLite file at `path` (cached); ModelError naming `key` and the file when it is not one."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ModelError(f"{key}: LLLite file {path} not found; give a ControlNet-LLLite .safetensors file")
    stat = resolved.stat()
    cache_key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _cache:
        _cache[cache_key] = _read(resolved, key)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    _cache.move_to_end(cache_key)
    return _cache[cache_key]


def _read(path: Path, key: str) -> LLLiteFile:
    state = read_state_dict(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, _, part = name.partition(".")
        if module.startswith(PREFIX) and part.split(".")[0] in _PARTS:
            groups.setdefault(module, {})[part] = tensor.float()
    if not groups:
        controlnet = any("controlnet" in k or k.startswith("input_hint_block") for k in state)
        what = "a ControlNet, not" if controlnet else "not"
        raise ModelError(f"{key}: {path} is {what} a ControlNet-LLLite file (no {PREFIX}... modules); guidance=lllite "
                         "takes kohya LLLite files and cannot be combined with ControlNet")
    modules = {name: _module(path, key, name, parts) for name, parts in sorted(groups.items())}
    first = next(iter(groups.values()))
    return LLLiteFile(path.stem, str(path), file_sha256_short(path), first["down.0.weight"].shape[0],
                      first["conditioning1.0.weight"].shape[0] * 2, modules)


def _module(path: Path, key: str, name: str, parts: dict[str, torch.Tensor]) -> LLLiteModule:
    convs = [parts[f"conditioning1.{i}.weight"] for i in range(0, 2 * len(parts), 2)
             if f"conditioning1.{i}.weight" in parts]
    try:
        down, mid = parts["down.0.weight"], parts["mid.0.weight"]
        module = LLLiteModule(convs, down.shape[1], down.shape[0], mid.shape[1] - down.shape[0])
        module.load_state_dict(parts, strict=True)
    except (KeyError, RuntimeError, IndexError) as ex:
        raise ModelError(f"{key}: LLLite file {path} has a broken module {name} ({type(ex).__name__}: "
                         f"{str(ex).splitlines()[0]})") from None
    return module.eval().requires_grad_(False)


def targets(lllite: LLLiteFile, unet: torch.nn.Module, key: str) -> dict[str, torch.nn.Linear]:
    """The UNet's Linear for each of the file's modules; ModelError when one is missing or of another width."""
    names = kohya_unet_names(unet, PREFIX)
    found = {}
    for name, module in lllite.modules.items():
        target = names.get(name)
        width = module.down[0].in_features
        if not isinstance(target, torch.nn.Linear) or target.in_features != width:
            have = "no such module" if target is None else f"{getattr(target, 'in_features', '?')} inputs, not {width}"
            raise ModelError(f"{key}: LLLite file {lllite.path} is for another layout: {name} ({have} in this UNet)")
        found[name] = target
    return found

"""LoRA-family weight updates of one module: which file keys make which update, whether it fits the module, its
weight change ΔW and its hooked output (kohya LoRA/LoCon, also with LyCORIS's CP core ``lora_mid``; LyCORIS LoHa
and LoKr; DoRA's weight decomposition over any of them).

The formulas are written here from the algorithms and checked against LyCORIS, which trains these files
(KohakuBlueleaf/LyCORIS @ f49d30d: lycoris/modules/{locon,loha,lokr}.py, lycoris/functional/{loha,lokr,general}.py),
and ComfyUI's readers (comfy/weight_adapter/{lora,loha,lokr,base}.py); no code is copied. ``⊙`` is the elementwise
product, ``tucker(t, a, b)[o, i, ...] = Σ_pq t[p, q, ...] a[p, o] b[q, i]``:

- LoRA/LoCon: ΔW = alpha/rank · up @ down, rank = down.shape[0]; with ``lora_mid`` (CP): ΔW = alpha/rank ·
  tucker(mid, upᵀ, down) for a k×k conv (down and up 1×1, mid k×k).
- LoHa: ΔW = alpha/rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), rank = w1_b.shape[0]; with ``hada_t1/t2`` (Tucker, k×k
  convs) each factor is tucker(t, w_a, w_b).
- LoKr: ΔW = scale · kron(w1, w2) reshaped to the weight; w1 = w1_a @ w1_b when stored decomposed, w2 = w2_a @ w2_b
  or tucker(t2, w2_a, w2_b); scale = alpha/rank (rank = w2_b.shape[0], else w1_b.shape[0]) when a factor is
  decomposed and the file has alpha, else 1 (LyCORIS forces scale 1 for two full factors).
- A missing alpha, or alpha 0, means alpha = rank (scale 1), as kohya and LyCORIS read it.
- DoRA (``dora_scale``; PEFT's ``lora_magnitude_vector``): W' = dora_scale · (W + ΔW) / ‖W + ΔW‖, the norm per
  output channel (LyCORIS's default ``wd_on_out``, dora_scale (out, 1, ...), and PEFT) or per input channel
  (LyCORIS ``wd_on_out=False``, dora_scale (1, in, ...)); alpha/rank is inside ΔW (LyCORIS, ComfyUI). A multiplier m
  gives W + m·(W' − W), ComfyUI's and A1111's rule: linear in m, so m = 0 is the plain model and hooked rows with
  different multipliers are exact. (LyCORIS's own forward scales W + ΔW by 1 + m·(dora_scale/‖W + ΔW‖ − 1),
  which keeps ΔW at m = 0; PEFT puts m inside the norm.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from sdbatch.errors import ModelError

# key suffix (after the kohya module name) → the algorithm it belongs to, which sdbatch cannot apply yet
_REFUSED = {
    "oft_blocks": "LyCORIS OFT/BOFT", "oft_diag": "kohya OFT", "rescale": "LyCORIS OFT/BOFT",
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "LyCORIS GLoRA"),
    "on_input": "LyCORIS (IA)³", "weight": "LyCORIS (IA)³",
    "diff": "LyCORIS full (diff)", "diff_b": "LyCORIS full (diff)",
    "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
    "lokr_t1": "LyCORIS LoKr with a Tucker w1 (lokr_t1)",
}
SUPPORTED = "LoRA, LoCon, LoHa, LoKr and DoRA"
# every key suffix a kohya-named module may have here: the supported ones, then the refused ones
KNOWN_SUFFIXES = frozenset({
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "lora_magnitude_vector",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", *_REFUSED,
})


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_pq core[p, q, ...] a[p, o] b[q, i] → (o, i, ...): a Tucker/CP core rebuilt into a weight."""
    return torch.einsum("pq...,po,qi->oi...", core, a, b)


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if not alpha else alpha / rank  # no alpha or alpha 0: alpha = rank


@dataclass(frozen=True, slots=True, eq=False)
class LoraModule:
    """LoRA/LoCon, fp32 on the CPU. eq=False: tensors have no boolean equality."""

    algorithm: ClassVar[str] = "LoRA"
    down: torch.Tensor  # (rank, in) Linear, (rank, in, k, k) Conv2d; with mid (rank, in, 1, 1)
    up: torch.Tensor  # (out, rank) Linear, or (out, rank, 1, 1) Conv2d
    alpha: float  # scale = alpha / rank
    mid: torch.Tensor | None = None  # CP core (rank, rank, k, k) of a k×k conv (LyCORIS use_tucker)
    dora_scale: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.down.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class LohaModule:
    """LyCORIS LoHa: two low-rank factors multiplied elementwise, fp32 on the CPU."""

    algorithm: ClassVar[str] = "LoHa"
    w1_a: torch.Tensor  # (out, rank); Tucker: (rank, out)
    w1_b: torch.Tensor  # (rank, in·k·k); Tucker: (rank, in)
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None
    t1: torch.Tensor | None = None  # Tucker cores (rank, rank, k, k)
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        """alpha/rank · ΔW: (out, in·k·k), or (out, in, k, k) for Tucker."""
        if self.t1 is None:
            product = (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)
        else:
            product = tucker(self.t1, self.w1_a, self.w1_b) * tucker(self.t2, self.w2_a, self.w2_b)
        return product * _scale(self.alpha, self.w1_b.shape[0])


@dataclass(frozen=True, slots=True, eq=False)
class LokrModule:
    """LyCORIS LoKr: a Kronecker product of two factors, each stored whole or decomposed, fp32 on the CPU."""

    algorithm: ClassVar[str] = "LoKr"
    w1: torch.Tensor | None  # (a, c), or w1_a (a, rank) @ w1_b (rank, c)
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None  # (b, d) or (b, d, k, k), or w2_a (b, rank) @ w2_b (rank, d·k·k), or Tucker
    w2_a: torch.Tensor | None  # Tucker: (rank, b)
    w2_b: torch.Tensor | None  # Tucker: (rank, d)
    alpha: float | None
    t2: torch.Tensor | None = None  # Tucker core (rank, rank, k, k)
    dora_scale: torch.Tensor | None = None

    def delta(self) -> torch.Tensor:
        """scale · kron(w1, w2): (a·b, c·d·k·k), or (a·b, c·d, k, k) when w2 has kernel dimensions."""
        w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b
        if self.w2 is not None:
            w2 = self.w2
        elif self.t2 is not None:
            w2 = tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a @ self.w2_b
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        rank = self.w2_b.shape[0] if self.w2 is None else self.w1_b.shape[0] if self.w1 is None else None
        kron = torch.kron(w1, w2.contiguous())  # (torch.kron views its inputs: einsum's Tucker output may not allow it)
        return kron * (1.0 if rank is None else _scale(self.alpha, rank))


Update = LoraModule | LohaModule | LokrModule
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # a LoRA's (down, up, mid) shaped for its module


def kind(update: Update) -> str:
    """The update's algorithm as a log names it, e.g. "LoHa" or "LoRA+DoRA"."""
    return update.algorithm + ("+DoRA" if update.dora_scale is not None else "")


# ---------------------------------------------------------------- reading


def update_of(path: str | Path, name: str, parts: dict[str, torch.Tensor]) -> Update:
    """The update a module's tensors make (parts by kohya key suffix: "lora_down.weight", "hada_w1_a", ...)."""
    refused = sorted({_REFUSED[suffix] for suffix in parts if suffix in _REFUSED})
    if refused:
        raise ModelError(f"{path} is a {refused[0]} network (module {name}); {refused[0]} networks are not "
                         f"supported ({SUPPORTED} are)")
    t = {suffix: tensor.to("cpu", torch.float32).contiguous() for suffix, tensor in parts.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    dora = t.get("dora_scale")
    if "lora_magnitude_vector" in t:  # PEFT's DoRA magnitude: per output channel, (out,) or (1, out, 1, 1)
        dora = t["lora_magnitude_vector"].reshape(-1, 1)
    if any(suffix.startswith("hada_") for suffix in t):
        _need(path, name, t, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
        if ("hada_t1" in t) != ("hada_t2" in t):
            raise ModelError(f"{path}: module {name} has only one of hada_t1/hada_t2; the file is incomplete, "
                             "export it again")
        return LohaModule(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha,
                          t.get("hada_t1"), t.get("hada_t2"), dora)
    if any(suffix.startswith("lokr_") for suffix in t):
        for factor in ("lokr_w1", "lokr_w2"):
            if factor not in t:
                _need(path, name, t, (f"{factor}_a", f"{factor}_b"), "LoKr")
        return LokrModule(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                          t.get("lokr_w2_a"), t.get("lokr_w2_b"), alpha, t.get("lokr_t2"), dora)
    if "lora_down.weight" not in t or "lora_up.weight" not in t:
        missing = "up (lora_up / lora_B)" if "lora_up.weight" not in t else "down (lora_down / lora_A)"
        raise ModelError(f"{path}: module {name} has no {missing} weight; the file is incomplete, export it again")
    down = t["lora_down.weight"]
    return LoraModule(down, t["lora_up.weight"], alpha or float(down.shape[0]), t.get("lora_mid.weight"), dora)


def _need(path: str | Path, name: str, parts: dict[str, torch.Tensor], keys: tuple[str, ...], algorithm: str) -> None:
    missing = [key for key in keys if key not in parts]
    if missing:
        raise ModelError(f"{path}: module {name} is {algorithm} but has no {', '.join(missing)}; the file is "
                         "incomplete, export it again")


# ---------------------------------------------------------------- fitting a module


def fit(path: str, name: str, update: Update, module: torch.nn.Module) -> Factors | None:
    """A LoRA's (down, up, mid) shaped for ``module``, None for other updates; ModelError if the sizes differ."""
    if isinstance(update, LoraModule):
        factors = _fit_low_rank(path, name, update, module)
    else:
        shape = _dense_shape(path, name, update)
        if not _fits_dense(shape, module.weight.shape):
            raise ModelError(f"LoRA {path}: module {name} is {tuple(module.weight.shape)} in this model but "
                             f"its {update.algorithm} update is {tuple(shape)} in the file (a LoRA for another "
                             "model family, e.g. SD2 on SD1?)")
        factors = None
    if update.dora_scale is not None and _dora_axis(update.dora_scale, module.weight.shape) is None:
        raise ModelError(f"LoRA {path}: module {name}: its DoRA magnitudes {tuple(update.dora_scale.shape)} "
                         f"fit neither the output nor the input channels of its weight {tuple(module.weight.shape)}")
    return factors


def _fit_low_rank(path: str, name: str, update: LoraModule, module: torch.nn.Module) -> Factors:
    """down/up(/mid) shaped for ``module`` (a 1×1 update may be stored 2-D or 4-D); ModelError if sizes differ."""
    down, up, mid = update.down, update.up, update.mid
    if isinstance(module, torch.nn.Linear):
        down, up = (t.flatten(1) if t.ndim == 4 and t.shape[2:] == (1, 1) else t for t in (down, up))
        ok = mid is None and down.ndim == up.ndim == 2 and _sizes(down, up) == (module.in_features,
                                                                                 module.out_features)
        want, kernel = (module.in_features, module.out_features), ""
    else:
        down, up = (t[:, :, None, None] if t.ndim == 2 else t for t in (down, up))
        if mid is None:
            kernels_ok = down.ndim == up.ndim == 4 and up.shape[2:] == (1, 1) and (
                down.shape[2:] == module.weight.shape[2:] or (down.shape[2:] == (1, 1) and _centred(module)))
        else:  # CP: 1×1 down and up around a k×k core
            kernels_ok = (down.ndim == up.ndim == mid.ndim == 4 and down.shape[2:] == up.shape[2:] == (1, 1)
                          and mid.shape[2:] == module.weight.shape[2:] and mid.shape[:2] == (up.shape[1],
                                                                                             down.shape[0]))
        ok = kernels_ok and module.groups == 1 and _sizes(down, up) == (module.in_channels, module.out_channels)
        want, kernel = (module.in_channels, module.out_channels), f" (kernel {tuple(module.kernel_size)})"
    if not ok or up.shape[1] != down.shape[0]:
        raise ModelError(
            f"LoRA {path}: module {name} is {want[0]}→{want[1]}{kernel} in this model but "
            f"{_sizes(down, up)[0]}→{_sizes(down, up)[1]} (down {tuple(down.shape)}, up {tuple(up.shape)}"
            f"{'' if mid is None else f', mid {tuple(mid.shape)}'}) in the file (a LoRA for another model "
            "family, e.g. SD2 on SD1?)")
    return down, up, mid


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


def _dense_shape(path: str, name: str, update: LohaModule | LokrModule) -> torch.Size:
    """The shape `delta()` gives, computed on the meta device (no memory); ModelError if the factors disagree."""
    try:
        return _moved(update, "meta").delta().shape
    except RuntimeError as ex:
        raise ModelError(f"{path}: module {name}: the {update.algorithm} factors do not fit together "
                         f"({str(ex).splitlines()[0]}); the file is damaged, export it again") from None


def _fits_dense(shape: torch.Size, weight_shape: torch.Size) -> bool:
    """Whether a LoHa/LoKr ΔW of `shape` is the weight's: same output channels and size, and same input channels
    when it has kernel dimensions ((out, in·k·k) reshapes to (out, in, k, k))."""
    return (shape[0] == weight_shape[0] and math.prod(shape) == math.prod(weight_shape)
            and (len(shape) <= 2 or shape[1] == weight_shape[1]))


def _dora_axis(dora_scale: torch.Tensor, weight_shape: torch.Size) -> int | None:
    """The axis DoRA's magnitudes run along: 0 (per output channel), 1 (per input channel); None if they fit
    neither."""
    if dora_scale.shape[0] == weight_shape[0] and dora_scale.numel() == weight_shape[0]:
        return 0
    if dora_scale.dim() > 1 and dora_scale.shape[0] == 1 and dora_scale.numel() == weight_shape[1]:
        return 1
    return None


# ---------------------------------------------------------------- weight changes (merges; hooks of non-LoRA updates)


def weight_change(module: torch.nn.Module, update: Update, factors: Factors | None, device: torch.device,
                  mul: float = 1.0) -> torch.Tensor:
    """mul · an update's change of the module's weight, fp32 on `device`: alpha/rank·ΔW, or DoRA's W' − W (from
    the module's weight: call it while the weight is the original)."""
    if factors is not None:
        down, up, mid = (t if t is None else t.to(device) for t in factors)
        if update.dora_scale is None:
            return lora_weight(module, down, up, mid) * (mul * update.scale)
        change = lora_weight(module, down, up, mid) * update.scale
    else:
        change = _moved(update, device).delta().reshape(module.weight.shape)
    if update.dora_scale is not None:
        weight = module.weight.detach().to(device, torch.float32)
        change = decomposed(weight, change, update.dora_scale.to(device))
    return change if mul == 1.0 else change * mul


def lora_weight(module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor,
                mid: torch.Tensor | None = None) -> torch.Tensor:
    """up·(mid)·down as one weight of the module's shape, before alpha/rank (gen_img_inventory.md §8.2)."""
    if isinstance(module, torch.nn.Linear):
        return up @ down  # (out, in)
    if mid is not None:  # CP: 1×1 down, k×k core, 1×1 up
        return tucker(mid, up.flatten(1).T, down.flatten(1))  # (out, in, k, k)
    if down.shape[2:] != (1, 1):  # LoCon k×k: compose the k×k down with the 1×1 up
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # (out, in, k, k)
    delta = up.flatten(1) @ down.flatten(1)  # (out, in)
    if module.weight.shape[2:] == (1, 1):
        return delta[:, :, None, None]
    full = delta.new_zeros(module.weight.shape)  # 1×1 on a "same"-padded k×k conv: the centre tap
    full[:, :, module.kernel_size[0] // 2, module.kernel_size[1] // 2] = delta
    return full


def decomposed(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA at multiplier 1 as a change of the weight: W' − W, W' = dora_scale · (W + ΔW)/‖W + ΔW‖ (fp32)."""
    merged = weight + delta
    axis = _dora_axis(dora_scale, weight.shape)
    rest = [d for d in range(merged.dim()) if d != axis]
    norm = torch.linalg.vector_norm(merged, dim=rest, keepdim=True)  # (out, 1, ...) or (1, in, ...)
    return merged * (dora_scale.reshape(norm.shape) / (norm + torch.finfo(merged.dtype).eps)) - weight


def _moved(update: Update, device: torch.device | str) -> Update:
    """The same update with its tensors on `device` (fp32)."""
    return dataclasses.replace(update, **{f.name: getattr(update, f.name).to(device, torch.float32)
                                          for f in dataclasses.fields(update)
                                          if isinstance(getattr(update, f.name), torch.Tensor)})


# ---------------------------------------------------------------- hooked outputs


def low_rank_output(module: torch.nn.Module, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                    mid: torch.Tensor | None) -> torch.Tensor:
    """up(mid(down(x))) for a Linear or Conv2d module, before multiplier and scale."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(F.linear(x, down), up)
    geometry = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    if mid is not None:  # CP: the core carries the module's geometry
        hidden = F.conv2d(F.conv2d(x, down), mid, **geometry)
    elif down.shape[2:] == module.weight.shape[2:]:  # LoCon (or 1×1 on 1×1): the module's own conv geometry
        hidden = F.conv2d(x, down, **geometry)
    else:  # 1×1 on a "same"-padded k×k conv (_centred): the centre tap, on the module's output grid
        hidden = F.conv2d(x, down, stride=module.stride)
    return F.conv2d(hidden, up)


def weight_output(module: torch.nn.Module, x: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The module's op with a weight change and no bias: what the change adds to the module's output."""
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, change)
    return F.conv2d(x, change, None, module.stride, module.padding, module.dilation, module.groups)

"""Device and precision choice: perf.device and model.precision → torch.device and dtypes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sdbatch.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where and in which precision the models run."""

    device: torch.device
    dtype: torch.dtype  # UNet and text encoder
    vae_dtype: torch.dtype
    precision: str  # fp32 | fp16 | bf16, as actually used


def pick_device(name: str) -> torch.device:
    """perf.device → torch.device; auto = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"perf.device={name} but no CUDA device is available; use perf.device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"perf.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def pick_placement(device_name: str, precision: str, no_half_vae: bool) -> Placement:
    """Resolve device and dtypes; fp16 on a CPU falls back to fp32 with a warning (CPU fp16 kernels are missing)."""
    device = pick_device(device_name)
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        log.warning("fp16 is not supported on the CPU; running in fp32 <model.precision=fp16, perf.device=cpu>")
        precision = "fp32"
    dtype = _DTYPES[precision]
    vae_dtype = torch.float32 if no_half_vae else dtype
    return Placement(device, dtype, vae_dtype, precision)

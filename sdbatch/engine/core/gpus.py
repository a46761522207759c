"""Visible CUDA devices, for the cli's choices that need no model: a multirun job's device, joblib's workers."""

from __future__ import annotations

import torch


def cuda_device_count() -> int:
    """The CUDA devices this process can use; 0 when CUDA is not available."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0

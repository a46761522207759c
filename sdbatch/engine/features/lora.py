"""A run's networks on one model: its files, the mode (hooked | merge | precalc) and each batch's multipliers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdbatch.config.spec import NetworkConfig
from sdbatch.engine.features.lora_network import LoraFile, NetworkPatch, load_lora
from sdbatch.engine.models.tiny_lora import lora_path
from sdbatch.plan.jobs import NetworkRef


class RunNetworks:
    """network.loras patched onto a UNet and text encoder, applied the way network.mode says.

    hooked: every patched layer adds its LoRA output, scaled by the batch's multipliers (--am works);
    merge: the deltas go into the weights once at the run's multipliers (sampling as fast as without LoRA);
    precalc: the deltas go into the weights again whenever a batch's multipliers differ from the last.
    """

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, network: NetworkConfig) -> None:
        self.files: list[LoraFile] = [load_lora(lora_path(lora.path)) for lora in network.loras]
        self.mode = network.mode
        self.defaults = network.multipliers()
        self._patch = NetworkPatch(unet, text_encoder, self.files, strict=network.strict)
        self._in_weights: tuple[float, ...] | None = None  # multipliers merged into the weights now
        if self.mode == "hooked":
            self._patch.hook()
        elif self.mode == "merge":
            self._merge(self.defaults)

    @property
    def refs(self) -> tuple[NetworkRef, ...]:
        return tuple(NetworkRef(f.name, f.path, f.hash, merged=self.mode == "merge") for f in self.files)

    def muls_of(self, muls: Sequence[float] | None) -> tuple[float, ...]:
        """An image's effective multipliers (its own, or the run's; merge mode has only the run's)."""
        return self.defaults if muls is None or self.mode == "merge" else tuple(muls)

    def apply(self, muls: Sequence[float] | None) -> tuple:
        """Set up the batch's multipliers; returns what the text-encoder cache key needs to know of them."""
        muls = self.muls_of(muls)
        if self.mode == "hooked":
            self._patch.set_multipliers(muls)
        elif muls != self._in_weights:  # precalc
            self._merge(muls)
        if not self._patch.touches_text_encoder:
            return ()
        return tuple(f.hash for f in self.files), muls

    def apply_per_image(self, rows: Sequence[Sequence[float] | None]) -> None:
        """Hooked mode: every image of the batch gets its own multipliers in the UNet (after apply())."""
        if self.mode != "hooked":
            raise ValueError(f"per-image multipliers need network.mode=hooked, not {self.mode}")
        self._patch.set_image_multipliers([self.muls_of(row) for row in rows])

    def close(self) -> None:
        """The models exactly as they were before (hooks removed, original weights back)."""
        self._patch.remove()

    def _merge(self, muls: tuple[float, ...]) -> None:
        self._patch.merge(muls)
        self._in_weights = muls

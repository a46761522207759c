"""LoRA networks as a feature: the run's files patched onto the models (the session's patch), and each batch's
multipliers: the text-encoder ones set before its text is encoded, the UNet ones per image through the row
contract. An image's multiplier for a network is a number (both models) or a (text encoder, UNet) pair."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from sdbatch.config.spec import LoraConfig, NetworkConfig, RunSpec
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Encode, Feature
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.features.lora_network import ROW_MULTIPLIERS, LoraFile, NetworkPatch, load_lora
from sdbatch.engine.models.tiny_lora import lora_path
from sdbatch.plan.jobs import NetworkRef


class RunNetworks:
    """network.loras patched onto a UNet and text encoder, applied the way network.mode says.

    hooked: every patched layer adds its LoRA output, scaled by the batch's multipliers (--am works);
    merge: the deltas go into the weights once at the run's multipliers (sampling as fast as without LoRA);
    precalc: the deltas go into the weights again whenever a batch's multipliers differ from the last.
    """

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, network: NetworkConfig,
                 text_encoder_2: torch.nn.Module | None = None) -> None:
        self.files: list[LoraFile] = [load_lora(lora_path(lora.path)) for lora in network.loras]
        self.mode = network.mode
        self.defaults = network.multipliers()
        self._patch = NetworkPatch(unet, text_encoder, self.files, strict=network.strict, text_encoder_2=text_encoder_2)
        self._in_weights: tuple[float, ...] | None = None  # multipliers merged into the weights now
        self.current: tuple = self.defaults  # the multipliers set by the last apply()
        if self.mode == "hooked":
            self._patch.hook()
        elif self.mode == "merge":
            self._merge(self.defaults)

    @property
    def refs(self) -> tuple[NetworkRef, ...]:
        return tuple(NetworkRef(f.name, f.path, f.hash, merged=self.mode == "merge") for f in self.files)

    def muls_of(self, muls: Sequence[float | tuple[float, float]] | None) -> tuple:
        """An image's effective multipliers (its own, or the run's; merge mode has only the run's)."""
        return self.defaults if muls is None or self.mode == "merge" else tuple(muls)

    def text_key(self, muls: tuple) -> tuple:
        """What the text encoding depends on of these multipliers: the files and their text-encoder multipliers
        (nothing when no network touches the text encoder)."""
        if not self._patch.touches_text_encoder:
            return ()
        return tuple(f.hash for f in self.files), tuple(LoraConfig.split(m)[0] for m in muls)

    def apply(self, muls: Sequence[float | tuple[float, float]] | None) -> tuple:
        """Set up the batch's multipliers; returns what the text-encoder cache key needs to know of them."""
        muls = self.muls_of(muls)
        self.current = muls
        if self.mode == "hooked":
            self._patch.set_multipliers(muls)
        elif muls != self._in_weights:  # precalc
            self._merge(muls)
        return self.text_key(muls)

    def read_rows(self, needed: bool) -> None:
        """Whether this batch's UNet calls need their rows (per-image multipliers, regional networks)."""
        self._patch.reads_rows = needed

    def per_image(self, rows: Sequence[tuple]) -> torch.Tensor:
        """(images, networks) UNet multipliers for the row contract: images of one UNet call with their own
        (hooked)."""
        if self.mode != "hooked":
            raise ValueError(f"per-image multipliers need network.mode=hooked, not {self.mode}")
        return torch.tensor([[LoraConfig.split(m)[1] for m in row] for row in rows], dtype=torch.float32)

    def restore(self) -> None:
        """The models exactly as they were before (hooks removed, original weights back)."""
        self._patch.remove()

    def _merge(self, muls: tuple[float, ...]) -> None:
        self._patch.merge(muls)
        self._in_weights = muls


def _rows_of(conds: dict[tuple, Conditioning], keys: list[tuple]) -> Conditioning:
    """Row i of every text tensor from conds[keys[i]] (all encoded from the same prompts, so shapes agree)."""
    first = next(iter(conds.values()))

    def rows(name: str) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        return torch.stack([getattr(conds[key], name)[i] for i, key in enumerate(keys)])

    texts = ("embeddings", "negative", "uncond", "added", "negative_added", "uncond_added")
    return dataclasses.replace(first, **{name: rows(name) for name in texts})


class Lora(Feature):
    name = "lora"
    order = 60  # its encode wrapper runs outside XTI's: each multiplier set encodes every XTI block

    def patch(self, engine, run: RunSpec) -> RunNetworks | None:
        if not run.network.loras:
            return None
        bundle = engine.bundle  # an SDXL bundle has a second text encoder: SDXL names, both encoders patched
        return RunNetworks(bundle.unet, bundle.text_encoder, run.network, getattr(bundle, "text_encoder_2", None))

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        nets = ctx.patches.get(self.name)
        if nets is None:
            return None
        text = ctx.engine.text

        def encode(inner: Encode) -> Conditioning:
            """The text once per distinct set of text-encoder multipliers (when LoRA touches the text encoder),
            each image's rows from its own; images with other UNet multipliers than the batch's first get theirs
            per row."""
            keys = [nets.muls_of(job.network_muls) for job in ctx.jobs]
            text_keys = [nets.text_key(muls) for muls in keys]
            conds: dict[tuple, Conditioning] = {}
            for muls, text_key in dict.fromkeys(zip(keys, text_keys, strict=True)):
                text.network_key = nets.apply(muls)
                if text_key not in conds:  # one key () when the text encoder has no LoRA: one encoding for all
                    conds[text_key] = inner()
            cond = conds[text_keys[0]] if len(conds) == 1 else _rows_of(conds, text_keys)
            shared = len(set(keys)) == 1
            nets.read_rows(not shared or (ctx.run is not None and ctx.run.network.regional))
            if shared:
                return cond
            rows = cond.rows_for(cond.embeddings).with_image_data(**{ROW_MULTIPLIERS: nets.per_image(keys)})
            return dataclasses.replace(cond, rows=rows)

        return BatchHooks(encode=encode)


FEATURE = Lora()

"""CLIP-Vision conditioning's schema: the clip_vision.* run config, its checks and each image's settings.

The reference's --clip_vision_strength (sdxl_gen_img.py / gen_img.py, SDXL img2img only): the init image's CLIP
image embedding (a CLIPVisionModelWithProjection's image_embeds) × strength replaces the prompt's pooled text
embedding; the negative prompt's pooled embedding is unchanged. The reference downloads a fixed model
(laion/CLIP-ViT-bigG-14-laion2B-39B-b160k); sdbatch reads a local folder (clip_vision.model) and never
downloads. Plain Python: sdbatch.engine.features.clip_vision loads the model and runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdbatch.config.feature_schema import PlannedImage
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec

NAME = "clip_vision"
DOWNLOAD = ("give a local transformers CLIPVisionModelWithProjection folder (config.json and model.safetensors), "
            "e.g. the image encoder of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")


@dataclass(frozen=True, slots=True)
class ClipVisionSettings:
    """An image's CLIP-Vision settings (the same for the whole run: part of the batch key)."""

    model: str  # the CLIPVisionModelWithProjection folder
    strength: float  # the image embedding's multiplier (0: the prompt's pooled embedding is all zeros)

    def record(self, job: PlannedImage) -> dict[str, Any]:
        """The manifest's entry (the engine adds the model's name, resolved folder and hash)."""
        return {"model": self.model, "strength": self.strength}


@dataclass(frozen=True, slots=True)
class ClipVisionConfig:
    """clip_vision.*: SDXL img2img / inpainting conditioned on the init image's CLIP image embedding."""

    LINE: ClassVar[None] = None  # no prompt-line options (the reference has none)

    model: str | None = None  # a CLIPVisionModelWithProjection folder; null = off
    strength: float = 1.0  # image_embeds × strength replaces the prompt's pooled text embedding

    def check(self, spec: RunSpec) -> None:
        """The run-level checks of clip_vision.* (keys named in every message); the model's family and
        projection width are checked when it loads."""
        if isinstance(self.strength, bool) or not isinstance(self.strength, int | float) \
                or not math.isfinite(self.strength):
            raise ConfigError(f"clip_vision.strength must be a finite number, got {self.strength!r}")
        if self.model is None:
            if self.strength != 1.0:
                raise ConfigError("clip_vision.strength is set but clip_vision.model is null; set "
                                  "clip_vision.model=FOLDER to use CLIP-Vision conditioning, or drop the key")
            return
        if not Path(self.model).expanduser().is_dir():
            raise ConfigError(f"clip_vision.model: no such folder {self.model}; {DOWNLOAD}")
        if spec.init_image is None:
            raise ConfigError("clip_vision.model needs init_image: CLIP-Vision conditioning embeds the img2img or "
                              "inpainting init image; set init_image=FILE_OR_FOLDER or drop clip_vision.model")

    def for_image(self, given: None, job: PlannedImage) -> ClipVisionSettings | None:
        """The run's settings for an image with an init image; None when off."""
        if self.model is None or job.init_image is None:
            return None
        return ClipVisionSettings(self.model, float(self.strength))

"""The guided group's schema: guided sampling (guided=clip | clip_image | vgg16), its checks and per-image settings.

Guided sampling steers every step's predicted clean image toward a target (a text's or an image's CLIP embedding,
or an image's VGG16 features). It is its own group, separate from `guidance` (ControlNet), so both run together
(`guidance=controlnet guided=clip`) and each has its own guide image key. Plain Python: loading the guide models and
the UNet-call wrapper are sdbatch.engine.features.guided; config checks, planning and outputs use this module
without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdbatch.config.feature_schema import PlannedImage
from sdbatch.config.sampler_registry import get_sampler
from sdbatch.errors import ConfigError

if TYPE_CHECKING:
    from sdbatch.config.spec import RunSpec

GUIDED_KINDS = ("none", "clip", "clip_image", "vgg16")
# Schedulers whose current noise level the wrapper can read (alphas_cumprod[t], or sigmas[step_index]); KDPM2's
# second-order calls run at an interpolated sigma that the scheduler does not expose per call.
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                        "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
                        "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")
SUPPORTED_SAMPLERS = "ddim, pndm, lms, euler, euler_a, heun, dpmsolver, dpmsolver++, dpmsingle, dpmpp_2m, " \
                     "dpmpp_2m_sde, unipc, deis"
VGG16_LAYERS = 31  # torchvision's vgg16().features has modules 0..30
CLIP_DOWNLOAD = ("download laion/CLIP-ViT-B-32-laion2B-s34B-b79K (config.json, model.safetensors and the tokenizer "
                 "files) into a folder and set guided.clip_model=FOLDER")
VGG16_DOWNLOAD = ("download torchvision's vgg16-397923af.pth (the IMAGENET1K_V1 weights) and set "
                  "guided.vgg16_weights=FILE")


@dataclass(frozen=True, slots=True)
class GuidedSettings:
    """An image's guided-sampling settings (the same for every image of a batch: part of the batch key)."""

    kind: str  # clip | clip_image | vgg16
    model: str  # guided.clip_model or guided.vgg16_weights, as given
    scale: float
    every_n_steps: int = 1
    cutouts: int = 0  # CLIP only: random cutouts per step (0 = the whole image, resized)
    layer: int = 20  # VGG16 only: the features module whose output is compared

    def record(self, job: PlannedImage) -> dict[str, Any]:
        """The image's guided-sampling entry (the outputs add the model file's hash and, at run time, the target
        an image took from the previous batch)."""
        entry: dict[str, Any] = {"kind": self.kind, "model": self.model, "scale": self.scale,
                                 "every_n_steps": self.every_n_steps}
        if self.kind == "vgg16":
            entry["layer"] = self.layer
        else:
            entry["cutouts"] = self.cutouts
        if self.kind == "clip":
            entry["text"] = job.guided_text
        else:
            entry["guide_image"] = job.guided_image
        return entry

    @property
    def infotext(self) -> str:
        """The infotext value, "clip 100" (A1111 has no such key: ours, `Guidance: clip 100`)."""
        return f"{self.kind} {self.scale:g}"


@dataclass(frozen=True, slots=True)
class GuidedConfig:
    """The guided group: none, or CLIP / CLIP-image / VGG16 guided sampling."""

    LINE: ClassVar[None] = None  # no prompt-line options

    kind: str = "none"  # none | clip | clip_image | vgg16 (set by guided=NAME)
    clip_model: str | None = None  # a transformers CLIPModel folder, or one .safetensors file (config.json beside)
    clip_scale: float = 100.0  # clip and clip_image: loss multiplier
    cutouts: int = 0  # clip and clip_image: 0 = the whole image; N = N random cutouts per step
    guide_image: str | None = None  # clip_image and vgg16: a file, or a folder used in turn
    vgg16_weights: str | None = None  # torchvision's vgg16-397923af.pth (a plain state dict)
    vgg16_layer: int = 20  # index into VGG16's features; 20 = the ReLU after conv4_2
    vgg16_scale: float = 100.0
    every_n_steps: int = 1  # guide every Nth step only (faster, weaker)

    def check(self, spec: RunSpec) -> None:
        """The run-level checks of guided.* (keys named in every message)."""
        if self.kind not in GUIDED_KINDS:
            raise ConfigError(f"guided={self.kind!r} is not valid; choose one of: {', '.join(GUIDED_KINDS)}")
        self._check_unused()
        if self.kind == "none":
            return
        for key in ("clip_scale", "vgg16_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"guided.{key} must be a finite number, got {value!r}")
        if self.every_n_steps < 1:
            raise ConfigError(f"guided.every_n_steps must be 1 or more, got {self.every_n_steps}")
        if self.cutouts < 0:
            raise ConfigError(f"guided.cutouts must be 0 (off) or a number of cutouts, got {self.cutouts}")
        check_sampler(spec.sampler.name, "sampler.name")
        if self.kind == "vgg16":
            self._check_vgg16()
        else:
            _check_path(self.clip_model, "guided.clip_model", CLIP_DOWNLOAD)
        if self.guide_image is not None and not Path(self.guide_image).expanduser().exists():
            raise ConfigError(f"guided.guide_image: no such file or folder {self.guide_image}")

    def _check_unused(self) -> None:
        """A key the chosen kind does not read would have no effect: say so instead of ignoring it."""
        for item in fields(self):
            if item.name in _USED[self.kind] or getattr(self, item.name) == item.default:
                continue
            hint = f"add guided={_USER[item.name]} to use it" if self.kind == "none" else "drop it"
            raise ConfigError(f"guided.{item.name} is set but guided={self.kind} does not use it; {hint}")

    def _check_vgg16(self) -> None:
        _check_path(self.vgg16_weights, "guided.vgg16_weights", VGG16_DOWNLOAD)
        if self.guide_image is None:
            raise ConfigError("guided=vgg16 needs guided.guide_image=FILE_OR_FOLDER (the image to steer toward; with "
                              "img2img it may be the init_image itself)")
        if not 0 <= self.vgg16_layer < VGG16_LAYERS:
            raise ConfigError(f"guided.vgg16_layer must be a VGG16 features index from 0 to {VGG16_LAYERS - 1}, got "
                              f"{self.vgg16_layer}")

    def for_image(self, given: None, job: PlannedImage) -> GuidedSettings | None:
        """Every image of a guided run gets the run's settings (its guide image travels per image)."""
        if self.kind == "none":
            return None
        check_sampler(job.sampler, f"{job.origin}: sampler")
        if self.kind == "vgg16":
            return GuidedSettings("vgg16", str(self.vgg16_weights), float(self.vgg16_scale), self.every_n_steps,
                                  layer=self.vgg16_layer)
        return GuidedSettings(self.kind, str(self.clip_model), float(self.clip_scale), self.every_n_steps,
                              cutouts=self.cutouts)


_CLIP_KEYS = ("kind", "clip_model", "clip_scale", "cutouts", "every_n_steps")
_USED = {"none": ("kind",), "clip": _CLIP_KEYS, "clip_image": (*_CLIP_KEYS, "guide_image"),
         "vgg16": ("kind", "vgg16_weights", "vgg16_layer", "vgg16_scale", "guide_image", "every_n_steps")}
_USER = {"clip_model": "clip", "clip_scale": "clip", "cutouts": "clip", "guide_image": "vgg16",
         "vgg16_weights": "vgg16", "vgg16_layer": "vgg16", "vgg16_scale": "vgg16", "every_n_steps": "clip"}


def check_sampler(name: str, key: str) -> None:
    """A sampler guided sampling cannot follow is one line naming the ones it can."""
    if get_sampler(name).scheduler not in SUPPORTED_SCHEDULERS:
        raise ConfigError(f"{key}={name} does not work with guided sampling (its second-order calls hide their noise "
                          f"level); use one of: {SUPPORTED_SAMPLERS}")


def _check_path(path: str | None, key: str, download: str) -> None:
    if path is None:
        raise ConfigError(f"{key} is not set; {download}")
    if not Path(path).expanduser().exists():
        raise ConfigError(f"{key}: no such file or folder {path}; {download}")

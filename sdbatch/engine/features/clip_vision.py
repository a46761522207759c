"""CLIP-Vision conditioning (clip_vision.model, SDXL img2img and inpainting): the init image's CLIP image
embedding × clip_vision.strength replaces the prompt's pooled text embedding.

As the reference (sdxl_gen_img.py's pipeline): every image of the batch embeds its own init image, resized to the
image's size (as the reference resizes init images before the pipeline), through CLIPImageProcessor; the product
replaces the pooled part of the prompt rows' added conditioning only. The negative prompt's pooled embedding and
the real unconditional of sampler.negative_scale keep their text embeddings; the size values are untouched.
Strength 0 gives the prompt rows an all-zero pooled embedding (the reference multiplies too; it does not switch
the feature off). The model loads once per process (sdbatch.engine.models.clip_vision); its family and
projection width are checked when the session opens, before any image is made.
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from sdbatch.config.clip_vision_schema import NAME, ClipVisionSettings
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Encode, Feature
from sdbatch.engine.core.model_fn import SIZE_VALUES, Conditioning
from sdbatch.engine.features.img2img import open_image
from sdbatch.engine.models.clip_vision import ClipVisionModel, load_clip_vision
from sdbatch.errors import ModelError
from sdbatch.plan.jobs import ImageJob

KEY = f"{NAME}.model"


class ClipVisionPatch:
    """The session's image encoder (nothing on the base models changes: restore() has nothing to undo)."""

    def __init__(self, model: ClipVisionModel) -> None:
        self.model = model
        self._embeds: dict[tuple[str, int, int], torch.Tensor] = {}  # Highres. fix's passes reuse them

    def embeds(self, jobs: tuple[ImageJob, ...]) -> torch.Tensor:
        """(images, width) image_embeds of each job's init image at the job's size."""
        missing = [job for job in jobs if _image_key(job) not in self._embeds]
        if missing:
            images = [_init_image(job) for job in missing]
            for job, row in zip(missing, self.model.embed(images), strict=True):
                self._embeds[_image_key(job)] = row
        return torch.stack([self._embeds[_image_key(job)] for job in jobs])

    @property
    def model_files(self) -> dict[str, str]:
        """The run's config.yaml lists the folder with its hash among the models in use."""
        return {self.model.folder: self.model.hash}

    def restore(self) -> None:
        self._embeds.clear()


def _image_key(job: ImageJob) -> tuple[str, int, int]:
    return (str(job.init_image), job.width, job.height)


def _init_image(job: ImageJob) -> Image.Image:
    image = open_image(str(job.init_image), "RGB", "init_image")
    return image if image.size == (job.width, job.height) else image.resize((job.width, job.height),
                                                                            Image.Resampling.LANCZOS)


def with_image_pool(cond: Conditioning, pooled: torch.Tensor) -> Conditioning:
    """`cond` with the prompt rows' pooled embedding replaced by `pooled` (B, P); the size values are kept."""
    if cond.added is None:
        raise ModelError(f"{KEY}: CLIP-Vision conditioning needs SDXL's pooled text embedding, which this model "
                         "has none of; use an SDXL model or drop clip_vision.model")
    added = cond.added
    replaced = torch.cat([pooled.to(added.device, added.dtype), added[:, -SIZE_VALUES:]], dim=1)
    return dataclasses.replace(cond, added=replaced)


class ClipVision(Feature):
    name = NAME
    order = 70  # encode: outside LoRA's (60), so the prompt rows it assembles get the image embedding last

    def patch(self, engine, run: RunSpec) -> ClipVisionPatch | None:
        if run.clip_vision.model is None:
            return None
        text_2 = getattr(engine.bundle, "text_encoder_2", None)
        if text_2 is None:
            raise ModelError(f"{KEY}: CLIP-Vision conditioning replaces SDXL's pooled text embedding and this "
                             "SD1/SD2 model has none; use an SDXL model or drop clip_vision.model")
        model = load_clip_vision(run.clip_vision.model, engine.placement.device, KEY)
        pooled = int(text_2.config.projection_dim)
        if model.width != pooled:
            raise ModelError(f"{KEY}: {model.folder} projects images to {model.width} values but this SDXL "
                             f"model's pooled text embedding has {pooled}; use a CLIP-Vision model with "
                             f"projection_dim {pooled} (OpenCLIP ViT-bigG's image encoder for real SDXL models)")
        return ClipVisionPatch(model)

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings = ctx.key.features.get(NAME)
        patch = ctx.patches.get(self.name)
        if not isinstance(settings, ClipVisionSettings) or not isinstance(patch, ClipVisionPatch):
            return None
        pooled = patch.embeds(ctx.jobs) * settings.strength
        model = patch.model
        for job in ctx.jobs:
            ctx.engine.records.setdefault(job.file_name, {})[NAME] = {"name": model.name, "file": model.folder,
                                                                       "hash": model.hash}

        def encode(inner: Encode) -> Conditioning:
            return with_image_pool(inner(), pooled)

        return BatchHooks(encode=encode)


FEATURE = ClipVision()

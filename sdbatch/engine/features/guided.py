"""Guided sampling (guided=clip | clip_image | vgg16): each step nudges the noise prediction so that the predicted
clean image moves toward a target — a text's or an image's CLIP embedding, or an image's VGG16 features.

The reference (and diffusers' community CLIP-guided pipeline) re-ran the UNet with gradients and knew only DDIM,
PNDM and LMS. Here the wrapper sits outside CFG, takes the guided prediction ε of the image rows as a constant, and
works in the variance-preserving form every scheduler feeds its model: x_in = √ᾱ·x0 + √(1−ᾱ)·ε (the Euler family's
x/√(σ²+1) is that form with ᾱ = 1/(1+σ²)). So x0 = (x_in − √(1−ᾱ)·ε)/√ᾱ, decoded by the VAE under
`torch.enable_grad()`, scored by the guide model, and ε ← ε + √(1−ᾱ)·∇ₓloss — the reference's DDIM rule
(ε − √β_t·g with g = −∇), and for LMS the same step as its x − σ·ε form. ᾱ is the call's own noise level: the
scheduler's sigmas[step_index] where it has sigmas (Karras and fractional timesteps included), else
alphas_cumprod[t]. Gradients flow through the VAE decoder and the guide model only; no weight requires grad.

The loss is summed over images (not averaged, as the reference's batch of one did), so an image's guidance does
not depend on its batch. guided=clip_image without a guide image steers toward the first image of the previous
batch, as the reference did; the first batch then has no target, and images record which file they followed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from sdbatch.config.guidance_schema import Preprocess
from sdbatch.config.guided_schema import GuidedSettings
from sdbatch.config.spec import RunSpec
from sdbatch.engine.core.contract import BatchContext, BatchHooks, Decoded, Feature, PassWrapper, RunPass
from sdbatch.engine.core.model_fn import Conditioning, ModelFn
from sdbatch.engine.guide.guided_models import (
    GuideModel,
    clip_image_embeddings,
    clip_text_embedding,
    load_guide_model,
    vgg16_layer_features,
)
from sdbatch.engine.guide.hints import hint_image, hint_tensor
from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.plan.jobs import GuideModelRef, ImageJob

KEY = "guided.guide_image"
NO_HINT = Preprocess("none", "none")
CUT_POWER = 1.0  # the community pipeline's MakeCutouts(cut_power=1.0)


@dataclass
class GuidedRun:
    """The run's guide model and what clip_image carries between batches (a session patch that changes no module;
    restore puts the models' requires_grad flags back)."""

    model: GuideModel
    flags: list[tuple[torch.nn.Parameter, bool]] = field(default_factory=list)
    previous: tuple[str, Image.Image] | None = None  # (file name, image): the last batch's first image

    @property
    def guide_refs(self) -> tuple[GuideModelRef, ...]:
        return (GuideModelRef(self.model.name, self.model.file, self.model.hash),)

    def restore(self) -> None:
        for param, flag in self.flags:
            param.requires_grad_(flag)


# ---------------------------------------------------------------- noise level and the guided step


def alpha_bar(scheduler: Any, t: torch.Tensor) -> float:
    """ᾱ of this model call: 1/(1+σ²) of the scheduler's current sigma, else alphas_cumprod[t] (DDIM, PNDM).

    DPM-Solver and UniPC set their step index in step(), after the model call: the first call sets it as step()
    would (the begin index img2img set, or t's position).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "step_index"):
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        sigma = float(sigmas[scheduler.step_index])
        return 1.0 / (1.0 + sigma * sigma)
    return float(scheduler.alphas_cumprod[int(t.flatten()[0])])


Loss = Callable[[torch.Tensor, int], torch.Tensor]  # (images (B, 3, H, W) in [0, 1], step) → scaled loss


def with_guided(loss: Loss, settings: GuidedSettings, scheduler: Any, vae: torch.nn.Module,
                v_prediction: bool) -> Callable[[ModelFn], ModelFn]:
    """The UNet-call wrapper: the inner (CFG-guided) prediction, moved along the guide loss's gradient."""
    every = settings.every_n_steps

    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            pred = inner(x, t, cond)
            if settings.scale == 0 or cond.step % every:
                return pred
            abar = alpha_bar(scheduler, t)
            a, s = abar**0.5, (1.0 - abar) ** 0.5
            eps = a * pred.float() + s * x.float() if v_prediction else pred.float()  # v → ε
            eps = eps + s * _gradient(loss, vae, x, eps, a, s, cond.step)
            return ((eps - s * x.float()) / a if v_prediction else eps).to(pred.dtype)

        return model

    return wrap


def _gradient(loss: Loss, vae: torch.nn.Module, x: torch.Tensor, eps: torch.Tensor, a: float, s: float,
              step: int) -> torch.Tensor:
    """∇ₓ loss(decode(x0(x))) with ε held constant: gradients run through the VAE decoder and the guide model."""
    with torch.enable_grad():
        x_in = x.detach().float().requires_grad_(True)
        x0 = (x_in - s * eps.detach()) / a
        decoded = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        (grad,) = torch.autograd.grad(loss(images, step), x_in)
    return grad


# ---------------------------------------------------------------- losses


def clip_loss(model: GuideModel, targets: list[torch.Tensor | None], scale: float, cutouts: int,
              generators: Sequence[torch.Generator]) -> Loss:
    """scale × Σ over images with a target of the spherical distance² of its CLIP embedding to the target's
    (with cutouts: the mean over N random cutouts per image, drawn from the image's own generator)."""
    rows = [i for i, target in enumerate(targets) if target is not None]
    goal = torch.stack([targets[i] for i in rows]) if rows else None

    def loss(images: torch.Tensor, step: int) -> torch.Tensor:
        if goal is None:
            return images.sum() * 0
        picked = images[rows]
        if not cutouts:
            return _spherical(clip_image_embeddings(model, picked), goal).sum() * scale
        cuts = torch.cat([_cutouts(picked[k : k + 1], model.image_size, cutouts, generators[i])
                          for k, i in enumerate(rows)])  # (rows·N, 3, S, S), image by image
        dists = _spherical(clip_image_embeddings(model, cuts), goal.repeat_interleave(cutouts, dim=0))
        return dists.view(len(rows), cutouts).mean(1).sum() * scale

    return loss


def _spherical(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The community pipeline's spherical_dist_loss of unit vectors, per row."""
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def _cutouts(image: torch.Tensor, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """The community pipeline's MakeCutouts for one image: `count` random squares, each pooled to size×size."""
    side_y, side_x = image.shape[-2:]
    largest, smallest = min(side_x, side_y), min(side_x, side_y, size)
    cuts = []
    for _ in range(count):
        edge = int(torch.rand([], generator=generator) ** CUT_POWER * (largest - smallest) + smallest)
        left = int(torch.randint(0, side_x - edge + 1, (), generator=generator))
        top = int(torch.randint(0, side_y - edge + 1, (), generator=generator))
        cuts.append(F.adaptive_avg_pool2d(image[:, :, top : top + edge, left : left + edge], size))
    return torch.cat(cuts)


def vgg16_loss(model: GuideModel, targets: list[torch.Tensor], layer: int, scale: float) -> Loss:
    """scale × Σ over images of the mean squared difference of VGG16 features (at `layer`) to the target's."""
    goal = torch.cat(targets)

    def loss(images: torch.Tensor, step: int) -> torch.Tensor:
        features = vgg16_layer_features(model, images, layer)
        return ((features - goal) ** 2).flatten(1).mean(1).sum() * scale

    return loss


# ---------------------------------------------------------------- targets


def _image_tensor(path: str, width: int, height: int, device: torch.device) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: the guide image at the pass's size (LANCZOS, EXIF-oriented, cached)."""
    return hint_tensor([hint_image(path, NO_HINT, width, height, KEY)], device, torch.float32)


def _clip_targets(model: GuideModel, settings: GuidedSettings, jobs: Sequence[ImageJob], state: GuidedRun,
                  device: torch.device, records: dict[str, dict]) -> list[torch.Tensor | None]:
    if settings.kind == "clip":
        return [clip_text_embedding(model, str(job.guided_text), device) for job in jobs]
    targets: list[torch.Tensor | None] = []
    for job in jobs:
        if job.guided_image is not None:
            image = _image_tensor(job.guided_image, job.width, job.height, device)
        elif state.previous is not None:
            records[job.file_name] = {"guide_image": f"previous batch: {state.previous[0]}"}
            image = hint_tensor([state.previous[1]], device, torch.float32)
        else:
            records[job.file_name] = {"guide_image": "previous batch: none (the first batch is not guided)"}
            targets.append(None)
            continue
        with torch.no_grad():
            targets.append(clip_image_embeddings(model, image)[0])
    return targets


def _vgg16_targets(model: GuideModel, settings: GuidedSettings, jobs: Sequence[ImageJob], width: int, height: int,
                   device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [vgg16_layer_features(model, _image_tensor(str(job.guided_image), width, height, device),
                                     settings.layer) for job in jobs]


# ---------------------------------------------------------------- the feature


class Guided(Feature):
    name = "guided"  # the per-image settings' name (the guided group)
    order = 110  # outside CFG (100): it needs the guided prediction of the image rows

    def patch(self, engine, run: RunSpec) -> GuidedRun | None:
        if run.guided.kind == "none":
            return None
        vgg16 = run.guided.kind == "vgg16"
        path = str(run.guided.vgg16_weights if vgg16 else run.guided.clip_model)
        state = GuidedRun(_load(run.guided.kind, path, engine.placement.device))
        for module in (engine.bundle.unet, engine.bundle.vae, engine.bundle.text_encoder):
            for param in module.parameters():  # inference weights: the guided step needs no gradient of any
                state.flags.append((param, param.requires_grad))
                param.requires_grad_(False)
        return state

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        settings: GuidedSettings | None = ctx.key.features.get(self.name)
        if settings is None or settings.scale == 0:
            return None
        state = ctx.patches.get(self.name) or _state_for(ctx.engine, settings)
        model, device, engine = state.model, ctx.engine.placement.device, ctx.engine
        width, height = ctx.key.width, ctx.key.height
        if settings.kind == "vgg16":
            loss = vgg16_loss(model, _vgg16_targets(model, settings, ctx.jobs, width, height, device),
                              settings.layer, settings.scale)
        else:
            records: dict[str, dict] = {}
            targets = _clip_targets(model, settings, ctx.jobs, state, device, records)
            for name, entry in records.items():
                engine.records.setdefault(name, {})["guided"] = entry
            loss = clip_loss(model, targets, settings.scale, settings.cutouts, ctx.generators)
        return BatchHooks(unet=with_guided(loss, settings, ctx.scheduler, engine.bundle.vae, engine.v_prediction))

    def around_pass(self, engine, key: BatchKey, run: RunSpec | None) -> PassWrapper | None:
        """clip_image without guide images: keep each batch's first image as the next batch's target."""
        settings: GuidedSettings | None = key.features.get(self.name)
        state = engine.session_patch(self.name)
        if settings is None or settings.kind != "clip_image" or state is None:
            return None

        def keep_first(batch: Batch, inner: RunPass) -> Decoded:
            done = inner(batch)
            state.previous = (batch.jobs[0].file_name, done.images[0])
            return done

        return keep_first


def _load(kind: str, path: str, device: torch.device) -> GuideModel:
    """guided.vgg16_weights for vgg16, else guided.clip_model: from the process cache, or loaded."""
    if kind == "vgg16":
        return load_guide_model("vgg16", path, device, "guided.vgg16_weights")
    return load_guide_model("clip", path, device, "guided.clip_model")


def _state_for(engine, settings: GuidedSettings) -> GuidedRun:
    """A batch run outside a session (tests, tools): the guide model from the cache, no previous image."""
    return GuidedRun(_load(settings.kind, settings.model, engine.placement.device))


FEATURE = Guided()

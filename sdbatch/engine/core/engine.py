"""Run one batch of ImageJobs on the loaded models: encode → start → denoise → decode, with every feature's hooks.

The engine wires no feature by hand: it asks each feature (`sdbatch.engine.core.contract.all_features`) for its
hooks and assembles them. A run's changes to the shared models live in one `Session` (`Engine.session`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import reduce

import torch
from PIL import Image

from sdbatch.config.spec import ModelConfig, PerfConfig, RunSpec
from sdbatch.engine.core import noise
from sdbatch.engine.core.conditioning import BatchText
from sdbatch.engine.core.contract import (
    BatchContext,
    BatchHooks,
    Decoded,
    PassWrapper,
    Patch,
    RunPass,
    StageImage,
    Start,
    StartFn,
    all_features,
)
from sdbatch.engine.core.denoise_loop import StepCallback, sample
from sdbatch.engine.core.device import Placement, pick_placement
from sdbatch.engine.core.model_fn import ModelFn, unet_model
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.core.session import Session
from sdbatch.engine.models.loading import ModelBundle, is_cached, load_models, set_attention
from sdbatch.engine.text.embeddings import load_embeddings
from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.engine.vae import decode as vae
from sdbatch.plan.batching import Batch
from sdbatch.plan.jobs import EmbeddingRef, ImageJob, ModelInfo

log = logging.getLogger(__name__)


class Engine:
    """Loaded models plus the per-process caches that belong to them (text encodings)."""

    def __init__(self, bundle: ModelBundle, placement: Placement, model: ModelConfig, perf: PerfConfig) -> None:
        self.bundle = bundle
        self.placement = placement
        self.clip_skip = model.clip_skip
        self.v_prediction = _v_prediction(model.v_parameterization, bundle.family)
        self.vae_batch_size = perf.vae_batch_size
        self.vae_slices = perf.vae_slices
        self.vae_tiling = perf.vae_tiling
        self.text = TextEncoder(bundle.tokenizer, bundle.text_encoder, text_encoder_2=bundle.text_encoder_2)
        self.latent_channels = bundle.vae.config.latent_channels
        self.latent_factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)  # 8 for SD
        self.info = ModelInfo(
            name=bundle.model_name, hash=bundle.model_hash, family=bundle.family,
            v_prediction=self.v_prediction, clip_skip=model.clip_skip, precision=placement.precision,
            vae_name=bundle.vae_name, vae_hash=bundle.vae_hash,
        )
        self._session: Session | None = None
        self.stage_images: list[StageImage] = []  # what the last run_batch made on the way (Highres. fix stage 1)
        # file names of the last run_batch's images (final and on the way) that the VAE decoded again in fp32
        # because the half-precision decode gave NaN/inf; the runner records them ("vae_fallback": "fp32")
        self.vae_fallback: set[str] = set()
        # what features add to an image's record at run time, by file name (guided=clip_image's previous-batch
        # target); the runner merges it into the image's parameters
        self.records: dict[str, dict] = {}

    # ---------------------------------------------------------------- a run

    @contextmanager
    def session(self, run: RunSpec) -> Iterator[Session]:
        """Apply the run's settings and every feature's patch to the models; undo the patches on exit, always."""
        session = Session(self.bundle, run)
        try:
            self._session = session
            self.text.max_multiples = run.max_embeddings_multiples  # both are part of the text cache key
            self.text.normalize = run.emb_normalize_mode
            for feature in all_features():
                patch = feature.patch(self, run)
                if patch is not None:
                    session.add(feature.name, patch)
            self.set_textual_inversion(run.model.textual_inversion, run.model.xti_embeddings)
            self.info = dataclasses.replace(self.info, networks=_refs(session.patches, "refs"),
                                            controlnets=_refs(session.patches, "controlnet_refs"),
                                            guide_models=_refs(session.patches, "guide_refs"),
                                            regional_networks=run.network.regional,
                                            zero_terminal_snr=run.sampler.zero_terminal_snr,
                                            tome_ratio=run.perf.tome_ratio, deepcache=_deepcache(run.perf))
            yield session
        finally:
            self._session = None
            self.text.network_key = ()
            self.info = dataclasses.replace(self.info, networks=(), controlnets=(), guide_models=(),
                                            regional_networks=False, zero_terminal_snr=False, tome_ratio=0.0,
                                            deepcache=None)
            session.close()

    @property
    def cpu_to_spare(self) -> bool:
        """Whether a CPU core is free while a batch denoises: the model runs on a GPU, or torch's threads leave a core
        unused. Only then does writing images in the background (sdbatch.outputs.background_writer) pay: on a CPU
        whose every core runs torch, the writer slowed a 2-core run by 8% (it was 3% faster with one torch thread)."""
        return self.placement.device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)

    @property
    def networks(self) -> Patch | None:
        """The LoRA networks the open session patched onto the models (None outside a run or without LoRA)."""
        return self.session_patch("lora")

    def session_patch(self, name: str) -> Patch | None:
        """The open session's patch of feature `name` (None outside a run or when the feature made none)."""
        return self._session.patches.get(name) if self._session is not None else None

    # ---------------------------------------------------------------- a batch

    def run_batch(self, batch: Batch, on_step: StepCallback | None = None) -> list[Image.Image]:
        """The batch's final images, in the order of batch.jobs; images made on the way are in stage_images."""
        self.stage_images = []
        self.vae_fallback = set()
        self.records = {}
        run = self._session.run if self._session is not None else None
        wrappers = [w for f in all_features() if (w := f.around_pass(self, batch.key, run)) is not None]

        def one_pass(b: Batch, start: StartFn | None = None) -> Decoded:
            latents = self.denoise(b, on_step, start)
            return Decoded(latents, self.decode(latents, b.jobs))

        done = reduce(_around, wrappers, one_pass)(batch)
        self.stage_images = list(done.stages)
        return done.images

    def run_highres(self, batch: Batch, on_step: StepCallback | None = None) -> tuple[list[Image.Image], ...]:
        """(the first-stage images, the final images) of a Highres. fix batch, each in the order of batch.jobs."""
        final = self.run_batch(batch, on_step)
        return [stage.image for stage in self.stage_images], final

    def decode(self, latents: torch.Tensor, jobs: Sequence[ImageJob] = ()) -> list[Image.Image]:
        """Final latents → PIL images (VAE decode, perf.vae_batch_size images per call, sliced or tiled).

        `jobs` are the latents' images: those whose half-precision decode gave NaN/inf and were decoded again in
        fp32 join `vae_fallback` by file name.
        """
        names = [job.file_name for job in jobs] if len(jobs) == latents.shape[0] else None
        redone: list[int] = []
        images = vae.decode(self.bundle.vae, latents, self.vae_batch_size, self.vae_slices, self.vae_tiling, names,
                            redone)
        self.vae_fallback.update(names[i] for i in redone if names is not None)
        return images

    def denoise(self, batch: Batch, on_step: StepCallback | None = None, start: StartFn | None = None) -> torch.Tensor:
        """The batch's final latents: every feature's hooks for this batch, then the sampler run.

        `start(scheduler, generators) → (timesteps, latents)` replaces the start-latent providers (Highres. fix's
        stage 2 starts from the upscaled stage 1); it is called after set_timesteps(key.steps).
        """
        ctx = self._context(batch, start_given=start is not None)
        hooks = [h for f in all_features() if (h := f.batch_hooks(ctx)) is not None]
        cond = _chain([h.encode for h in hooks if h.encode], ctx.text.encode)
        if start is not None:
            begun = Start(*start(ctx.scheduler, ctx.generators))
        else:
            begun = reduce(lambda so_far, step: step(so_far), [h.start for h in hooks if h.start], None)
            if begun is None:
                raise ValueError(f"no feature provides the start latents of a batch with key {batch.key}")
        scheduler = reduce(lambda inner, wrap: wrap(inner), [h.scheduler for h in hooks if h.scheduler], ctx.scheduler)
        return sample(self._model_fn(hooks), scheduler, begun.latents.to(self.placement.dtype), cond,
                      ctx.generators, eta=batch.key.eta, callback=on_step, timesteps=begun.timesteps,
                      after_step=[h.after_step for h in hooks if h.after_step])

    def _context(self, batch: Batch, start_given: bool) -> BatchContext:
        key = batch.key
        session = self._session
        zero_snr = session is not None and session.run.sampler.zero_terminal_snr
        scheduler = make_scheduler(key.sampler, key.schedule, self.v_prediction, zero_snr)
        scheduler.set_timesteps(key.steps, device=self.placement.device)
        return BatchContext(
            engine=self, batch=batch, scheduler=scheduler, generators=noise.generators([j.seed for j in batch.jobs]),
            run=session.run if session else None, patches=dict(session.patches) if session else {},
            text=BatchText(self.text, batch.jobs, key.negative_scale, self.clip_skip, self.placement.device),
            start_given=start_given)

    def _model_fn(self, hooks: list[BatchHooks]) -> ModelFn:
        """The UNet call wrapped by every active feature's wrapper, innermost first."""
        return reduce(lambda inner, wrap: wrap(inner), [h.unet for h in hooks if h.unet], unet_model(self.bundle.unet))

    def start_noise(self, gens: list[torch.Generator], height: int, width: int, sigma: float) -> torch.Tensor:
        """Each image's fp32 CPU noise at latent size, moved, cast and × `sigma` (txt2img's start)."""
        factor = self.latent_factor
        latents = noise.initial_noise(gens, self.latent_channels, height // factor, width // factor)
        return noise.to_device(latents, self.placement.device, self.placement.dtype) * sigma

    # ---------------------------------------------------------------- run-level state

    def set_textual_inversion(self, files: list[str], xti_files: list[str] = ()) -> None:
        """Load the run's embedding files and make exactly them active (model.textual_inversion, xti_embeddings).

        The text encoder and its token ids are shared by every engine on this model, so each run writes its own
        vectors (idempotent for the same files) before it encodes anything.
        """
        embeddings = load_embeddings(files, xti_files)
        self.text.set_embeddings(embeddings)
        refs = [(EmbeddingRef(e.name, e.file, e.hash), e.xti) for e in embeddings]
        self.info = dataclasses.replace(self.info, embeddings=tuple(r for r, is_xti in refs if not is_xti),
                                        xti_embeddings=tuple(r for r, is_xti in refs if is_xti))

    def model_hashes(self) -> dict[str, str]:
        """Short sha256 of every model file in use, by path (the run's config.yaml records them).

        Textual Inversion files are listed with A1111's 12 digits ("TI hashes"), the others with 10.
        """
        hashes = {self.bundle.source: self.bundle.model_hash}
        if self.bundle.vae_name:
            hashes[self.bundle.vae_name] = self.bundle.vae_hash
        hashes.update({e.file: e.hash for e in (*self.info.embeddings, *self.info.xti_embeddings)})
        hashes.update({c.file: c.hash for c in (*self.info.controlnets, *self.info.guide_models)})
        for patch in (self._session.patches.values() if self._session is not None else ()):
            hashes.update(getattr(patch, "model_files", {}))  # other models a feature loaded (CLIP-Vision's)
        return hashes


def _around(inner: RunPass, wrap: PassWrapper) -> RunPass:
    """A pass with a post-decode step around `inner`; the step chooses the starts of the passes it runs."""

    def run_pass(batch: Batch, start: StartFn | None = None) -> Decoded:
        if start is not None:
            raise ValueError("a start can only be given to the innermost pass")
        return wrap(batch, inner)

    return run_pass


def _chain(wrappers: list, innermost: Callable):
    """innermost() wrapped by each wrapper, the first one innermost: wrappers[-1](... wrappers[0](innermost))."""
    call = innermost
    for wrap in wrappers:
        call = (lambda inner, w: lambda: w(inner))(call, wrap)
    return call()


def _refs(patches: dict[str, Patch], kind: str) -> tuple:
    """The run's references of one kind (outputs record them): what the patches say they are, in patch order.
    `refs`: LoRA networks; `controlnet_refs`: ControlNet models; `guide_refs`: guided sampling's model."""
    return tuple(ref for patch in patches.values() for ref in getattr(patch, kind, ()))


def _deepcache(perf: PerfConfig) -> tuple[int, int] | None:
    """The run's DeepCache (interval, branch) for the outputs' record; None when off (interval 1)."""
    cache = perf.deepcache
    return (cache.interval, cache.branch) if cache.interval > 1 else None


def _v_prediction(setting: str, family: str) -> bool:
    if setting != "auto":
        return setting == "true"
    if family == "sd2":
        log.warning("SD2 checkpoint: assuming epsilon prediction (512 base). For 768-v models use model=sd21 "
                    "or model.v_parameterization=true <model.v_parameterization=auto>")
    return False


# Engines of cached models, most recently used last. Each has its own text-encoding cache (up to 256 encodings,
# about 60 MB for SD 1.x), and a multirun that sweeps a key of theirs (model.clip_skip, perf.vae_batch_size,
# ...) makes one per value: unbounded, that grew by an engine per job. A new engine costs no model load.
MAX_ENGINES = 4
_ENGINES: OrderedDict[tuple, Engine] = OrderedDict()
# Every shape bucket (rows per UNet call, latent size, text length) is one compiled graph; dynamo's default limit
# of 8 would send a mixed-size run's later buckets back to eager without a word.
COMPILED_SHAPES = 64


def get_engine(model: ModelConfig, perf: PerfConfig) -> Engine:
    """The engine for these settings; models load once per process and are reused across runs."""
    placement = pick_placement(perf.device, model.precision, model.no_half_vae)
    bundle = load_models(model.checkpoint, vae=model.vae, v2=model.v2, device=placement.device,
                         dtype=placement.dtype, vae_dtype=placement.vae_dtype)
    # Engines that share a bundle share its modules: set the per-run module options every time.
    set_attention(bundle, perf.attention)
    _apply_perf(bundle, perf)
    for stale in [k for k, e in _ENGINES.items() if not is_cached(e.bundle)]:
        del _ENGINES[stale]  # its model left the cache: let its memory go
    key = (id(bundle), model.clip_skip, model.v_parameterization, perf.vae_batch_size, perf.vae_slices,
           perf.vae_tiling)
    if key in _ENGINES:
        _ENGINES.move_to_end(key)
    else:
        while len(_ENGINES) >= MAX_ENGINES:
            _ENGINES.popitem(last=False)
        _ENGINES[key] = Engine(bundle, placement, model, perf)
    return _ENGINES[key]


def _apply_perf(bundle: ModelBundle, perf: PerfConfig) -> None:
    fmt = torch.channels_last if perf.channels_last else torch.contiguous_format
    bundle.unet.to(memory_format=fmt)
    bundle.vae.to(memory_format=fmt)
    set_compiled(bundle.unet, perf.compile)


def set_compiled(unet: torch.nn.Module, on: bool) -> None:
    """perf.compile: the UNet's forward compiled (once per loaded model, kept for later runs), or its own again.

    Static shapes: each shape bucket compiles once on its first batch and is reused, never a dynamic-shape graph.
    """
    compiled = unet.__dict__.get("_sdbatch_compiled")
    if on:
        if compiled is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
            compiled = torch.compile(unet.forward, dynamic=False)
            unet.__dict__["_sdbatch_compiled"] = compiled
        unet.forward = compiled
    elif compiled is not None and unet.__dict__.get("forward") is compiled:
        del unet.forward  # the class's forward again: a later run without perf.compile runs eager

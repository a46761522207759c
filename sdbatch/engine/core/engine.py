"""Run one batch of ImageJobs on the loaded models: encode → noise → denoise → decode."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from sdbatch.plan.batching import Batch, BatchKey
from sdbatch.config.spec import ModelConfig, NetworkConfig, PerfConfig
from sdbatch.engine.core import noise
from sdbatch.engine.features import img2img, inpaint, xti
from sdbatch.engine.vae import decode as vae
from sdbatch.engine.features.deep_shrink import with_deep_shrink
from sdbatch.engine.core.model_fn import Conditioning, ModelFn, unet_model, with_cfg
from sdbatch.engine.core.device import Placement, pick_placement
from sdbatch.engine.text.embeddings import XTI_LAYERS, load_embeddings
from sdbatch.engine.features.gradual_latent import GradualLatentScheduler, start_latents
from sdbatch.engine.models.loading import ModelBundle, is_cached, load_models, set_attention
from sdbatch.engine.features.lora import RunNetworks
from sdbatch.engine.core.denoise_loop import StepCallback, sample
from sdbatch.engine.core.scheduler_factory import make_scheduler
from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import EmbeddingRef, ImageJob, ModelInfo
from sdbatch.prompts.extra_networks import strip_tags

log = logging.getLogger(__name__)

# Wrappers applied around the UNet call, innermost first. Later features (ControlNet, regional
# prompts, Deep Shrink) add theirs here; the sampling loop stays as it is.
ModelWrapper = Callable[[ModelFn], ModelFn]


# id(bundle) → (bundle, the networks patched onto its modules now)
_NETWORKS: dict[int, tuple[ModelBundle, RunNetworks]] = {}


class Engine:
    """Loaded models plus the per-process caches that belong to them (text encodings)."""

    def __init__(self, bundle: ModelBundle, placement: Placement, model: ModelConfig, perf: PerfConfig) -> None:
        self.bundle = bundle
        self.placement = placement
        self.clip_skip = model.clip_skip
        self.v_prediction = _v_prediction(model.v_parameterization, bundle.family)
        self.vae_batch_size = perf.vae_batch_size
        self.vae_slices = perf.vae_slices
        self.text = TextEncoder(bundle.tokenizer, bundle.text_encoder)
        self.wrappers: list[ModelWrapper] = [with_cfg]
        self.networks: RunNetworks | None = None  # this run's network.loras (set_networks)
        self.latent_channels = bundle.vae.config.latent_channels
        self.latent_factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1)  # 8 for SD
        self.info = ModelInfo(
            name=bundle.model_name, hash=bundle.model_hash, family=bundle.family,
            v_prediction=self.v_prediction, clip_skip=model.clip_skip, precision=placement.precision,
            vae_name=bundle.vae_name, vae_hash=bundle.vae_hash,
        )

    def run_batch(self, batch: Batch, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Generate the batch's images, in the order of batch.jobs (Highres. fix: see run_highres)."""
        return self.decode(self.denoise(batch, on_step))

    def run_highres(self, batch: Batch, on_step: StepCallback | None = None) -> tuple[list[Image.Image], ...]:
        """Highres. fix for the batch: (stage-1 images, final images), each in the order of batch.jobs."""
        from sdbatch.engine.features.highres_fix import run_highres

        return run_highres(self, batch, on_step)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Final latents → PIL images (VAE decode, perf.vae_batch_size images per call)."""
        return vae.decode(self.bundle.vae, latents, self.vae_batch_size, self.vae_slices)

    def denoise(self, batch: Batch, on_step: StepCallback | None = None,
                start: Callable[[object, list[torch.Generator]], tuple] | None = None) -> torch.Tensor:
        """The batch's final latents: prompts encoded, start latents prepared, the sampler run.

        `start(scheduler, generators) → (timesteps, latents)` replaces the txt2img/img2img/inpainting start
        (Highres. fix's stage 2); it is called after set_timesteps(key.steps).
        """
        jobs, key = batch.jobs, batch.key
        # 1. Encode prompts (weighted, chunked, cached; with the images' LoRA multipliers); no CFG pass when no
        #    image asks for it
        if self.networks is None:
            cond = self._conditioning(jobs, key.negative_scale)
        else:
            cond = self._network_conditioning(jobs, key.negative_scale)
        # 2. Prepare timesteps and start latents, one generator per image
        scheduler = make_scheduler(key.sampler, key.schedule, self.v_prediction)
        scheduler.set_timesteps(key.steps, device=self.placement.device)
        gens = noise.generators([j.seed for j in jobs])
        if start is not None:
            timesteps, latents = start(scheduler, gens)
            begun = inpaint.InpaintStart(timesteps, latents, None, ())
        else:
            begun = self._start(batch, scheduler, gens)
            if key.gradual_latent is not None:  # txt2img/img2img start: the latents begin small and grow
                scheduler = GradualLatentScheduler(scheduler, key.gradual_latent, tuple(begun.latents.shape[-2:]))
                begun = dataclasses.replace(begun, latents=start_latents(begun.latents, key.gradual_latent))
        cond = dataclasses.replace(cond, inpaint=begun.unet_input, deep_shrink=key.deep_shrink)
        # 3. Denoise
        return sample(self.model_fn(), scheduler, begun.latents.to(self.placement.dtype), cond, gens, eta=key.eta,
                      callback=on_step, timesteps=begun.timesteps, after_step=begun.after_step)

    def _start(self, batch: Batch, scheduler, gens: list[torch.Generator]) -> inpaint.InpaintStart:
        """Timesteps and start latents of txt2img, img2img or inpainting (with its mask conditioning or blend)."""
        jobs, key = batch.jobs, batch.key
        if key.masked:  # inpainting: mask conditioning (9-channel UNet) or the per-step blend (4-channel)
            return inpaint.start(self.bundle.vae, scheduler, self.bundle.in_channels, [j.init_image for j in jobs],
                                 [j.mask_image for j in jobs], gens, key.steps, key.strength, key.width, key.height)
        if self.bundle.in_channels != 4:
            raise ConfigError(f"{self.bundle.model_name} is an inpainting checkpoint ({self.bundle.in_channels}-"
                              "channel UNet): give init_image and mask_image <model.checkpoint>")
        if _is_img2img(jobs):  # init images encoded and noised to the first step of a strength-shortened schedule
            timesteps, latents = img2img.start(self.bundle.vae, scheduler, [j.init_image for j in jobs], gens,
                                               key.steps, key.strength, key.width, key.height)
        else:
            timesteps, latents = scheduler.timesteps, self._start_noise(gens, key, scheduler)
        return inpaint.InpaintStart(timesteps, latents, None, ())

    def set_textual_inversion(self, files: Sequence[str], xti_files: Sequence[str] = ()) -> None:
        """Load the run's embedding files and make exactly them active (model.textual_inversion, xti_embeddings).

        Call it once per run: the text encoder and its token ids are shared by every engine on this model,
        so each run writes its own vectors (idempotent for the same files) before it encodes anything.
        """
        embeddings = load_embeddings(files, xti_files)
        if xti_files:
            xti.install(self.bundle.unet)  # checks the UNet layout before the text encoder changes
        self.text.set_embeddings(embeddings)
        refs = [(EmbeddingRef(e.name, e.file, e.hash), e.xti) for e in embeddings]
        self.info = dataclasses.replace(self.info, embeddings=tuple(r for r, is_xti in refs if not is_xti),
                                        xti_embeddings=tuple(r for r, is_xti in refs if is_xti))

    def set_networks(self, network: NetworkConfig) -> None:
        """Patch the run's networks (network.loras) onto this model, replacing any still on it.

        Engines on one model share its modules, so the patch is kept per model; clear_networks() takes it
        off again (the runner does at the end of every run, so a cached model is always plain between runs).
        """
        _close_networks(id(self.bundle))
        active = RunNetworks(self.bundle.unet, self.bundle.text_encoder, network) if network.loras else None
        if active is not None:
            _NETWORKS[id(self.bundle)] = (self.bundle, active)
        self.networks = active
        self.text.network_key = ()
        self.info = dataclasses.replace(self.info, networks=active.refs if active else ())

    def _network_conditioning(self, jobs: tuple[ImageJob, ...], negative_scale: float | None) -> Conditioning:
        """_conditioning with the jobs' LoRA multipliers set. A batch whose images have different ones (hooked
        mode: a grid of multipliers shares batches) gets per-image multipliers in the UNet, and each image's
        text is encoded with its own multipliers: once per distinct set, keeping that set's rows."""
        nets = self.networks
        keys = [nets.muls_of(job.network_muls) for job in jobs]
        conds: dict[tuple, Conditioning] = {}
        for muls in dict.fromkeys(keys):
            self.text.network_key = nets.apply(muls)
            conds[muls] = self._conditioning(jobs, negative_scale)
            if not self.text.network_key:  # the text encoder has no LoRA: one encoding serves every image
                break
        if len(set(keys)) > 1:
            nets.apply_per_image(keys)
        return conds[keys[0]] if len(conds) == 1 else _rows_of(conds, keys)

    def _conditioning(self, jobs: tuple[ImageJob, ...], negative_scale: float | None) -> Conditioning:
        """The batch's text conditioning and CFG scales; with a negative scale also the real unconditional.

        The real unconditional ("" per image) is encoded in the same call as the prompts, so all three parts
        share one chunk count (the UNet gets them in one call) and XTI's per-block encodings cover it too.
        """
        guided = any(j.cfg_scale > 1 for j in jobs)
        three_parts = guided and negative_scale is not None
        prompts, origins = [strip_tags(j.prompt) for j in jobs], [j.origin for j in jobs]
        negatives = [j.negative_prompt for j in jobs] if guided else None
        if three_parts:
            prompts, origins, negatives = prompts + [""] * len(jobs), origins * 2, negatives * 2
        embeddings, negative = self.text.encode_batch(prompts, negatives, clip_skip=self.clip_skip, origins=origins)
        cond = Conditioning(
            embeddings=embeddings, negative=negative,
            cfg_scales=torch.tensor([j.cfg_scale for j in jobs], dtype=torch.float32, device=self.placement.device),
        )
        cond = self._xti_conditioning(cond, prompts, negatives)  # per-block text when a prompt uses XTI
        if not three_parts:
            return cond
        n = len(jobs)
        return dataclasses.replace(cond, embeddings=cond.embeddings[:n], negative=cond.negative[:n],
                                   uncond=cond.embeddings[n:], negative_scale=negative_scale)

    def _xti_conditioning(self, cond: Conditioning, prompts: list[str], negatives: list[str] | None) -> Conditioning:
        """``cond`` with one text encoding per UNet cross-attention block if the batch uses an XTI embedding."""
        if not self.text.uses_xti(prompts + (negatives or [])):
            return cond
        blocks = [self.text.encode_batch(prompts, negatives, clip_skip=self.clip_skip, block=b)
                  for b in range(len(XTI_LAYERS))]
        return xti.conditioning(cond, blocks)

    def _start_noise(self, gens: list[torch.Generator], key: BatchKey, scheduler) -> torch.Tensor:
        """txt2img start latents: each image's fp32 CPU noise, moved, cast, × the scheduler's initial sigma."""
        factor = self.latent_factor
        latents = noise.initial_noise(gens, self.latent_channels, key.height // factor, key.width // factor)
        return latents.to(device=self.placement.device, dtype=self.placement.dtype) * scheduler.init_noise_sigma

    def model_hashes(self) -> dict[str, str]:
        """Short sha256 of every model file in use, by path (the run's config.yaml records them).

        Textual Inversion files are listed with A1111's 12 digits ("TI hashes"), the others with 10.
        """
        hashes = {self.bundle.source: self.bundle.model_hash}
        if self.bundle.vae_name:
            hashes[self.bundle.vae_name] = self.bundle.vae_hash
        hashes.update({e.file: e.hash for e in (*self.info.embeddings, *self.info.xti_embeddings)})
        return hashes

    def model_fn(self) -> ModelFn:
        """The UNet call wrapped by every active wrapper."""
        unet = self.bundle.unet
        # no-ops unless cond.deep_shrink / cond.inpaint are set
        model = inpaint.with_inpaint_input(with_deep_shrink(unet, unet_model(unet)))
        for wrap in self.wrappers:
            model = wrap(model)
        return model


def _rows_of(conds: dict[tuple, Conditioning], keys: list[tuple]) -> Conditioning:
    """Row i of every text tensor from conds[keys[i]] (all encoded from the same prompts, so shapes agree)."""
    first = next(iter(conds.values()))

    def rows(name: str) -> torch.Tensor | None:
        if getattr(first, name) is None:
            return None
        return torch.stack([getattr(conds[key], name)[i] for i, key in enumerate(keys)])

    return dataclasses.replace(first, embeddings=rows("embeddings"), negative=rows("negative"), uncond=rows("uncond"))


def _is_img2img(jobs: tuple[ImageJob, ...]) -> bool:
    """Whether the batch starts from init images; a batch mixing both kinds is a batching bug."""
    with_init = sum(job.init_image is not None for job in jobs)
    if 0 < with_init < len(jobs):
        raise ValueError("a batch mixes img2img and txt2img jobs: they cannot share one schedule")
    return with_init > 0


def _v_prediction(setting: str, family: str) -> bool:
    if setting != "auto":
        return setting == "true"
    if family == "sd2":
        log.warning("SD2 checkpoint: assuming epsilon prediction (512 base). For 768-v models use model=sd21 "
                    "or model.v_parameterization=true <model.v_parameterization=auto>")
    return False


_ENGINES: dict[tuple, Engine] = {}
_COMPILED: set[int] = set()


def clear_networks() -> None:
    """Take every run's networks off the cached models: hooks removed, original weights back."""
    for key in list(_NETWORKS):
        _close_networks(key)
    for engine in _ENGINES.values():
        engine.networks = None
        engine.text.network_key = ()


def _close_networks(key: int) -> None:
    entry = _NETWORKS.pop(key, None)
    if entry is not None:
        entry[1].close()


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
    for stale in [k for k, (b, _) in _NETWORKS.items() if not is_cached(b)]:
        del _NETWORKS[stale]
    key = (id(bundle), model.clip_skip, model.v_parameterization, perf.vae_batch_size, perf.vae_slices)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(bundle, placement, model, perf)
    return _ENGINES[key]


def _apply_perf(bundle: ModelBundle, perf: PerfConfig) -> None:
    fmt = torch.channels_last if perf.channels_last else torch.contiguous_format
    bundle.unet.to(memory_format=fmt)
    bundle.vae.to(memory_format=fmt)
    if perf.compile and id(bundle) not in _COMPILED:
        # Compiled once per loaded model; later runs reuse the compiled graph.
        bundle.unet.forward = torch.compile(bundle.unet.forward)
        _COMPILED.add(id(bundle))

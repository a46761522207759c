"""Plain value records that travel from planning to outputs: one ImageJob per image."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from sdbatch.config.spec import FeatureSettings, feature_attribute

_PER_IMAGE = {"per_image": True}  # field metadata: the value may differ between the images of one UNet batch


@dataclass(frozen=True, slots=True)
class ImageJob:
    """Everything that decides one image, plus where it goes.

    Fields marked per-image (`PER_IMAGE`) may differ inside one UNet batch; every other field is part of the
    batch key (`sdbatch.plan.batching.BatchKey`). `features`: per-image feature name → the image's resolved
    settings (e.g. "deep_shrink" → DeepShrink, "highres" → HighresConfig); absent = off. Read access by feature
    name: `job.deep_shrink` is `job.features.get("deep_shrink")`, for every feature in `image_features(RunSpec)`.
    """

    index: int = field(metadata=_PER_IMAGE)  # position of the image in the run (0-based); stable whatever the batching
    file_name: str = field(metadata=_PER_IMAGE)  # e.g. "00003-1237.png", deterministic, no timestamps
    prompt: str = field(metadata=_PER_IMAGE)  # the prompt as encoded: dynamic parts expanded, weights as written
    negative_prompt: str = field(metadata=_PER_IMAGE)
    seed: int = field(metadata=_PER_IMAGE)
    width: int
    height: int
    steps: int
    sampler: str  # sdbatch sampler name, e.g. "euler_a", "dpmpp_2m"
    schedule: str  # default | karras | exponential
    cfg_scale: float = field(metadata=_PER_IMAGE)  # the scale travels as a per-image tensor
    eta: float
    origin: str = field(metadata=_PER_IMAGE)  # where the prompt came from: "prompt", "prompt[2]", "prompts.txt:14"
    raw_prompt: str = field(default="", metadata=_PER_IMAGE)  # the line as written, options included
    negative_scale: float | None = None  # --nl (separate negative-prompt scale)
    strength: float | None = None  # --t (img2img)
    network_muls: tuple[float, ...] | None = None  # --am
    clip_prompt: str | None = field(default=None, metadata=_PER_IMAGE)  # --c (recorded only)
    # img2img: path of the init image file (None = txt2img)
    init_image: str | None = field(default=None, metadata=_PER_IMAGE)
    # inpainting: path of the mask file (white = repaint); needs init_image
    mask_image: str | None = field(default=None, metadata=_PER_IMAGE)
    # ControlNet: the image's guide images, one per guidance.models entry (() without ControlNet)
    guide_images: tuple[str, ...] = field(default=(), metadata=_PER_IMAGE)
    # guided sampling (guided=clip_image | vgg16): the image's target image (guided.guide_image, in turn)
    guided_image: str | None = field(default=None, metadata=_PER_IMAGE)
    # guided=clip: the text it steers toward, the line's --c or the prompt without weights and tags
    guided_text: str | None = field(default=None, metadata=_PER_IMAGE)
    # Attention Couple: the image's region mask (regions.mask, in turn; None = every part covers the image)
    region_mask: str | None = field(default=None, metadata=_PER_IMAGE)
    region_codes: int | None = None  # regions.max_color_codes: the mask is read by colour codes (None: by channel)
    features: FeatureSettings = FeatureSettings()  # per-image features: name → resolved settings (absent = off)

    __getattr__ = feature_attribute  # job.deep_shrink, job.gradual_latent, job.highres (None when off)


PER_IMAGE = frozenset(f.name for f in fields(ImageJob) if f.metadata.get("per_image"))
"""The ImageJob fields that may differ between the images of one UNet batch (marked in their field metadata)."""


@dataclass(frozen=True, slots=True)
class EmbeddingRef:
    """A Textual Inversion embedding active in the run: its prompt name, file and A1111 short hash."""

    name: str  # the prompt token (file name without extension)
    file: str  # resolved path of the embedding file
    hash: str  # first 12 hex digits of the file's sha256 (A1111 "TI hashes")


@dataclass(frozen=True, slots=True)
class NetworkRef:
    """A LoRA-family network active in the run: its name, file and A1111 short hash."""

    name: str  # file name without extension (A1111's Lora name)
    file: str  # resolved path
    hash: str  # A1111 "Lora hashes": first 12 hex of the sha256 of the safetensors data (after the header)
    merged: bool = False  # network.mode=merge: in the weights at network.loras[].mul for the whole run


@dataclass(frozen=True, slots=True)
class ControlNetRef:
    """A ControlNet of the run (guidance.models[i]): its name, file and short hash."""

    name: str  # file stem or folder name (A1111's ControlNet "Model" name)
    file: str  # resolved path
    hash: str  # first 10 hex digits of the file's sha256 (folder: of its weights file)


@dataclass(frozen=True, slots=True)
class GuideModelRef:
    """Guided sampling's model (guided.clip_model or guided.vgg16_weights): its name, file and short hash."""

    name: str  # file stem or folder name
    file: str  # resolved path
    hash: str  # first 10 hex digits of the file's sha256 (folder: of its weights file)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the outputs need to know about the loaded model (names and short hashes)."""

    name: str  # checkpoint file stem (A1111 "Model")
    hash: str  # first 10 hex digits of the file's sha256 (A1111 "AutoV2" / "Model hash")
    family: str  # "sd1" | "sd2" | "sdxl"
    v_prediction: bool
    clip_skip: int  # 1 = last text-encoder layer
    precision: str  # fp32 | fp16 | bf16 (as actually used)
    vae_name: str | None = None
    vae_hash: str | None = None
    embeddings: tuple[EmbeddingRef, ...] = ()  # model.textual_inversion of the run; images record those they use
    xti_embeddings: tuple[EmbeddingRef, ...] = ()  # model.xti_embeddings of the run, the same way
    networks: tuple[NetworkRef, ...] = ()  # network.loras of the run, in order (an image's network_muls match)
    controlnets: tuple[ControlNetRef, ...] = ()  # guidance.models of the run, in order
    guide_models: tuple[GuideModelRef, ...] = ()  # guided sampling's model of the run (none or one)
    regional_networks: bool = False  # network.regional: network i acts in the region of AND part i
    zero_terminal_snr: bool = False  # sampler.zero_terminal_snr of the run
    tome_ratio: float = 0.0  # perf.tome_ratio of the run (0 = off)
    deepcache: tuple[int, int] | None = None  # (perf.deepcache.interval, .branch) of the run; None = off

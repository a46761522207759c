"""The frozen run spec: one dataclass per config group, the RunSpec the planner and the engine read.

Plain Python (no Hydra, no OmegaConf): the engine and the planner import it without the config machinery.
`sdbatch.config.schema` generates the mutable twins Hydra composes into; `resolve` freezes them into these.

Per-image features (Deep Shrink, Gradual Latent, Highres. fix, ControlNet) keep their config class in their own
`*_schema.py` module; a RunSpec field of such a class makes the feature known everywhere (`image_features`).
An image's settings of all its features travel together as one `FeatureSettings`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdbatch.config.accelerators_schema import DeepCacheConfig
from sdbatch.config.clip_vision_schema import ClipVisionConfig
from sdbatch.config.deep_shrink_schema import DeepShrinkConfig
from sdbatch.config.gradual_latent_schema import GradualLatentConfig
from sdbatch.config.guidance_schema import GuidanceConfig
from sdbatch.config.guided_schema import GuidedConfig
from sdbatch.config.highres_schema import HighresConfig
from sdbatch.config.regions_schema import RegionsConfig
from sdbatch.config.sdxl_schema import SdxlConfig

MISSING: Any = "???"  # OmegaConf's marker for a mandatory value (the same string, so Hydra reports it as missing)

_SPEC = dict(frozen=True, slots=True)


@dataclass(**_SPEC)
class ModelConfig:
    checkpoint: str = MISSING  # .safetensors/.ckpt file, diffusers folder, cached hub id, or builtin:tiny
    vae: str | None = None  # separate VAE: single file or diffusers folder
    v2: str = "auto"  # auto | true | false: SD2 layout (auto = read from the weights)
    v_parameterization: str = "auto"  # auto | true | false: v-prediction (auto = false; sd21 sets true)
    clip_skip: int = 1  # 1 = last text-encoder layer, 2 = penultimate, ...
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (auto = fp16 on CUDA, fp32 on CPU)
    no_half_vae: bool = False  # keep the VAE in fp32 when precision is fp16/bf16
    # Textual Inversion embedding files (.pt/.safetensors/.bin); write a file's name (no extension) in a prompt
    textual_inversion: list[str] = field(default_factory=list)
    # Extended Textual Inversion files (16 per-UNet-block vector sets, kohya XTI); used like textual_inversion
    xti_embeddings: list[str] = field(default_factory=list)
    # what a run uses when it does not say: width/height of txt2img images (model=tiny: 128, for a first run in
    # seconds) and sampler.steps (conf/config.yaml reads it; model=tiny: 12). An explicit width or steps wins
    default_size: int = 512
    default_steps: int = 50


@dataclass(**_SPEC)
class SamplerConfig:
    name: str = MISSING  # registry name, see sdbatch/samplers.py
    steps: int = 50  # denoising steps
    cfg_scale: float = 7.5  # classifier-free guidance scale; <= 1 disables CFG
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    schedule: str = "default"  # default | karras | exponential
    # a separate scale for the negative prompt (gcem156's method, the reference's --negative_scale): the real
    # unconditional prediction becomes the base and the negative prompt is pushed away from with this scale
    negative_scale: float | None = None
    # rescale the betas to zero terminal SNR (diffusers' rescale_betas_zero_snr), for v-prediction models trained
    # so (model.v_parameterization=true); ddim, euler, euler_a, dpmsolver++/dpmpp_2m and unipc support it
    zero_terminal_snr: bool = False


@dataclass(**_SPEC)
class LoraConfig:
    # kohya LoRA/LoCon, LyCORIS LoHa/LoKr/DoRA or diffusers LoRA file (.safetensors preferred; .pt/.ckpt load safely)
    path: str = MISSING
    mul: float = 1.0  # text-encoder multiplier, and the UNet's unless unet_mul is set (--am replaces both)
    unet_mul: float | None = None  # the UNet's own multiplier (A1111's <lora:NAME:TE:UNET>); null = mul

    def weight(self) -> float | tuple[float, float]:
        """This file's multipliers as an image carries them (see `pair`)."""
        return self.pair(self.mul, self.unet_mul)

    @staticmethod
    def pair(te: float, unet: float | None = None) -> float | tuple[float, float]:
        """One network's entry of ImageJob.network_muls: one number for the text encoder and the UNet, or a
        (text encoder, UNet) pair when they differ."""
        te = float(te)
        unet = te if unet is None else float(unet)
        return te if unet == te else (te, unet)

    @staticmethod
    def split(weight: float | typing.Sequence[float]) -> tuple[float, float]:
        """(text encoder, UNet) multipliers of one entry of ImageJob.network_muls (a number or a pair)."""
        if isinstance(weight, tuple | list):
            te, unet = weight
            return float(te), float(unet)
        return float(weight), float(weight)


@dataclass(**_SPEC)
class NetworkConfig:
    name: str = "none"  # none | lora
    loras: list[LoraConfig] = field(default_factory=list)  # network=lora: [{path: FILE, mul: 0.8}, ...]
    # hooked: added to each layer's output, multipliers per batch (--am); merge: added into the weights once
    # (fastest, --am ignored); precalc: merged again for each batch's multipliers (fast sampling, --am works)
    mode: str = "hooked"
    strict: bool = False  # true: a LoRA module the model does not have is an error (default: warn and skip)
    # the run's multipliers, one per file in order (the last repeats, like --am), replacing loras[].mul;
    # what +sweeps=lora_weights sweeps: network.muls='[0.5]'
    muls: list[float] | None = None
    lora_dir: str | None = None  # folder of LoRA files for A1111's <lora:NAME:WEIGHT> prompt tags
    show_meta: bool = False  # print each network file's training metadata before the run
    # Attention Couple: LoRA i acts only inside the region of part i of an AND prompt (UNet) and on that part's
    # text (text encoder); needs mode=hooked. Prompts without AND use the networks as usual
    regional: bool = False

    def multipliers(self) -> tuple[float | tuple[float, float], ...]:
        """The run's multipliers for each network: network.muls (text encoder and UNet alike), else each file's
        mul, or its (mul, unet_mul) pair when the UNet has its own (`LoraConfig.pair`)."""
        if self.muls:
            return complete_muls(self.muls, len(self.loras))
        return tuple(lora.weight() for lora in self.loras)


def complete_muls(values: typing.Sequence[float], count: int) -> tuple[float, ...]:
    """`count` multipliers from `values`: the last value repeats, extra values are dropped (the reference's --am);
    a (text encoder, UNet) pair stays a pair."""
    return tuple(LoraConfig.pair(*LoraConfig.split(v)) for v in (*values, *[values[-1]] * count)[:count])


@dataclass(**_SPEC)
class InpaintConfig:
    keep_original: bool = True  # paste the original's pixels back outside the mask after decoding
    # null: a mask's grey levels are blend weights (soft edges; 50% grey = half repainted); a number in (0, 1):
    # binarize at it (0.5 = diffusers' mask processor, the old behaviour). Pure black-and-white mask files are
    # binarized at 0.5 either way (diffusers' images); 9-channel inpainting UNets get a binarized mask (0.5 if null)
    mask_threshold: float | None = None


@dataclass(**_SPEC)
class PerfConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attention: str = "sdpa"  # sdpa | xformers | eager
    vae_batch_size: int = 0  # images per VAE decode call; 0 = the whole batch
    # decode in this many horizontal bands (full activations kept on the CPU, GroupNorm over the whole image,
    # so the pixels are the same): less GPU memory for large images, slower; null = whole image at once
    vae_slices: int | None = None
    # decode in overlapping tiles (diffusers' tiled decode, 512-pixel tiles, linear blend over the overlap): far
    # less memory for large images, slightly different pixels; cannot be combined with vae_slices
    vae_tiling: bool = False
    channels_last: bool = False  # channels_last memory format for UNet and VAE (GPU)
    compile: bool = False  # torch.compile the UNet (GPU; first batch is slow)
    progress: bool = True  # tqdm bars for images and steps
    # the largest image (width × height, every stage) a run may ask for: larger sizes are refused before any model
    # loads, since they would run for hours or run out of memory; raise it for really big images
    max_pixels: int = 4096 * 4096
    # opt-in accelerators, both change pixels (images record them): token merging in the self-attention of the
    # full-resolution transformer blocks, share of tokens merged from 0 (off) to 0.9 (A1111's "Token merging ratio")
    tome_ratio: float = 0.0
    deepcache: DeepCacheConfig = field(default_factory=DeepCacheConfig)  # reuse deep UNet features between steps


@dataclass(**_SPEC)
class OutputConfig:
    naming: str = "default"  # default ("00007-1234.png") | sequential ("im_000008.png") | original (init image)
    grid: bool = False  # also write grid.png with all images of the run
    resume: bool = True  # skip images already listed in manifest.jsonl
    format: str = "png"  # png | webp | jpg; webp and jpg carry the infotext in EXIF UserComment, as A1111 writes
    quality: int = 95  # webp and jpg quality, 1-100 (A1111's default is 80)
    sidecar: bool = False  # also write each image's infotext beside it as NAME.txt, like A1111's option
    # index.html in the run directory (and the sweep directory): thumbnails, parameters, the command that makes
    # each image again; rewritten as images are saved, so a long run can be watched in a browser
    gallery: bool = True


@dataclass(**_SPEC)
class PromptsConfig:
    wildcards_dir: str | None = None  # folder of NAME.txt files for __NAME__ wildcards (one option per line)
    # the most items a prompt_module may yield: an endless generator stops with an error instead of filling memory
    max_module_lines: int = 100_000
    # a gen_img-style prompt module's args.prompter_module_args (the reference's --prompter_module_args)
    module_args: str | None = None


@dataclass(**_SPEC)
class PathsConfig:
    # a models folder in A1111's layout (Stable-diffusion/, VAE/, Lora/, embeddings/, ControlNet/) or sdbatch's
    # (checkpoints/, vae/, loras/, embeddings/, controlnet/): model.checkpoint=NAME etc. are looked up under it
    models: str | None = None


@dataclass(**_SPEC)
class GridConfig:
    # Fused grid axes, each in one of two forms: a key and a list (grid.x.key=sampler.cfg_scale
    # 'grid.x.values=[5,7,9]', which Hydra never reads as a sweep), or one string "KEY:V1,V2,..." (its commas
    # quoted for Hydra: "grid.x='sampler.cfg_scale:5,7,9'"). Typed Any to take either: sdbatch.config.grid_axes
    # checks them. Unset: key and values null (so that grid.x.key=... has a key to set)
    x: Any = field(default_factory=lambda: dict(UNSET_AXIS))  # columns
    y: Any = field(default_factory=lambda: dict(UNSET_AXIS))  # rows: grid.y.key=seed 'grid.y.values=[1,2,3,4]'
    z: Any = field(default_factory=lambda: dict(UNSET_AXIS))  # one sheet per value


UNSET_AXIS = {"key": None, "values": None}


@dataclass(**_SPEC)
class RunSpec:
    model: ModelConfig = MISSING
    sampler: SamplerConfig = MISSING
    network: NetworkConfig = MISSING
    guidance: GuidanceConfig = MISSING
    guided: GuidedConfig = field(default_factory=GuidedConfig)  # guided sampling (CLIP, CLIP image, VGG16)
    highres: HighresConfig = MISSING
    perf: PerfConfig = field(default_factory=PerfConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    deep_shrink: DeepShrinkConfig = field(default_factory=DeepShrinkConfig)
    gradual_latent: GradualLatentConfig = field(default_factory=GradualLatentConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)  # Attention Couple's region masks
    sdxl: SdxlConfig = field(default_factory=SdxlConfig)  # SDXL's size conditioning
    clip_vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)  # SDXL img2img: init image embedding
    prompt: Any = None  # a string or a list of strings; in-prompt options (--w 768 --n ...) allowed
    negative_prompt: str = ""  # default negative prompt (a line's --n replaces it)
    # A1111's Prompt S/R: the first of prompt_sr_words is replaced by prompt_sr in every prompt and negative
    # prompt of the run (+sweeps=prompt_sr runs one job per word)
    prompt_sr: str | None = None
    prompt_sr_words: list[str] = field(default_factory=list)
    prompt_file: str | None = None  # UTF-8, one prompt per line; blank lines and '#' comments skipped
    prompt_module: str | None = None  # Python file with get_prompter(spec, engine) yielding prompt lines
    interactive: bool = False  # read prompts from standard input, generate each as it comes
    no_preview: bool = False  # interactive: never open a preview window
    on_error: str = "stop"  # stop | skip: what a malformed prompt line does
    width: int | None = None  # pixels, multiple of 8; null = 512, or the init image's own size (img2img)
    height: int | None = None  # pixels, multiple of 8; null = 512, or the init image's own size (img2img)
    init_image: str | None = None  # img2img: an image file or a folder of images (used in turn)
    strength: float = 0.8  # img2img: how much of the image is redrawn, 0 < strength <= 1
    mask_image: str | None = None  # inpainting: a mask file or folder (white = repaint), mask i for init image i
    seed: int | None = None  # image k gets seed + k; null = random (recorded)
    images_per_prompt: int = 1
    n_iter: int = 1  # repeat the whole prompt list this many times
    batch_size: int = 1  # images per UNet call
    iter_same_seed: bool = False  # every image of one n_iter pass shares that pass's seed
    shuffle_prompts: bool = False  # shuffle the prompt lines (seeded by the run's base seed)
    max_embeddings_multiples: int = 1  # prompt length in 75-token chunks: 1 = 75 tokens, 3 = 225
    emb_normalize_mode: str = "original"  # original | abs | none: rescaling after prompt weights


GROUPS = {"model": ModelConfig, "sampler": SamplerConfig, "network": NetworkConfig,
          "guidance": GuidanceConfig, "guided": GuidedConfig,
          "highres": HighresConfig}


# ---------------------------------------------------------------- per-image features


def image_features(spec_or_cls: RunSpec | type[RunSpec]) -> dict[str, type]:
    """The per-image features: RunSpec field name → its config class (one with `for_image`), in field order.

    Such a class also has `check(spec)` (its run-level checks) and `LINE` (its prompt-line override class, or
    None); the settings `for_image` returns may have `record(job)` (their manifest entry, else their fields).
    """
    cls = spec_or_cls if isinstance(spec_or_cls, type) else type(spec_or_cls)
    return dict(_image_features(cls))


@functools.cache
def _image_features(cls: type) -> tuple[tuple[str, type], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls)
                 if isinstance(hints[f.name], type) and hasattr(hints[f.name], "for_image"))


class FeatureSettings(Mapping[str, Any]):
    """Per-image feature settings: feature name → its frozen settings; immutable, hashable, equal by content.

    `FeatureSettings({"deep_shrink": DeepShrink(...)})` or `FeatureSettings()`; a None value means "absent" (it
    is dropped, and `replace(name=None)` removes a name). Kept as a tuple of (name, settings) sorted by name.
    """

    __slots__ = ("_items",)
    _items: tuple[tuple[str, Any], ...]

    def __init__(self, settings: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        items = tuple(sorted(((str(k), v) for k, v in dict(settings).items() if v is not None), key=lambda kv: kv[0]))
        hash(items)  # settings must be hashable (frozen dataclasses): fail here, not in a batch key
        object.__setattr__(self, "_items", items)

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(key == name for key, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FeatureSettings):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"FeatureSettings({dict(self._items)!r})" if self._items else "FeatureSettings()"

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: FeatureSettings is immutable")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}: FeatureSettings is immutable")

    def __reduce__(self) -> tuple[type[FeatureSettings], tuple[tuple[tuple[str, Any], ...]]]:
        return type(self), (self._items,)

    def replace(self, **changes: Any) -> FeatureSettings:
        """A copy with `changes` (name=settings) applied; name=None removes the name."""
        return FeatureSettings({**dict(self._items), **changes})


def feature_attribute(self: Any, name: str) -> Any:
    """`__getattr__` of records with a `features` field (LineOptions, ImageJob, BatchKey): read access by feature
    name, `record.deep_shrink` → `record.features.get("deep_shrink")` (None when absent or features is None), for
    every name in `image_features(RunSpec)`; any other missing name raises AttributeError."""
    if any(name == feature for feature, _ in _image_features(RunSpec)):
        features = self.features
        return None if features is None else features.get(name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

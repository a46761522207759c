"""Composed Hydra config → frozen RunSpec, with the cross-field checks done once, naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sdbatch.config import accelerators_schema
from sdbatch.config.grid_axes import SEED_LIMIT, axis_key, grid_axes, size_problem
from sdbatch.config.model_names import resolve_model_names
from sdbatch.config.sampler_registry import MIN_STEPS, check_zero_terminal_snr, effective_schedule
from sdbatch.config.spec import RunSpec, image_features
from sdbatch.errors import ConfigError

_MISSING_HINTS = {
    "model.checkpoint": "give the model file with model.checkpoint=PATH (or model=tiny for the built-in demo)",
}
_CHOICES = {
    "model.v2": ("auto", "true", "false"),
    "model.v_parameterization": ("auto", "true", "false"),
    "model.precision": ("auto", "fp32", "fp16", "bf16"),
    "perf.attention": ("sdpa", "xformers", "eager"),
    "output.naming": ("default", "sequential", "original"),
    "output.format": ("png", "webp", "jpg"),
    "on_error": ("stop", "skip"),
    "emb_normalize_mode": ("original", "abs", "none"),
    "network.name": ("none", "lora"),
    "network.mode": ("hooked", "merge", "precalc"),
}
# choice keys a boolean can stand for: Hydra reads `=true`/`=false` (and YAML `on`/`off`/`yes`/`no`) as a
# bool, which the str-typed key then holds as 'True'/'False'; each is read as the choice it means
_BOOLEAN_CHOICES = {
    "model.v2": ("true", "false"),
    "model.v_parameterization": ("true", "false"),
    "highres.name": ("on", "off"),
}
_POSITIVE = ("width", "height", "images_per_prompt", "n_iter", "batch_size", "sampler.steps", "model.clip_skip",
             "max_embeddings_multiples", "strength", "prompts.max_module_lines")


def resolve(cfg: DictConfig) -> RunSpec:
    """Validate a composed config and freeze it into a RunSpec; raises ConfigError naming the key."""
    _reject_added_keys(cfg, RunSpec, "")
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as ex:
        key = ex.full_key
        raise ConfigError(f"{key} is not set: {_MISSING_HINTS.get(key, f'set {key}=VALUE')}") from None
    spec = resolve_model_names(_normalise(_freeze(obj, RunSpec)))  # names under paths.models → their files
    _check(spec)
    return spec


def to_plain(spec: RunSpec) -> dict:
    """The run spec as plain, YAML-able values (for config.yaml and the manifest)."""
    return dataclasses.asdict(spec)


def _reject_added_keys(node: DictConfig, cls: type, prefix: str) -> None:
    """`+key=value` escapes the schema and OmegaConf.to_object drops it silently; make it an error."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    for key in node.keys():
        if key == "hydra":
            continue
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {full} (added with '+'); valid keys: {', '.join(names)}")
        value = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, DictConfig) and not value._is_missing():
            _reject_added_keys(value, hints[key], f"{full}.")


def _freeze(obj: object, cls: type) -> object:
    """Copy a composed (mutable) schema object into its frozen twin, recursively."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value, tp = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            value = _freeze(value, tp)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            value = [_freeze(item, typing.get_args(tp)[0]) for item in value]
        values[f.name] = value
    return cls(**values)


def _normalise(spec: RunSpec) -> RunSpec:
    """Booleans given for choice keys become their choice ('True' → 'true'), and seed=-1 means random (null),
    as in A1111."""
    for key, (yes, no) in _BOOLEAN_CHOICES.items():
        value = _get(spec, key)
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
            word = yes if value is True or str(value).lower() == "true" else no
            spec = _replace(spec, key, word)
    if spec.seed == -1:
        spec = dataclasses.replace(spec, seed=None)
    return spec


def _replace(obj: object, key: str, value: object) -> object:
    """A copy of the frozen `obj` with the dotted `key` set to `value`."""
    head, _, rest = key.partition(".")
    if rest:
        value = _replace(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: value})


def _check_finite(obj: object, prefix: str = "") -> None:
    """Every float key (and float list item) is a finite number: nan and inf would give black images or invalid
    JSON in the manifest, not an error."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_finite(item, f"{key}[{i}].")
                elif _is_float_type(hints[f.name]) and isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{key}[{i}] must be a finite number, got {item}")
        elif _is_float_type(hints[f.name]) and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")


def _is_float_type(tp: object) -> bool:
    """float, float | None, list[float], list[float] | None, tuple[float, ...]."""
    return tp is float or any(_is_float_type(arg) for arg in typing.get_args(tp))


def _get(spec: RunSpec, key: str) -> object:
    value: object = spec
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check(spec: RunSpec) -> None:
    _check_finite(spec)
    for key, choices in _CHOICES.items():
        value = _get(spec, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    for key in _POSITIVE:
        if _get(spec, key) is not None and _get(spec, key) <= 0:
            raise ConfigError(f"{key} must be a positive number, got {_get(spec, key)}")
    for key in ("width", "height"):
        if _get(spec, key) is not None and _get(spec, key) % 8:
            raise ConfigError(f"{key} must be a multiple of 8, got {_get(spec, key)}; try {_get(spec, key) // 8 * 8}")
    if spec.strength > 1:
        raise ConfigError(f"strength must be in (0, 1], got {spec.strength}")
    _check_seed_and_size(spec)
    _check_steps(spec)
    spec.regions.check()
    for name in image_features(spec):  # each per-image feature's run-level checks (highres, deep_shrink, ...)
        getattr(spec, name).check(spec)
    if spec.mask_image is not None and spec.init_image is None:
        raise ConfigError("mask_image needs init_image: the mask says which part of the init image to repaint")
    if spec.output.naming == "original" and spec.init_image is None:
        raise ConfigError("output.naming=original names images after their init image; set init_image too")
    if not 1 <= spec.output.quality <= 100:
        raise ConfigError(f"output.quality must be from 1 to 100 (webp and jpg), got {spec.output.quality}")
    if spec.sampler.cfg_scale < 0:
        raise ConfigError(f"sampler.cfg_scale must be >= 0, got {spec.sampler.cfg_scale}")
    if not 0 <= spec.sampler.eta <= 1:
        # the DDIM paper's η: 0 = deterministic DDIM, 1 = DDPM-like noise; outside [0, 1] diffusers' DDIM step
        # takes the square root of a negative number and the image comes out black
        raise ConfigError(f"sampler.eta must be in [0, 1] (0 = deterministic), got {spec.sampler.eta}")
    if spec.perf.vae_slices is not None and spec.perf.vae_slices < 1:
        raise ConfigError(f"perf.vae_slices must be >= 1 (or null for no slicing), got {spec.perf.vae_slices}")
    if spec.perf.vae_tiling and spec.perf.vae_slices is not None:
        raise ConfigError(f"perf.vae_tiling=true and perf.vae_slices={spec.perf.vae_slices} cannot be combined: "
                          "slices give the exact pixels, tiles use less memory still; set one of them")
    threshold = spec.inpaint.mask_threshold
    if threshold is not None and not 0 < threshold < 1:  # NaN fails this too
        raise ConfigError(f"inpaint.mask_threshold must be in (0, 1), or null for soft (grey) masks; got {threshold}")
    accelerators_schema.check(spec.perf, spec)
    if spec.perf.vae_batch_size < 0:
        raise ConfigError(f"perf.vae_batch_size must be >= 0 (0 = whole batch), got {spec.perf.vae_batch_size}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", spec.perf.device):
        raise ConfigError(f"perf.device={spec.perf.device!r} is not valid; use auto, cpu, cuda or cuda:N")
    effective_schedule(spec.sampler.name, spec.sampler.schedule)
    if spec.sampler.zero_terminal_snr:
        check_zero_terminal_snr(spec.sampler.name, spec.model.v_parameterization == "true")
    grid_axes(spec)
    _check_prompt(spec)
    _check_prompt_sr(spec)
    _check_networks(spec)


def _check_seed_and_size(spec: RunSpec) -> None:
    """seed in [0, 2**32) (-1 was made null: random), and width × height within perf.max_pixels."""
    if spec.seed is not None and not 0 <= spec.seed < SEED_LIMIT:
        raise ConfigError(f"seed must be from 0 to {SEED_LIMIT - 1}, or -1 or null for a random seed; "
                          f"got {spec.seed}")
    if spec.perf.max_pixels < 1:
        raise ConfigError(f"perf.max_pixels must be a positive number of pixels, got {spec.perf.max_pixels}")
    if spec.width is None and spec.height is None:
        return
    own = None if spec.init_image is not None else spec.model.default_size  # null: the model's, or the init image's
    width, height = spec.width or own, spec.height or own
    if width is not None and height is not None and (problem := size_problem(width, height, spec.perf.max_pixels)):
        given = " and ".join(f"{key}={_get(spec, key)}" for key in ("width", "height") if _get(spec, key))
        raise ConfigError(f"{given}: {problem}")


def _check_steps(spec: RunSpec) -> None:
    """sampler.steps the sampler can run, and img2img strength × steps leaving at least one step."""
    least = MIN_STEPS.get(spec.sampler.name, 1)
    if spec.sampler.steps < least:
        raise ConfigError(f"sampler {spec.sampler.name} needs sampler.steps >= {least}, got {spec.sampler.steps}")
    if spec.init_image is not None and 0 < spec.strength <= 1 and int(spec.sampler.steps * spec.strength) < 1:
        raise ConfigError(f"strength {spec.strength} × sampler.steps {spec.sampler.steps} leaves no denoising step "
                          "(diffusers runs int(steps × strength)); raise strength or sampler.steps")


def _check_prompt(spec: RunSpec) -> None:
    prompt = spec.prompt
    if prompt is not None and not isinstance(prompt, str):
        if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
            raise ConfigError(f"prompt must be a string or a list of strings, got {prompt!r}")
    no_source = spec.prompt_file is None and spec.prompt_module is None and not spec.interactive
    if prompt in (None, []) and no_source and spec.init_image is None:
        raise ConfigError("no prompt: set prompt='...', prompt_file=PATH, prompt_module=FILE.py or interactive=true")
    texts = [prompt] if isinstance(prompt, str) else prompt or []
    if prompt is not None and not any(t.strip() for t in texts) and no_source and spec.init_image is None:
        raise ConfigError(f"prompt={prompt!r} is empty: it would make no image; give prompt='a cat' (or a "
                          "prompt_file), or leave prompt unset to use init_image's stored prompts")


def _check_prompt_sr(spec: RunSpec) -> None:
    words = spec.prompt_sr_words
    if any(not isinstance(w, str) or not w for w in words):
        raise ConfigError(f"prompt_sr_words must be non-empty words, got {words!r}; e.g. prompt_sr_words=[dusk,dawn]")
    if spec.prompt_sr is not None and not words:
        raise ConfigError(f"prompt_sr={spec.prompt_sr!r} replaces the first of prompt_sr_words, which is empty; "
                          "set prompt_sr_words=[WORD_IN_PROMPT,...]")


def _check_networks(spec: RunSpec) -> None:
    network = spec.network
    if network.regional and (network.name != "lora" or network.mode != "hooked"):
        raise ConfigError("network.regional=true binds LoRA files to AND parts per pixel: it needs network=lora "
                          f"with network.mode=hooked (got network={network.name}, mode={network.mode})")
    if network.name == "lora" and not network.loras:
        raise ConfigError("network=lora needs at least one file: network.loras='[{path: style.safetensors, mul: 0.8}]'")
    if network.name == "none" and network.loras:
        raise ConfigError("network.loras is set but network=none; add network=lora")
    for i, lora in enumerate(network.loras):  # before any model loads
        if lora.path.startswith("builtin:") and lora.path != "builtin:tiny-lora":
            raise ConfigError(f"network.loras[{i}].path: {lora.path} is unknown; the built-in LoRA (for model=tiny) "
                              "is builtin:tiny-lora")
        if not lora.path.startswith("builtin:") and not Path(lora.path).expanduser().is_file():
            if Path(lora.path).expanduser().is_dir():
                raise ConfigError(f"network.loras[{i}].path: {lora.path} is a folder, not a LoRA file; give a "
                                  ".safetensors file (a folder of LoRA files for <lora:NAME> tags is network.lora_dir)")
            raise ConfigError(f"network.loras[{i}].path: LoRA file {lora.path} not found")
    if network.lora_dir is not None and not Path(network.lora_dir).expanduser().is_dir():
        found = "it is a file" if Path(network.lora_dir).expanduser().exists() else "it does not exist"
        raise ConfigError(f"network.lora_dir: {network.lora_dir} is not a folder ({found}); give the folder of the "
                          "LoRA files of <lora:NAME> tags")
    if network.muls is not None and not network.muls:
        raise ConfigError("network.muls=[] has no multiplier; give one per network, e.g. network.muls='[0.5]'")
    for name in "xyz":
        if axis_key(getattr(spec.grid, name)) == "network_muls" and (not network.loras or network.mode == "merge"):
            raise ConfigError(f"grid.{name}=network_muls needs network=lora with network.mode hooked or precalc "
                              "(merge mode bakes network.loras[].mul into the weights once)")

"""The reference's command line (kohya-ss gen_img.py) as data: every flag, its default and its sdbatch key.

One table serves three readers: `sdbatch-gen-img` builds its argparse parser from it and translates a command
line into sdbatch overrides (`sdbatch.cli.gen_img_translate`), gen_img-style prompt modules get an `args`
namespace read back from the run spec (`sdbatch.prompts.gen_img_module`), and a test checks the README's
migration table against it. Plain data: the translation rules that need more than one flag live with the CLI.

Statuses: `key` flags translate generically (value → key; a store_true flag → `const`); `rule` flags are
translated by a rule of their own (several flags meet in one key, or the reference's defaults differ from
sdbatch's); `ignored` flags have no effect in sdbatch either (a note says why); `unsupported` flags stop the
translation with one line each. Flag names, types and defaults are the reference's (gen_img_inventory.md §1),
plus the names its README documents for a few of them (`--mask_image`, `--control_net_weights`,
`--gradual_latent_ratio_every_n_steps`) and gen_img_diffusers.py's guidance and XTI flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sdbatch.config.sampler_registry import get_sampler

KEY, RULE, IGNORED, UNSUPPORTED = "key", "rule", "ignored", "unsupported"


@dataclass(frozen=True, slots=True)
class Flag:
    """One reference flag: how argparse reads it and what it becomes in sdbatch."""

    name: str  # the flag without dashes, also the argparse dest (the reference's args.NAME)
    key: str = ""  # the sdbatch key it sets ("" = none); a group selection when `group`
    type: Callable[[str], Any] | None = str  # None: a store_true switch
    nargs: str | None = None  # "*" / "+" for lists, "2" for pairs
    default: Any = None  # the reference's default
    status: str = KEY
    const: Any = None  # store_true flags with status key: the value they set (default True)
    note: str = ""  # README table: what differs; ignored/unsupported: why
    aliases: tuple[str, ...] = ()  # further spellings (the reference README's names)
    group: bool = False  # key names a config group: `sampler=euler_a`, not `sampler.name=euler_a`
    always: bool = False  # emitted even when not given: the reference's default differs from sdbatch's
    convert: Callable[[Any], Any] | None = None  # parsed value → override value


def _floats(text: str) -> list[float]:
    """'3,0.5,0.5,1' (the reference's --gradual_latent_unsharp_params) → [3.0, 0.5, 0.5, 1.0]."""
    return [float(part) for part in text.split(",")]


def _sampler(name: str) -> str:
    """A sampler name of the registry (gen_img's names are all there); an unknown one lists the valid ones."""
    get_sampler(name)
    return name


def _flag(name: str, key: str = "", **kw: Any) -> Flag:
    return Flag(name, key, **kw)


def _switch(name: str, key: str = "", const: Any = True, **kw: Any) -> Flag:
    return Flag(name, key, type=None, default=False, const=const, **kw)


def _unsupported(name: str, note: str, **kw: Any) -> Flag:
    return Flag(name, status=UNSUPPORTED, note=note, **kw)


def _ignored(name: str, note: str, **kw: Any) -> Flag:
    return Flag(name, status=IGNORED, note=note, **kw)


_SDXL = "sdxl_gen_img.py's; not translated yet: use model=sdxl and the sdxl.* keys"
_DIFFUSERS_ONLY = ("it downloads its guide model at run time; run sdbatch with guided=clip | clip_image | vgg16 "
                   "and a local guided.clip_model or guided.vgg16_weights (see the README)")

FLAGS: tuple[Flag, ...] = (
    # model, precision, scheduler
    _flag("ckpt", "model.checkpoint", status=RULE, note="required, as in gen_img"),
    _ignored("v1", "sdbatch reads the model family from the weights", type=None, default=False),
    _switch("v2", "model.v2", note="without it sdbatch reads the layout from the weights"),
    _unsupported("sdxl", _SDXL, type=None, default=False),
    _switch("v_parameterization", "model.v_parameterization"),
    _unsupported("zero_terminal_snr", "zero-terminal-SNR schedules are not in sdbatch yet", type=None,
                 default=False),
    _flag("vae", "model.vae"),
    _ignored("tokenizer_cache_dir", "sdbatch's tokenizer ships with it (offline)"),
    _switch("fp16", "model.precision", const="fp16", status=RULE, note="neither: model.precision=fp32"),
    _switch("bf16", "model.precision", const="bf16", status=RULE, note="--fp16 wins"),
    _flag("sampler", "sampler", default="ddim", group=True, always=True, convert=_sampler,
          note="every name; k_* are aliases"),
    _flag("steps", "sampler.steps", type=int, default=50, always=True),
    _flag("scale", "sampler.cfg_scale", type=float, default=7.5, always=True),
    _flag("negative_scale", "sampler.negative_scale", type=float),
    _flag("clip_skip", "model.clip_skip", type=int, note="SD2: 1 unless given (gen_img: 2, see below)"),
    _flag("max_embeddings_multiples", "max_embeddings_multiples", type=int),
    _flag("emb_normalize_mode", "emb_normalize_mode", default="original"),
    _ignored("force_scheduler_zero_steps_offset", "sdbatch's img2img always adds the noise of its first step",
             type=None, default=False),
    _unsupported("pyramid_noise_prob", "pyramid noise is not in sdbatch yet", type=float),
    _unsupported("pyramid_noise_discount_range", "pyramid noise is not in sdbatch yet", type=float, nargs="2"),
    _unsupported("noise_offset_prob", "noise offset is not in sdbatch yet", type=float),
    _unsupported("noise_offset_range", "noise offset is not in sdbatch yet", type=float, nargs="2"),
    # prompt sources, iteration, output
    _flag("prompt", "prompt", status=RULE, note="sources: --from_file > --from_module > --prompt, as in gen_img"),
    _flag("from_file", "prompt_file", status=RULE),
    _flag("from_module", "prompt_module", status=RULE, note="get_prompter(args, pipe, networks) reading args only"),
    _flag("prompter_module_args", "prompts.module_args"),
    _switch("interactive", "interactive", status=RULE, note="wins over the other sources; n_iter is 1"),
    _switch("no_preview", "no_preview"),
    _flag("images_per_prompt", "images_per_prompt", type=int, default=1),
    _flag("n_iter", "n_iter", type=int, default=1, status=RULE),
    _flag("batch_size", "batch_size", type=int, default=1),
    _flag("W", "width", type=int, status=RULE, note="default 512; img2img: both --W and --H resize the image"),
    _flag("H", "height", type=int, status=RULE),
    _flag("seed", "seed", type=int, note="image k gets seed + k (gen_img draws seeds from Random(seed))"),
    _switch("iter_same_seed", "iter_same_seed"),
    _switch("shuffle_prompts", "shuffle_prompts", note="shuffled with the run's seed: reproducible"),
    _flag("outdir", "hydra.run.dir", note="not given: outputs/DATE/TIME; the same command into one folder resumes"),
    _switch("sequential_file_name", "output.naming", const="sequential"),
    _switch("use_original_file_name", "output.naming", const="original"),
    _ignored("console_log_level", "no effect in gen_img either; Hydra's logging: hydra.verbose=true"),
    _ignored("console_log_file", "no effect in gen_img either; sdbatch logs to the run folder's run.log"),
    _ignored("console_log_simple", "no effect in gen_img either", type=None, default=False),
    # img2img, inpainting, SDXL conditioning
    _flag("image_path", "init_image", aliases=("img_path",)),  # the reference README also writes --img_path
    _flag("mask_path", "mask_image", status=RULE, aliases=("mask_image",),
          note="with (unmerged) networks: regions.mask and network.regional=true, as in gen_img"),
    _flag("strength", "strength", type=float, note="also Highres. fix's stage 2 (highres.strength), as in gen_img"),
    _unsupported("clip_vision_strength", "it downloads its CLIP-Vision model at run time; run sdbatch with model=sdxl, "
                 "a local clip_vision.model folder and clip_vision.strength (see the README)", type=float),
    *(_unsupported(name, _SDXL, type=int) for name in (
        "original_height", "original_width", "original_height_negative", "original_width_negative",
        "crop_top", "crop_left")),
    # Highres. fix
    _flag("highres_fix_scale", "highres.scale", type=float, status=RULE, note="highres=on"),
    _flag("highres_fix_steps", "highres.steps", type=int, default=28, status=RULE),
    _unsupported("highres_fix_strength", "Highres. fix cannot start from an init image in sdbatch", type=float),
    _switch("highres_fix_save_1st", "highres.save_first_stage", status=RULE),
    _switch("highres_fix_latents_upscaling", "highres.latent_upscale", status=RULE,
            note="with highres.latent_mode=bicubic (gen_img's code upscales bicubic)"),
    _unsupported("highres_fix_upscaler", "tools.latent_upscaler is not in sdbatch; highres.upscaler takes "
                 "your own module:function"),
    _unsupported("highres_fix_upscaler_args", "tools.latent_upscaler is not in sdbatch"),
    _switch("highres_fix_disable_control_net", "highres.disable_controlnet", status=RULE),
    # networks, Textual Inversion
    _flag("network_module", "network", nargs="*", status=RULE, note="network=lora (networks.lora, lycoris.kohya)"),
    _flag("network_weights", "network.loras", nargs="*", status=RULE, note="[{path: FILE, mul: M}, ...]"),
    _flag("network_mul", "network.loras", type=float, nargs="*", status=RULE, note="missing ones are 1"),
    _unsupported("network_args", "network arguments (block weights) are not in sdbatch yet", nargs="*"),
    _switch("network_show_meta", "network.show_meta"),
    _switch("network_merge", "network.mode", const="merge", status=RULE),
    _unsupported("network_merge_n_models", "merging only the first N networks is not in sdbatch yet "
                 "(--network_merge merges all)", type=int),
    _switch("network_pre_calc", "network.mode", const="precalc", status=RULE),
    _flag("network_regional_mask_max_color_codes", "regions.max_color_codes", type=int),
    _flag("textual_inversion_embeddings", "model.textual_inversion", nargs="*"),
    _flag("XTI_embeddings", "model.xti_embeddings", nargs="*", note="gen_img_diffusers.py's flag"),
    # ControlNet and guidance
    _flag("control_net_models", "guidance.models", nargs="*", status=RULE,
          note="guidance=controlnet; several: guidance.combine=alternate, as in gen_img"),
    _flag("control_net_preps", "guidance.preprocess", nargs="*", status=RULE),
    _flag("control_net_multipliers", "guidance.weights", type=float, nargs="*", status=RULE,
          aliases=("control_net_weights",)),
    _flag("control_net_ratios", "guidance.ratios", type=float, nargs="*", status=RULE),
    _unsupported("control_net_lllite_models", "ControlNet-LLLite works on SDXL only", nargs="*"),
    _flag("guide_image_path", "guidance.guide_image", nargs="*", status=RULE, note="one file or folder"),
    _unsupported("clip_guidance_scale", _DIFFUSERS_ONLY, type=float),
    _unsupported("clip_image_guidance_scale", _DIFFUSERS_ONLY, type=float),
    _unsupported("vgg16_guidance_scale", _DIFFUSERS_ONLY, type=float),
    _unsupported("vgg16_guidance_layer", _DIFFUSERS_ONLY, type=int, aliases=("vgg16_guidance_layerP",)),
    # Deep Shrink, Gradual Latent
    _flag("ds_depth_1", "deep_shrink.depth_1", type=int),
    _flag("ds_timesteps_1", "deep_shrink.timesteps_1", type=int),
    _flag("ds_depth_2", "deep_shrink.depth_2", type=int),
    _flag("ds_timesteps_2", "deep_shrink.timesteps_2", type=int),
    _flag("ds_ratio", "deep_shrink.ratio", type=float),
    _flag("gradual_latent_timesteps", "gradual_latent.timesteps", type=int),
    _flag("gradual_latent_ratio", "gradual_latent.ratio", type=float),
    _flag("gradual_latent_ratio_step", "gradual_latent.ratio_step", type=float),
    _flag("gradual_latent_every_n_steps", "gradual_latent.every_n_steps", type=int,
          aliases=("gradual_latent_ratio_every_n_steps",)),
    _flag("gradual_latent_s_noise", "gradual_latent.s_noise", type=float),
    _flag("gradual_latent_unsharp_params", "gradual_latent.unsharp", convert=_floats, note="'3,0.5,0.5,1' → list"),
    # memory and speed
    _flag("vae_batch_size", "perf.vae_batch_size", type=float, status=RULE, note="below 1: that share of batch_size"),
    _flag("vae_slices", "perf.vae_slices", type=int),
    _switch("no_half_vae", "model.no_half_vae"),
    _switch("xformers", "perf.attention", const="xformers", status=RULE),
    _switch("sdpa", "perf.attention", const="sdpa", status=RULE, note="--xformers wins; neither: sdpa"),
    _switch("diffusers_xformers", "perf.attention", const="xformers", status=RULE),
    _switch("opt_channels_last", "perf.channels_last"),
)

BY_NAME: MappingProxyType[str, Flag] = MappingProxyType({flag.name: flag for flag in FLAGS})


def is_given(flag: Flag, value: Any) -> bool:
    """Whether a parsed value was given on the command line (differs from the reference's default)."""
    return value is not None and value is not False and value != [] and value != flag.default


def lookup(spec: Any, key: str) -> Any:
    """The value at a dotted key of a run spec (`sampler.steps`; a group key reads its `name`); KeyError when
    the spec has no such attribute path."""
    value = spec
    for part in key.split("."):
        if not hasattr(value, part):
            raise KeyError(key)
        value = getattr(value, part)
    return value.name if hasattr(value, "name") and not isinstance(value, str) else value


def reference_args(spec: Any) -> dict[str, Any]:
    """The reference's `args` as far as a run spec tells them: each flag with a plain key reads it back (a switch
    is True when the key holds its value); flags without one keep the reference's default."""
    args = {}
    for flag in FLAGS:
        try:
            value = lookup(spec, flag.key) if flag.key else flag.default
        except KeyError:
            value = flag.default
        if flag.type is None:  # a switch: on when the key holds what it sets
            value = bool(flag.key) and str(value).lower() == str(flag.const).lower()  # model.v2 holds "true"
        elif flag.nargs and value is not None and not isinstance(value, list):
            value = flag.default  # a list flag whose key holds something else (network.loras entries)
        args[flag.name] = value
    return args

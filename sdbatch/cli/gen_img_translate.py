"""gen_img.py's parsed command line → sdbatch overrides: the generic table rows, then one rule per flag family.

The table (`sdbatch.config.gen_img_flags`) translates flags that map one to one; the rules here handle what it
cannot: flags that meet in one key (the network flags build `network.loras`), the reference's own defaults
(fp32, 512×512, stage-2 strength 0.8), its priorities (--from_file over --from_module over --prompt;
--interactive over all) and its combinations (a mask with unmerged networks is a region mask). The result is a
list of `Override`s, which sdbatch.cli.gen_img prints, saves as YAML or runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdbatch.config.gen_img_flags import BY_NAME, FLAGS, IGNORED, KEY, UNSUPPORTED, is_given
from sdbatch.errors import ConfigError

# network modules whose files sdbatch reads (it tells LoRA, LoCon, LoHa, LoKr and DoRA apart by their tensors)
NETWORK_MODULES = ("networks.lora", "networks.dylora", "lycoris.kohya")


@dataclass(frozen=True, slots=True)
class Override:
    """One sdbatch override: `key=value`, or a config group's option (`sampler=euler_a`) when `group`."""

    key: str
    value: Any
    group: bool = False


class Translation:
    """The overrides of one command line, and the notes (flags without effect, sources not used) to print."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.overrides: list[Override] = []
        self.notes: list[str] = []

    def given(self, name: str) -> bool:
        return is_given(BY_NAME[name], getattr(self.args, name))

    def set(self, key: str, value: Any, group: bool = False) -> None:
        self.overrides.append(Override(key, value, group))


def translate(args: argparse.Namespace) -> Translation:
    """The sdbatch overrides for parsed gen_img flags; ConfigError with one line per unsupported flag given."""
    unsupported = [f"--{flag.name} is not supported by sdbatch: {flag.note}" for flag in FLAGS
                   if flag.status == UNSUPPORTED and is_given(flag, getattr(args, flag.name))]
    if unsupported:
        raise ConfigError("\n".join(unsupported))
    out = Translation(args)
    for rule in _RULES:
        rule(out)
    return out


def _key_flags(out: Translation) -> None:
    """The table's one-to-one rows (always-emitted defaults included) and the notes of ignored flags given."""
    for flag in FLAGS:
        value = getattr(out.args, flag.name)
        if flag.status == IGNORED and out.given(flag.name):
            out.notes.append(f"--{flag.name} has no effect in sdbatch: {flag.note}")
        if flag.status != KEY or not (flag.always or out.given(flag.name)):
            continue
        if flag.type is None:
            value = flag.const
        out.set(flag.key, flag.convert(value) if flag.convert else value, flag.group)


def _model(out: Translation) -> None:
    """--ckpt (required) and the precision: gen_img runs fp32 unless --fp16 (first) or --bf16."""
    if not out.args.ckpt:
        raise ConfigError("--ckpt is required: a .safetensors/.ckpt file, a diffusers folder or builtin:tiny")
    out.set("model.checkpoint", out.args.ckpt)
    out.set("model.precision", "fp16" if out.args.fp16 else "bf16" if out.args.bf16 else "fp32")
    if out.args.xformers or out.args.diffusers_xformers:
        out.set("perf.attention", "xformers")
    elif out.args.sdpa:
        out.set("perf.attention", "sdpa")


def _sources(out: Translation) -> None:
    """One prompt source, by gen_img's priority: --interactive, then --from_file, --from_module, --prompt."""
    sources = [("interactive", "interactive", True), ("from_file", "prompt_file", None),
               ("from_module", "prompt_module", None), ("prompt", "prompt", None)]
    given = [(name, key, const) for name, key, const in sources if out.given(name)]
    if not given:
        if not out.given("image_path"):
            raise ConfigError("no prompt: give --prompt, --from_file, --from_module or --interactive")
        return  # img2img without a prompt: each image brings back its own
    (name, key, const), *unused = given
    out.set(key, const if const is not None else getattr(out.args, name))
    for other, _, _ in unused:
        out.notes.append(f"--{other} is not used: --{name} comes first, as in gen_img")


def _n_iter(out: Translation) -> None:
    """--n_iter, except in interactive mode, where gen_img makes each typed prompt once."""
    if out.given("n_iter") and out.args.interactive:
        out.notes.append("--n_iter is not used with --interactive (gen_img makes each prompt once)")
    elif out.given("n_iter"):
        out.set("n_iter", out.args.n_iter)


def _size(out: Translation) -> None:
    """txt2img: --W/--H or gen_img's 512. img2img: the image's own size unless both are given (then resized)."""
    width, height = out.args.W, out.args.H
    if out.given("image_path"):
        if width is not None and height is not None:
            out.set("width", width)
            out.set("height", height)
        elif width is not None or height is not None:
            out.notes.append("--W/--H: img2img keeps each image's size unless both are given, as in gen_img")
        return
    out.set("width", 512 if width is None else width)
    out.set("height", 512 if height is None else height)


def _highres(out: Translation) -> None:
    """--highres_fix_scale turns Highres. fix on; stage 2 runs at --strength (gen_img's default 0.8)."""
    names = ("highres_fix_steps", "highres_fix_save_1st", "highres_fix_latents_upscaling",
             "highres_fix_disable_control_net")
    if not out.given("highres_fix_scale"):
        out.notes.extend(f"--{name} has no effect without --highres_fix_scale" for name in names if out.given(name))
        return
    args = out.args
    out.set("highres", "on", group=True)
    out.set("highres.scale", args.highres_fix_scale)
    out.set("highres.steps", args.highres_fix_steps)
    out.set("highres.strength", 0.8 if args.strength is None else args.strength)
    if args.highres_fix_save_1st:
        out.set("highres.save_first_stage", True)
    if args.highres_fix_latents_upscaling:
        out.set("highres.latent_upscale", True)
        out.set("highres.latent_mode", "bicubic")
    if args.highres_fix_disable_control_net:
        out.set("highres.disable_controlnet", True)


def _networks(out: Translation) -> None:
    """--network_module/_weights/_mul → network=lora with one {path, mul} per file; merge or pre-calc; a mask
    with unmerged networks is the regional LoRA mask (gen_img's rule)."""
    args = out.args
    modules, files, muls = args.network_module or [], args.network_weights or [], args.network_mul or []
    if not modules:
        for name in ("network_weights", "network_mul", "network_merge", "network_pre_calc"):
            if out.given(name):
                raise ConfigError(f"--{name} needs --network_module networks.lora (one per file)")
        _mask(out, regional=False)
        return
    for module in modules:
        if module not in NETWORK_MODULES:
            raise ConfigError(f"--network_module {module} is not supported by sdbatch; it applies LoRA, LoCon, "
                              f"LyCORIS and DoRA files: {', '.join(NETWORK_MODULES)}")
    if len(files) != len(modules):
        raise ConfigError(f"--network_weights: give one file per --network_module ({len(modules)} module(s), "
                          f"{len(files)} file(s))")
    if args.network_merge and args.network_pre_calc:
        raise ConfigError("--network_merge and --network_pre_calc cannot be used together; choose one")
    out.set("network", "lora", group=True)
    out.set("network.loras", [{"path": path, "mul": muls[i] if i < len(muls) else 1.0}
                              for i, path in enumerate(files)])
    regional = not args.network_merge and out.given("mask_path")
    if args.network_merge:
        out.set("network.mode", "merge")
    elif args.network_pre_calc and not regional:  # gen_img turns pre-calc off for regional LoRA
        out.set("network.mode", "precalc")
    _mask(out, regional)


def _mask(out: Translation, regional: bool) -> None:
    if not out.given("mask_path"):
        return
    if regional:
        out.set("network.regional", True)
        out.set("regions.mask", out.args.mask_path)
    else:
        out.set("mask_image", out.args.mask_path)


def _controlnet(out: Translation) -> None:
    """--control_net_* → guidance=controlnet; gen_img alternates several models step by step."""
    args = out.args
    names = ("control_net_preps", "control_net_multipliers", "control_net_ratios", "guide_image_path")
    if not out.given("control_net_models"):
        out.notes.extend(f"--{name} has no effect without --control_net_models" for name in names if out.given(name))
        return
    guides = args.guide_image_path or []
    if len(guides) != 1:
        raise ConfigError(f"--guide_image_path: give one image or one folder of images (got {len(guides)}); "
                          "sdbatch uses a folder's images in turn")
    out.set("guidance", "controlnet", group=True)
    out.set("guidance.models", list(args.control_net_models))
    out.set("guidance.guide_image", guides[0])
    for name, key in (("control_net_preps", "guidance.preprocess"), ("control_net_multipliers", "guidance.weights"),
                      ("control_net_ratios", "guidance.ratios")):
        if out.given(name):
            out.set(key, list(getattr(args, name)))
    if len(args.control_net_models) > 1:
        out.set("guidance.combine", "alternate")


def _vae_batch(out: Translation) -> None:
    """--vae_batch_size: a count from 1 up, below 1 a share of --batch_size (at least one image)."""
    value = out.args.vae_batch_size
    if value is None:
        return
    if value <= 0:
        raise ConfigError(f"--vae_batch_size must be positive, got {value}")
    out.set("perf.vae_batch_size", int(value) if value >= 1 else max(1, int(out.args.batch_size * value)))


_RULES: tuple[Callable[[Translation], None], ...] = (
    _model, _sources, _n_iter, _size, _key_flags, _highres, _networks, _controlnet, _vae_batch)

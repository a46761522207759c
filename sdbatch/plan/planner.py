"""RunSpec + prompt lines → one ImageJob per image: options, dynamic prompts, seeds and file names."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from sdbatch.config.feature_schema import given_or as _given
from sdbatch.config.grid_axes import SEED_LIMIT, image_problem
from sdbatch.config.sampler_registry import effective_schedule
from sdbatch.config.spec import FeatureSettings, NetworkConfig, RunSpec, complete_muls, image_features
from sdbatch.errors import ConfigError, PromptError
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.couple import split_parts
from sdbatch.prompts.dynamic import Wildcards, enumerate_variants, expand
from sdbatch.prompts.extra_networks import plain_text
from sdbatch.prompts.init_images import image_size
from sdbatch.prompts.sources import PromptLine
from sdbatch.prompts.syntax import OFF, LineOptions, Off, ParsedLine, parse_line

log = logging.getLogger(__name__)


def random_base_seed() -> int:
    """A fresh base seed for a run whose `seed` is null (it is recorded, so the run can be redone)."""
    return random.SystemRandom().randrange(SEED_LIMIT)


# A file name may take 255 bytes (ext4, xfs, btrfs, APFS, NTFS); the image is first written as ".NAME.PID.tmp"
# (outputs.files.atomic_write), up to 13 bytes more, so an image's name may take 242 bytes, numbering included.
MAX_NAME_BYTES = 255 - len("..4194304.tmp")
# Files the run directory holds besides the images: an image with such a name would overwrite it (or be
# overwritten: the grid is written last). Compared case-insensitively (macOS and Windows file systems).
_RESERVED_NAMES = ("config.yaml", "manifest.jsonl", "job.json", "grid.png")
_RESERVED_PATTERN = re.compile(r"grid-z[0-9]+\.png", re.IGNORECASE)  # the grid sheets of a z axis


@dataclass(frozen=True, slots=True)
class _Line:
    """A parsed prompt line with the run's default negative prompt and its init image (img2img)."""

    parsed: ParsedLine
    default_negative: str
    parsed_init: str | None = None
    init_size: tuple[int, int] | None = None  # the init image's (width, height)
    parsed_mask: str | None = None  # inpainting: the init image's mask


def parse_lines(spec: RunSpec, lines: list[PromptLine]) -> list[_Line]:
    """Parse every line's in-prompt options; with on_error=skip a bad line is dropped with a warning."""
    parsed = []
    for line in lines:
        try:
            one = parse_line(line.text, line.origin)
            init_size = _init_size(spec, one, line.init_image) if line.init_image else None
            if line.mask_image:
                _check_mask(line.mask_image, line.init_image)
            _warn_unused_multipliers(spec, one)
            _check_given_name(one)
            split_parts(one.prompt, one.origin)  # an empty AND part fails here, naming the line
            parsed.append(_Line(one, line.negative, line.init_image, init_size, line.mask_image))
        except PromptError as ex:
            if spec.on_error != "skip":
                raise
            log.warning("skipped: %s <on_error=skip>", ex)
    return parsed


def plan(spec: RunSpec, lines: list[PromptLine], base_seed: int, *, start: int = 0,
         taken: set[str] | None = None) -> list[ImageJob]:
    """Every image of the run in order: n_iter passes over the lines, images_per_prompt per prompt variant.

    Image k of the run gets seed base_seed + k (A1111 style) unless the line gives seeds with --d or
    iter_same_seed is set, so any image can be redone alone from its recorded seed. `start` and
    `taken` continue the numbering and names of earlier images (interactive mode).
    """
    parsed = parse_lines(spec, lines)
    if spec.shuffle_prompts:
        random.Random(base_seed).shuffle(parsed)
    wildcards = Wildcards(Path(spec.prompts.wildcards_dir) if spec.prompts.wildcards_dir else None)
    jobs: list[ImageJob] = []
    names = taken if taken is not None else set()
    line_counts: dict[int, int] = {}
    for pass_index in range(spec.n_iter):
        for number, line in enumerate(parsed):
            for variant in enumerate_variants(line.parsed.prompt, wildcards, origin=line.parsed.origin):
                for _ in range(spec.images_per_prompt):
                    index, nth = start + len(jobs), line_counts.get(number, 0)
                    line_counts[number] = nth + 1
                    seed = _seed(spec, line.parsed, base_seed, index, pass_index, nth)
                    name = _unique(_file_name(spec, line, index, seed, nth), names, line.parsed.origin)
                    jobs.append(_job(spec, line, variant, wildcards, index, seed, name))
    return jobs


def _seed(spec: RunSpec, line: ParsedLine, base_seed: int, index: int, pass_index: int, nth: int) -> int:
    seeds = line.options.seeds
    if seeds:
        if nth < len(seeds):
            return seeds[nth]
        if nth == len(seeds):
            log.warning("%s: more images than --d seeds (%d); the rest get derived seeds", line.origin, len(seeds))
    if spec.iter_same_seed:
        return (base_seed + pass_index) % SEED_LIMIT
    return (base_seed + index) % SEED_LIMIT


def file_name(naming: str, index: int, seed: int, suffix: str = ".png") -> str:
    """Deterministic names (no timestamps), so a re-run finds the images it already made."""
    if naming == "sequential":
        return f"im_{index + 1:06d}{suffix}"
    return f"{index:05d}-{seed}{suffix}"


def image_suffix(spec: RunSpec) -> str:
    """The images' file suffix: output.format's (".png", ".webp", ".jpg")."""
    return f".{spec.output.format}"


def _file_name(spec: RunSpec, line: _Line, index: int, seed: int, nth: int) -> str:
    """--f names a line's images (stem, stem-1, stem-2, ...); otherwise the run's naming scheme. A --f name's
    .png becomes output.format's suffix."""
    given = line.parsed.options.file_name
    if not given and spec.output.naming == "original" and line.parsed_init:
        given = Path(line.parsed_init).stem
    if not given:
        return file_name(spec.output.naming, index, seed, image_suffix(spec))
    stem = given[:-4] if given.lower().endswith(".png") else given
    return f"{stem}{image_suffix(spec)}" if nth == 0 else f"{stem}-{nth}{image_suffix(spec)}"


def _unique(name: str, taken: set[str], origin: str = "") -> str:
    """Never overwrite another image of the run, or the run's own files: a clash gets a numbered suffix.

    A name longer than MAX_NAME_BYTES (with its numbering) is a PromptError naming the line: refused when
    planning, not after the image is made.
    """
    stem, dot, ext = name.rpartition(".")
    candidate, n = name, 1
    while candidate in taken or reserved_name(candidate):
        candidate, n = f"{stem}_{n}{dot}{ext}", n + 1
    if len(candidate.encode("utf-8")) > MAX_NAME_BYTES:
        raise PromptError(f"{origin or candidate}: the file name {_short_name(candidate)} takes "
                          f"{len(candidate.encode('utf-8'))} bytes with its numbering; file systems allow "
                          f"{MAX_NAME_BYTES} here (255 less the temporary name): shorten --f")
    taken.add(candidate)
    return candidate


def reserved_name(name: str) -> bool:
    """Whether an image called `name` would clash with a file of the run directory (config.yaml, grid.png, ...)."""
    return name.lower() in _RESERVED_NAMES or _RESERVED_PATTERN.fullmatch(name) is not None


def _check_given_name(line: ParsedLine) -> None:
    """A --f name that is a file of the run directory, or too long even before numbering, is refused now."""
    given = line.options.file_name
    if not given:
        return
    if reserved_name(given):
        raise PromptError(f"{line.origin}: --f {given} is the name of a file the run directory holds besides the "
                          "images (config.yaml, manifest.jsonl, grid.png, grid-zN.png); choose another name")
    size = len(given.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise PromptError(f"{line.origin}: --f {_short_name(given)} is {size} bytes long; a file name may take "
                          f"{MAX_NAME_BYTES} bytes here (255 less the temporary name, numbering included): shorten it")


def _short_name(name: str, limit: int = 40) -> str:
    return repr(name) if len(name) <= limit else repr(name[: limit - 12] + "..." + name[-9:])


def _job(spec: RunSpec, line: _Line, variant: str, wildcards: Wildcards, index: int, seed: int,
         name: str) -> ImageJob:
    opts, sampler, origin = line.parsed.options, spec.sampler, line.parsed.origin
    negative = opts.negative if opts.negative is not None else line.default_negative
    width, height = _size(spec, line)
    job = ImageJob(
        index=index, file_name=name, seed=seed,
        prompt=expand(variant, seed, wildcards, origin=origin),
        negative_prompt=expand(negative, seed, wildcards, origin=origin),
        width=width, height=height, init_image=line.parsed_init, mask_image=line.parsed_mask,
        steps=_given(opts.steps, sampler.steps), cfg_scale=_given(opts.cfg_scale, sampler.cfg_scale),
        sampler=sampler.name, schedule=effective_schedule(sampler.name, sampler.schedule), eta=sampler.eta,
        origin=origin, raw_prompt=line.parsed.raw,
        negative_scale=_negative_scale(opts.negative_scale, sampler.negative_scale),
        strength=_given(opts.strength, spec.strength) if line.parsed_init else opts.strength,
        network_muls=network_muls(opts.network_muls, spec.network), clip_prompt=opts.clip_prompt,
    )
    if spec.guided.kind == "clip":
        job = dataclasses.replace(job, guided_text=opts.clip_prompt or plain_text(job.prompt))
    job = dataclasses.replace(job, features=_features(spec, opts, job))
    _check_image(spec, line, job)
    return job


def _check_image(spec: RunSpec, line: _Line, job: ImageJob) -> None:
    """The image's final settings (the line's --s --w --h --l --t over the run's) get the run's own checks."""
    problem = image_problem(job.sampler, job.steps, job.width, job.height, cfg_scale=job.cfg_scale,
                            strength=job.strength if job.init_image else None, highres=job.highres,
                            max_pixels=spec.perf.max_pixels)
    if problem is None:
        return
    own_size = line.init_size is not None and None in (line.parsed.options.width, line.parsed.options.height)
    if "width" in problem[1] and own_size:
        raise PromptError(f"{job.origin}: init image {job.init_image}: {problem[0]} (or set width and height)")
    raise PromptError(f"{job.origin}: {problem[0]}")


def _features(spec: RunSpec, line: LineOptions, job: ImageJob) -> FeatureSettings:
    """The image's per-image feature settings: each feature's run config over the line's overrides (the
    LineOptions field named after the feature, if the line can set any)."""
    return FeatureSettings({name: settings for name in image_features(spec)
                            if (settings := getattr(spec, name).for_image(getattr(line, name, None), job)) is not None})


def network_muls(given: tuple[float, ...] | None, network: NetworkConfig) -> tuple[float, ...] | None:
    """One multiplier per network: --am values (the last one repeated for the rest, extras dropped, as in the
    reference), else network.muls or each file's mul; merge mode always uses the run's. None: no networks."""
    if not network.loras:
        return None
    if given is None or network.mode == "merge":
        return network.multipliers()
    return complete_muls(given, len(network.loras))


def _warn_unused_multipliers(spec: RunSpec, line: ParsedLine) -> None:
    given, network = line.options.network_muls, spec.network
    if given is None:
        return
    if not network.loras:
        log.warning("%s: --am is ignored: no networks (network=lora network.loras=...)", line.origin)
    elif network.mode == "merge":
        log.warning("%s: --am is ignored: network.mode=merge merges the run's multipliers once; use hooked or "
                    "precalc for per-prompt multipliers", line.origin)
    elif len(given) > len(network.loras):
        log.warning("%s: --am has %d values for %d network(s); the extra ones are ignored", line.origin,
                    len(given), len(network.loras))


def _negative_scale(option: float | Off | None, default: float | None) -> float | None:
    """--nl N, --nl none (off for this line), or sampler.negative_scale."""
    if option is OFF:
        return None
    return default if option is None else option


def _size(spec: RunSpec, line: _Line) -> tuple[int, int]:
    """--w/--h, else width/height, else the init image's size (rounded down to a multiple of 8), else the model's
    default size (model.default_size: 512; model=tiny: 128)."""
    opts = line.parsed.options
    own_w, own_h = line.init_size or (spec.model.default_size, spec.model.default_size)
    return _given(opts.width, _given(spec.width, own_w)), _given(opts.height, _given(spec.height, own_h))


def _init_size(spec: RunSpec, parsed: ParsedLine, init: str) -> tuple[int, int]:
    """The init image's size as multiples of 8, warning once per line when rounding changes it."""
    size = image_size(Path(init))
    rounded = (size[0] // 8 * 8, size[1] // 8 * 8)
    if min(rounded) == 0:
        raise ConfigError(f"init_image {init} is {size[0]}x{size[1]}: too small; give width and height")
    explicit = (_given(parsed.options.width, spec.width), _given(parsed.options.height, spec.height))
    if rounded != size and None in explicit:
        log.warning("%s: init image %s is %dx%d; using %dx%d (multiples of 8) <width, height>", parsed.origin,
                    Path(init).name, *size, *rounded)
    return rounded


def _check_mask(mask: str, init: str | None) -> None:
    """A readable mask image, warned about when its aspect ratio differs from its init image's."""
    if init is None:
        raise ConfigError(f"mask_image {mask} needs an init image to inpaint; set init_image too <mask_image>")
    (mw, mh), (iw, ih) = image_size(Path(mask), "mask_image"), image_size(Path(init))
    if abs(mw / mh - iw / ih) > 0.01:
        log.warning("mask %s (%dx%d) has another aspect ratio than init image %s (%dx%d); it is resized "
                    "(stretched) to the image <mask_image>", mask, mw, mh, init, iw, ih)

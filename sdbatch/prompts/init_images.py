"""img2img inputs: init_image file or folder → image paths in natural order, their sizes and stored prompts."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdbatch.errors import ConfigError
from sdbatch.prompts.comfyui import Ambiguous, comfyui_prompt, is_comfyui
from sdbatch.prompts.png_info import image_text, parse_infotext, sdbatch_record
from sdbatch.prompts.sources import PromptLine

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def natural_key(path: Path) -> list:
    """Sort key that puts 2.png before 10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(source: str, key: str = "init_image") -> list[Path]:
    """The image files `source` names: one file, or a folder's images in natural order."""
    path = Path(source).expanduser()
    if path.is_dir():
        images = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        if not images:
            others = sorted(p.name for p in path.iterdir())
            found = f"only {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}" if others else "nothing"
            raise ConfigError(f"{key} folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}), {found}")
        return images
    if not path.is_file():
        found = "is not a regular file or folder" if path.exists() else "does not exist"
        raise ConfigError(f"{key} {path} {found}; give an image file or a folder of images")
    return [path]


def image_size(path: Path, key: str = "init_image") -> tuple[int, int]:
    """(width, height) of an image file, checked to be a readable image."""
    try:
        with Image.open(path) as image:
            image.verify()
            return image.size
    except (OSError, UnidentifiedImageError) as ex:
        raise ConfigError(f"{key} {path} is not a readable image: {ex}") from None


def prompt_from_image(path: Path, negative: str) -> PromptLine | None:
    """The prompt an image was made with: sdbatch's record, A1111's infotext (PNG chunk or JPEG/WebP EXIF),
    a ComfyUI graph, or the reference tool's keys; None when it has none, or an ambiguous ComfyUI graph (warned).

    For sdbatch's own images the size, steps, CFG scale and seed come back too, as in-prompt options (size and
    steps not for a Highres. fix stage-1 image: img2img on it with the run's size is that fix's stage 2).
    """
    try:
        text = image_text(path)
    except OSError:
        return None
    origin = f"{path.name}:metadata"
    params = sdbatch_record(path, text)
    if params is not None:
        options = f" --l {params['cfg_scale']} --d {params['seed']}"
        if params.get("stage") != 1:  # a Highres. fix stage-1 image is upscaled: the run's size and steps apply
            options = f" --w {params['width']} --h {params['height']} --s {params['steps']}" + options
        return PromptLine(params["prompt"] + options, params.get("negative_prompt", negative), origin)
    if "parameters" in text:
        info = parse_infotext(text["parameters"])
        return PromptLine(info.get("Prompt", ""), info.get("Negative prompt", negative), origin)
    if is_comfyui(text):  # its `prompt` chunk is a JSON graph, never prompt text
        return _comfyui_line(path, text, negative, origin)
    if "prompt" in text:  # the reference tool's keys
        return PromptLine(text["prompt"], text.get("negative-prompt", negative), origin)
    return None


def _comfyui_line(path: Path, text: dict[str, str], negative: str, origin: str) -> PromptLine | None:
    try:
        positive, stored_negative = comfyui_prompt(text)
    except Ambiguous as ex:
        log.warning("init_image %s: ComfyUI image whose prompt cannot be read back: %s; its prompt is not used",
                    path, ex)
        return None
    return PromptLine(positive, stored_negative or negative, origin)


def pair_with_images(lines: list[PromptLine], images: list[Path]) -> list[tuple[PromptLine, Path]]:
    """Prompt lines and init images in turn; the shorter list is cycled (one prompt × a folder = every image)."""
    count = max(len(lines), len(images))
    if len(lines) > len(images) > 1:
        log.warning("%d prompt lines but %d init images: the images are used in turn (cycled) <init_image>",
                    len(lines), len(images))
    return [(lines[i % len(lines)], images[i % len(images)]) for i in range(count)]

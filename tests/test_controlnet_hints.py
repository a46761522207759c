"""ControlNet hints: canny edges and thresholds, invert, none = LANCZOS resize, plug-ins, missing OpenCV, bad guide
images, the hint tensor against diffusers' ControlNet pipeline, and the hint cache."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdbatch.config.guidance_schema import EXTRA, parse_preprocess
from sdbatch.engine.guide.hints import hint_image, hint_tensor, preprocess
from sdbatch.errors import ConfigError

torch.set_num_threads(1)

KEY = "guidance.preprocess[1]"
FILE_KEY = "guidance.guide_image"
LO, HI = 16, 47  # the test square's first and last pixel, both ways


def _square(grey: int = 255, size: int = 64) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[LO : HI + 1, LO : HI + 1] = grey
    return Image.fromarray(pixels, "RGB")


def _noise(width: int = 100, height: int = 60, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8), "RGB")


def _white(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0] == 255  # (H, W) bool


def test_canny_finds_the_four_edges_of_a_square_and_nothing_else() -> None:
    white = _white(preprocess(_square(), parse_preprocess("canny", KEY), KEY))
    near = np.zeros_like(white)
    near[LO - 1 : HI + 2, LO - 1 : HI + 2] = True  # within 1 px of the border, outside or in
    near[LO + 2 : HI - 1, LO + 2 : HI - 1] = False
    assert white.any() and not (white & ~near).any()
    side = slice(LO + 1, HI)  # each side's length, corners aside
    for band in (white[LO - 1 : LO + 2, side], white[HI - 1 : HI + 2, side],
                 white[side, LO - 1 : LO + 2].T, white[side, HI - 1 : HI + 2].T):
        assert band.any(axis=0).mean() >= 0.9


def test_canny_output_is_rgb_with_equal_channels_of_0_or_255() -> None:
    hint = preprocess(_noise(64, 64), parse_preprocess("canny", KEY), KEY)
    pixels = np.asarray(hint)
    assert hint.mode == "RGB" and hint.size == (64, 64)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert set(np.unique(pixels)) <= {0, 255} and (pixels == 255).any()


def test_canny_thresholds_are_honoured() -> None:
    # Sobel |gx| + |gy| of a grey-30 step: 120 along a side, 180 at a corner; so no pixel reaches 191
    faint = _square(grey=30)
    assert not _white(preprocess(faint, parse_preprocess("canny_63_191", KEY), KEY)).any()
    assert not _white(preprocess(faint, parse_preprocess("canny", KEY), KEY)).any()  # 63/191 by default
    assert _white(preprocess(faint, parse_preprocess("canny_10_30", KEY), KEY)).any()


def test_invert_is_255_minus_x_and_its_own_inverse() -> None:
    image, invert = _noise(), parse_preprocess("invert", KEY)
    once = preprocess(image, invert, KEY)
    assert np.array_equal(np.asarray(once), 255 - np.asarray(image))
    assert np.array_equal(np.asarray(preprocess(once, invert, KEY)), np.asarray(image))


def test_none_is_the_lanczos_resize_of_the_rgb_image(tmp_path) -> None:
    path = tmp_path / "guide.png"
    _noise().convert("RGBA").save(path)
    hint = hint_image(str(path), parse_preprocess("none", KEY), 64, 48, FILE_KEY)
    expected = _noise().resize((64, 48), Image.Resampling.LANCZOS)
    assert hint.mode == "RGB" and np.array_equal(np.asarray(hint), np.asarray(expected))
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    assert np.array_equal(np.asarray(hint), np.asarray(processor.resize(_noise(), 48, 64)))  # diffusers' resize


def test_exif_orientation_is_applied(tmp_path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to show
    Image.fromarray(pixels, "RGB").save(tmp_path / "photo.png", exif=exif)
    hint = np.asarray(hint_image(str(tmp_path / "photo.png"), parse_preprocess("none", KEY), 16, 32, FILE_KEY))
    assert tuple(hint[2, 8]) == (255, 0, 0) and tuple(hint[29, 8]) == (0, 0, 255)  # now red on top


PLUGIN = '''
from PIL import Image, ImageOps

def mirror(image):
    return ImageOps.mirror(image)

def shrink(image):
    return image.convert("L").resize((16, 16))

def boom(image):
    raise RuntimeError("no edges today")

def nothing(image):
    return None
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    name = "sdbatch_test_hint_plugin"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_plugin_is_called_and_its_output_used(plugin_module) -> None:
    image = _noise(64, 48)
    hint = preprocess(image, parse_preprocess(f"{plugin_module}:mirror", KEY), KEY)
    assert np.array_equal(np.asarray(hint), np.asarray(image)[:, ::-1])


def test_plugin_output_of_another_size_is_resized_back_as_rgb(plugin_module) -> None:
    hint = preprocess(_noise(64, 48), parse_preprocess(f"{plugin_module}:shrink", KEY), KEY)
    assert hint.mode == "RGB" and hint.size == (64, 48)


@pytest.mark.parametrize(("function", "message"), [("boom", "RuntimeError: no edges today"),
                                                    ("nothing", "returned NoneType, not a PIL image"),
                                                    ("missing", "cannot be loaded")])
def test_a_failing_plugin_is_a_config_error_naming_the_key(plugin_module, function, message) -> None:
    prep = parse_preprocess(f"{plugin_module}:{function}", KEY)
    with pytest.raises(ConfigError, match=re.escape(KEY)) as error:
        preprocess(_noise(), prep, KEY)
    assert message in str(error.value) and f"{plugin_module}:{function}" in str(error.value)


def test_canny_without_opencv_names_the_key_and_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(ConfigError) as error:
        preprocess(_square(), parse_preprocess("canny_100_200", KEY), KEY)
    assert str(error.value) == f"{KEY}=canny_100_200: canny needs OpenCV; {EXTRA}"
    assert "pip install 'sdbatch[controlnet]'" in str(error.value)


@pytest.mark.parametrize("setup", ["missing", "folder", "truncated", "garbage"])
def test_bad_guide_image_is_a_config_error_naming_key_and_file(tmp_path, setup) -> None:
    path = tmp_path / "guide.png"
    if setup == "folder":
        path.mkdir()
    if setup in ("truncated", "garbage"):
        _noise(256, 256).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if setup == "truncated" else b"not an image at all")
    with pytest.raises(ConfigError) as error:
        hint_image(str(path), parse_preprocess("none", KEY), 64, 64, FILE_KEY)
    message = str(error.value)
    assert FILE_KEY in message and str(path) in message and "\n" not in message


def test_hint_tensor_is_what_the_controlnet_pipeline_feeds_the_controlnet() -> None:
    images = [_noise(64, 48, seed=3), _square(size=64).resize((64, 48)).convert("L")]
    # prepare_image itself, on a stand-in `self` holding the processor as StableDiffusionControlNetPipeline builds it
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    pipe = SimpleNamespace(control_image_processor=processor)
    for dtype in (torch.float32, torch.bfloat16):
        expected = StableDiffusionControlNetPipeline.prepare_image(pipe, images, 64, 48, 2, 1, "cpu", dtype)
        got = hint_tensor(images, "cpu", dtype)
        assert got.shape == (2, 3, 48, 64) and got.dtype == dtype and torch.equal(got, expected)
    pixels = hint_tensor(images, "cpu", torch.float32)
    assert pixels.min() == 0 and pixels.max() == 1  # [0, 1], not the VAE's [-1, 1]


def test_hints_are_cached_until_the_file_changes(tmp_path, monkeypatch) -> None:
    path, prep = tmp_path / "guide.png", parse_preprocess("canny", KEY)
    _square().save(path)
    opens = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(a[0]) or real_open(*a, **k))
    first = hint_image(str(path), prep, 64, 64, FILE_KEY)
    first.paste((9, 9, 9), (0, 0, 64, 64))  # the caller's copy: drawing on it leaves the cache alone
    again = hint_image(str(path), prep, 64, 64, FILE_KEY)
    assert len(opens) == 1 and _white(again).any()
    hint_image(str(path), prep, 32, 32, FILE_KEY)  # another size is another hint
    assert len(opens) == 2
    Image.new("RGB", (64, 64)).save(path)  # all black: no edges
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = hint_image(str(path), prep, 64, 64, FILE_KEY)
    assert len(opens) == 3 and not _white(changed).any()
    assert Path(opens[-1]) == path.resolve()

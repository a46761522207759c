"""decode_sliced (perf.vae_slices) gives vae.decode's pixels while convolving full-resolution tensors in bands."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from sdbatch.engine.vae.decode import to_pil
from sdbatch.engine.vae.slicing import decode_sliced

torch.set_num_threads(1)

SLICES = (1, 2, 3, 7, 64)  # 64 exceeds every band height here: clamped to one row per band
LATENT_SIZES = ((8, 13), (13, 8), (1, 1), (3, 5))  # odd sizes make uneven bands and single-row bands


@pytest.fixture(scope="module")
def sd_vae() -> AutoencoderKL:
    """SD's VAE layout (4 levels, 3 resnets per up block, a shortcut conv) at small widths, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae = AutoencoderKL(
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
        )
        with torch.no_grad():  # default init leaves GroupNorm at 1/0, which would hide a wrong norm affine
            for param in vae.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return vae.eval()


@pytest.fixture(params=["sd1_tiny", "sd_layout"])
def vae(request, sd1_components, sd_vae) -> AutoencoderKL:
    return sd1_components[1] if request.param == "sd1_tiny" else sd_vae


def _latents(h: int, w: int) -> torch.Tensor:
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * 100 + w))


@pytest.mark.parametrize("size", LATENT_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sliced_decode_matches_decode(vae, size, caplog):
    z = _latents(*size)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
    expected_images = np.stack([np.asarray(im, dtype=np.int16) for im in to_pil(expected)])
    for n in SLICES:
        with caplog.at_level(logging.WARNING):
            pixels = decode_sliced(vae, z, n)
        assert not caplog.records, "fell back to vae.decode: the sliced walk did not run"
        assert pixels.shape == expected.shape and pixels.dtype == expected.dtype
        torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0, msg=lambda m, n=n: f"slices={n}: {m}")
        images = np.stack([np.asarray(im, dtype=np.int16) for im in to_pil(pixels)])
        assert np.abs(images - expected_images).max() <= 1, f"slices={n}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_decode(sd1_components, dtype):
    """GroupNorm runs in fp32 and is cast back: the images match decode's, whose CPU fp16 norm rounds differently."""
    vae = copy.deepcopy(sd1_components[1]).to(dtype)
    z = _latents(8, 13).to(dtype)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
    pixels = decode_sliced(vae, z, 3)
    assert pixels.dtype == dtype
    torch.testing.assert_close(pixels.float(), expected.float(), atol=1e-2, rtol=0)
    images = [np.asarray(im, dtype=np.int16) for im in to_pil(pixels)]
    expected_images = [np.asarray(im, dtype=np.int16) for im in to_pil(expected)]
    assert max(np.abs(a - b).max() for a, b in zip(images, expected_images, strict=True)) <= 1


@pytest.mark.parametrize("n", SLICES)
def test_full_resolution_convs_only_see_bands(sd_vae, n):
    """Each full-resolution 3x3 conv (up blocks, conv_out) is fed at most ceil(H/n) rows plus a halo row each side."""
    decoder = sd_vae.decoder
    convs = [m for m in decoder.up_blocks.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    heights: list[int] = []
    handles = [c.register_forward_pre_hook(lambda _, args: heights.append(args[0].shape[2]))
               for c in [*convs, decoder.conv_out]]
    try:
        pixels = decode_sliced(sd_vae, _latents(13, 8), n)
    finally:
        for handle in handles:
            handle.remove()
    height = pixels.shape[2]  # 104
    assert heights
    if n == 1:
        assert max(heights) == height
    else:
        assert max(heights) <= math.ceil(height / n) + 2 < height


@pytest.mark.parametrize("patch", ["time_embedding_norm", "upsample", "padding_mode"])
def test_unknown_decoder_falls_back_to_decode(sd_vae, patch, caplog):
    """Something the walk does not know: decode whole with a warning (each patch keeps vae.decode working)."""
    vae = copy.deepcopy(sd_vae)
    resnet = vae.decoder.up_blocks[1].resnets[0]
    if patch == "time_embedding_norm":
        resnet.time_embedding_norm = "ada_group"  # unknown to us; ResnetBlock2D treats it as plain norm2
    elif patch == "upsample":
        resnet.upsample = nn.Identity()  # a resampling resnet
    else:
        vae.decoder.conv_out.padding_mode = "reflect"  # changes the pixels: a walk that missed it would not match
    z = _latents(8, 13)
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
    with caplog.at_level(logging.WARNING, logger="sdbatch.engine.vae.slicing"):
        pixels = decode_sliced(vae, z, 4)
    torch.testing.assert_close(pixels, expected, atol=0, rtol=0)
    assert len(caplog.records) == 1 and "perf.vae_slices=4" in caplog.text


def test_rejects_zero_slices(sd_vae):
    with pytest.raises(ValueError, match="num_slices must be >= 1, got 0"):
        decode_sliced(sd_vae, _latents(1, 1), 0)

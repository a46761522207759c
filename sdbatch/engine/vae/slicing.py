"""Sliced VAE decode (perf.vae_slices): vae.decode's exact maths, with every full-resolution conv run in bands.

GroupNorm needs statistics over the whole image, so norms run whole (in fp32, on the CPU when the VAE is on an
accelerator); every conv after them runs over horizontal bands, each with the halo rows its kernel reads from
the neighbouring bands, and the output rows computed against the band's own zero padding are cropped. Bands
therefore give the same pixels as one whole-image conv, while the accelerator only ever holds one band.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

log = logging.getLogger(__name__)

Rows = Callable[[int, int], torch.Tensor]  # rows [lo, hi) of a conv's input, already on the conv's device
# Element-wise activations diffusers' get_activation builds: applying them per band changes nothing.
_ELEMENTWISE = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)
# time_embedding_norm values for which ResnetBlock2D.forward, with temb None, is plain norm2. Decoder builds its
# up-block resnets with "group" (its norm_type) and its mid block with "default"; any other value falls back.
_NORM2_ONLY = ("default", "group")


@torch.no_grad()
def decode_sliced(vae: AutoencoderKL, z: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Exactly what ``vae.decode(z, return_dict=False)[0]`` returns (z already divided by scaling_factor).

    Computed so that no full-resolution tensor is ever on the VAE's device except the bands being convolved:
    full activations live on the CPU when the VAE is elsewhere. The result is on the VAE's device, as decode's.
    ``num_slices`` 1 runs the same maths unsliced; more bands than rows are clamped to one row per band.
    A decoder this walk does not know is decoded whole by ``vae.decode``, with a warning.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    reason = _unsupported(vae, z)
    if reason is not None:
        log.warning("VAE decoded whole, not in slices: %s <perf.vae_slices=%d>", reason, num_slices)
        return vae.decode(z, return_dict=False)[0]
    bands = _Bands(vae.device, num_slices)
    decoder = vae.decoder
    # 1. Latent resolution: small, and the mid block's attention is global, so it runs whole on the device.
    x = z.to(vae.device)
    if getattr(vae, "post_quant_conv", None) is not None:  # absent when config.use_post_quant_conv is false
        x = vae.post_quant_conv(x)
    x = decoder.conv_in(x)
    x = decoder.mid_block(x, None)  # (B, C, h, w); temb None as in Decoder.forward for AutoencoderKL
    # Older Decoders (and MaskConditionDecoder still) cast to the up blocks' dtype here, for half-upcast VAEs;
    # a no-op whenever the dtypes agree, which diffusers 0.42's Decoder, without the cast, requires anyway.
    x = x.to(next(decoder.up_blocks.parameters()).dtype)
    # 2. Up blocks: full activations on the offload device, convs in bands.
    x = x.to(bands.offload)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x, bands)
        for upsampler in block.upsamplers or ():
            x = _upsample(upsampler, x, bands)
    # 3. Out: norm whole, activation and conv per band.
    x = bands.norm(decoder.conv_norm_out, x)
    x = bands.conv(decoder.conv_out, x.shape[2], bands.rows(x, decoder.conv_act))  # (B, 3, H, W)
    return x.to(vae.device)


class _Bands:
    """Where full activations live (offload) and where bands are convolved (device), and how many bands."""

    def __init__(self, device: torch.device, num_slices: int) -> None:
        self.device = device
        # On the CPU the offload device is the device itself, so every .to() below is a no-op, not a copy.
        self.offload = torch.device("cpu")
        self.num_slices = num_slices

    def norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm over the whole image on the offload device, in fp32: fp16 GroupNorm is unsupported or slow
        on the CPU, and an accelerator's fp16 GroupNorm accumulates in fp32 too."""
        weight = None if norm.weight is None else norm.weight.to(self.offload, torch.float32)
        bias = None if norm.bias is None else norm.bias.to(self.offload, torch.float32)
        return F.group_norm(x.float(), norm.num_groups, weight, bias, norm.eps).to(x.dtype)

    def rows(self, x: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Rows:
        """Rows of the offloaded ``x``, moved to the device and passed through the element-wise ``prepare``."""
        def rows(lo: int, hi: int) -> torch.Tensor:
            band = x[:, :, lo:hi].to(self.device)
            return band if prepare is None else prepare(band)
        return rows

    def conv(self, conv: nn.Conv2d, height: int, rows: Rows) -> torch.Tensor:
        """``conv`` over an input of ``height`` rows, in bands of output rows; the result is on the offload device.

        Output row r reads input rows r - p .. r - p + k - 1, so a band of output rows [start, stop) needs input
        rows [start - p, stop - p + k - 1), clipped to the image. Where the band is not clipped, the conv's own
        zero padding produces extra rows from zeros that are not the image's: those are cropped away. Where it is
        clipped, that padding is the image's true edge, exactly as in the whole-image conv.
        """
        (k, _), (p, _) = conv.kernel_size, conv.padding
        assert conv.stride == (1, 1) and conv.dilation == (1, 1), "banding assumes stride 1, dilation 1"
        out_height = height + 2 * p - k + 1
        parts = []
        for start, stop in _split(out_height, self.num_slices):
            lo, hi = max(start - p, 0), min(stop - p + k - 1, height)
            y = conv(rows(lo, hi))  # band output row j is image output row lo + j
            parts.append(y[:, :, start - lo : stop - lo].to(self.offload))
        return torch.cat(parts, dim=2)


def _split(height: int, num_slices: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of ``num_slices`` bands as even as possible (sizes differ by at most 1), each >= 1 row."""
    count = max(1, min(num_slices, height))
    size, extra = divmod(height, count)
    start = 0
    for i in range(count):
        stop = start + size + (i < extra)
        yield start, stop
        start = stop


def _resnet(block: ResnetBlock2D, x: torch.Tensor, bands: _Bands) -> torch.Tensor:
    """ResnetBlock2D.forward with temb None, no up/down sampling and a time-embedding norm in _NORM2_ONLY."""
    height = x.shape[2]
    h = bands.norm(block.norm1, x)
    h = bands.conv(block.conv1, height, bands.rows(h, block.nonlinearity))
    h = bands.norm(block.norm2, h)
    h = bands.conv(block.conv2, height, bands.rows(h, lambda t: block.dropout(block.nonlinearity(t))))
    shortcut = x if block.conv_shortcut is None else bands.conv(block.conv_shortcut, height, bands.rows(x))
    return (shortcut + h) / block.output_scale_factor


def _upsample(upsampler: Upsample2D, x: torch.Tensor, bands: _Bands) -> torch.Tensor:
    """Upsample2D.forward (nearest x2, then conv), upsampling each band on the device: the x2 tensor is never whole."""
    conv = upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0

    def rows(lo: int, hi: int) -> torch.Tensor:
        # Upsampled row r is input row r // 2: upsample the input rows covering [lo, hi), drop the extra first row.
        band = x[:, :, lo // 2 : (hi + 1) // 2].to(bands.device)
        band = F.interpolate(band, scale_factor=2.0, mode="nearest")
        return band[:, :, lo % 2 : lo % 2 + hi - lo]

    return bands.conv(conv, 2 * x.shape[2], rows)


def _unsupported(vae: AutoencoderKL, z: torch.Tensor) -> str | None:
    """Why this walk cannot reproduce ``vae.decode(z)`` exactly, or None when it can."""
    if not isinstance(vae, AutoencoderKL):
        return f"{type(vae).__name__} is not an AutoencoderKL"
    if hasattr(vae, "_hf_hook"):
        return "accelerate offload hooks move its weights at decode time"
    if vae.use_tiling and max(z.shape[-2:]) > vae.tile_latent_min_size:
        return "tiled decoding is enabled and would change the pixels"
    decoder = vae.decoder
    if type(decoder) is not Decoder:
        return f"unknown decoder {type(decoder).__name__}"
    if type(decoder.conv_norm_out) is not nn.GroupNorm or not isinstance(decoder.conv_act, _ELEMENTWISE):
        return "decoder output norm is not GroupNorm (spatial norm?)"
    problems = [_conv_problem(decoder.conv_out, "conv_out")]
    for i, block in enumerate(decoder.up_blocks):
        if type(block) is not UpDecoderBlock2D:
            return f"up_blocks.{i} is a {type(block).__name__}"
        problems += [_resnet_problem(r, f"up_blocks.{i}.resnets.{j}") for j, r in enumerate(block.resnets)]
        problems += [_upsampler_problem(u, f"up_blocks.{i}.upsamplers.{j}")
                     for j, u in enumerate(block.upsamplers or ())]
    return next((p for p in problems if p is not None), None)


def _resnet_problem(block: nn.Module, name: str) -> str | None:
    if type(block) is not ResnetBlock2D:
        return f"{name} is a {type(block).__name__}"
    if block.upsample is not None or block.downsample is not None:
        return f"{name} resamples"
    if block.time_emb_proj is not None or block.time_embedding_norm not in _NORM2_ONLY:
        return f"{name} has a time embedding ({block.time_embedding_norm})"
    if type(block.norm1) is not nn.GroupNorm or type(block.norm2) is not nn.GroupNorm:
        return f"{name} norms are not GroupNorm"
    if not isinstance(block.nonlinearity, _ELEMENTWISE):
        return f"{name} activation {type(block.nonlinearity).__name__} is not known to be element-wise"
    convs = {"conv1": block.conv1, "conv2": block.conv2, "conv_shortcut": block.conv_shortcut}
    return next((p for c, m in convs.items() if m is not None and (p := _conv_problem(m, f"{name}.{c}"))), None)


def _upsampler_problem(upsampler: nn.Module, name: str) -> str | None:
    if type(upsampler) is not Upsample2D:
        return f"{name} is a {type(upsampler).__name__}"
    if not upsampler.use_conv or upsampler.use_conv_transpose or upsampler.norm is not None:
        return f"{name} is not nearest-x2-then-conv"
    if not upsampler.interpolate:
        return f"{name} does not interpolate"
    return _conv_problem(upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0, f"{name}.conv")


def _conv_problem(conv: nn.Module, name: str) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{name} is a {type(conv).__name__}"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return f"{name} has stride {conv.stride}, dilation {conv.dilation}, padding mode {conv.padding_mode}"
    if isinstance(conv.padding, str):
        return f"{name} has padding {conv.padding!r}"
    return None

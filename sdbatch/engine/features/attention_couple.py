"""Attention Couple: a prompt `A AND B AND C` conditions each image on its parts, each in its own region.

Every part is encoded on its own (with the image's negative prompt deciding the shared chunk count) and the parts
are packed along the token axis, `(B, parts·T, D)`, so CFG, LoRA and the sampling loop handle them like any
embeddings. Only the UNet's cross-attention (`attn2`) sees the parts apart: for the prompt rows of a call it
attends to each part's T tokens (one attention call over all parts), and blends the outputs per pixel with the
parts' region weights, `Σ_k out_k·w_k·m_k / Σ_k w_k·m_k` (a pixel no region covers gets every part equally).
The negative and unconditional rows attend to their own text once. Everything else in the UNet is shared,
which is why it costs much less than one UNet pass per part (A1111's composable diffusion).

Region masks (`regions.mask`) are resized to each attention's size from the image-size mask, keyed by shape
(the reference keyed them by area: 64×32 and 32×64 collided), so Deep Shrink, Gradual Latent and Highres. fix
sizes all get their own. Without a mask every part covers the whole image.

SDXL: each part's encoding has its own pooled embedding, but the UNet takes one added conditioning per row (it
goes into the timestep embedding, not the attention). The prompt rows take the **last** part's pooled embedding,
as the reference's sdxl_gen_img.py does in regional mode; the negative and unconditional rows their own, and every
row its CFG part's size values (time ids), as without AND. With network.regional the last part's text, and so its
pooled embedding, is encoded with the last part's network alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdbatch.engine.core.contract import BatchContext, BatchHooks, Encode, Feature
from sdbatch.engine.core.model_fn import CHUNK_TOKENS, Conditioning, ModelFn
from sdbatch.engine.core.rows import PROMPT, REGIONAL_NETWORKS, TEXT_CHUNKS, TEXT_TOKENS, Rows, calling, current
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.couple import split_parts
from sdbatch.prompts.extra_networks import strip_tags
from sdbatch.prompts.region_masks import region_weights

COUPLE = "couple"  # per-call data: the Couple of the call
WEIGHTS = "couple_weights"  # per-image data: (images, parts, H, W) region weights × part weights, image size


@dataclass
class Couple:
    """What every cross-attention of one pass needs: the part count and tokens per part, and the weights
    resized to each attention's size (filled as the sizes come)."""

    parts: int
    tokens: int
    aspect: float  # image height / width, to read an attention's (h, w) from its length
    _at: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _shares: torch.Tensor | None = None

    def at(self, rows: Rows, h: int, w: int) -> torch.Tensor:
        """(images, parts, h·w) every image's normalised blend weights at an (h, w) attention, resized once per
        size and pass (cross-attention and regional LoRA read the same maps)."""
        if (h, w) not in self._at:
            full = rows.per_image[WEIGHTS]
            small = F.interpolate(full, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            self._at[(h, w)] = normalise(small.flatten(2))
        return self._at[(h, w)]

    def shares(self, rows: Rows) -> torch.Tensor:
        """(images, parts) each part's share of every image: the mean of its blend weight at the image size."""
        if self._shares is None:
            self._shares = normalise(rows.per_image[WEIGHTS].flatten(2)).mean(dim=-1)
        return self._shares

    def weights_at(self, rows: Rows, length: int, index: torch.Tensor) -> torch.Tensor:
        """(len(index), parts, length) normalised blend weights of rows `index` at an attention of `length`."""
        weights = self.at(rows, *attention_size(length, self.aspect))
        images = torch.tensor([rows.image[r] for r in index.tolist()], device=weights.device)
        return weights.index_select(0, images)


@dataclass
class RegionalNetworks:
    """network.regional: LoRA i acts only in the region of part i (its blend weight, at each module's size), and
    in the cross-attention's keys and values only for the rows attending to part i. A layer without pixels (the
    time embedding, SDXL's pooled-text-and-size embedding) takes the network scaled by part i's share of the
    image (the reference gave them 1/parts, its fallback for any size without a mask)."""

    couple: Couple

    def factor(self, network: int, output: torch.Tensor, name: str, rows: Rows) -> torch.Tensor:
        if name.endswith(("attn2_to_k", "attn2_to_v")):  # text tokens: part i's rows take network i
            chosen = [float(part == PROMPT and region == network) for part, region in zip(rows.part, rows.region,
                                                                                        strict=True)]
            return torch.tensor(chosen, device=output.device, dtype=output.dtype).view(-1, 1, 1)
        if output.dim() == 2:  # (rows, C): a time or size embedding (LyCORIS, SDXL's add_embedding) has no pixels
            shares = self.couple.shares(rows)
            share = shares[:, network] if network < shares.shape[1] else torch.ones_like(shares[:, 0])
            images = torch.tensor(rows.image, device=share.device)
            return share.index_select(0, images).to(output.device, output.dtype).unsqueeze(-1)
        spatial = output.dim() == 4
        h, w = output.shape[-2:] if spatial else attention_size(output.shape[1], self.couple.aspect)
        weights = self._part_weights(rows, h, w, network).to(output.device, output.dtype)  # (rows, h·w)
        return weights.view(-1, 1, h, w) if spatial else weights.unsqueeze(-1)

    def _part_weights(self, rows: Rows, h: int, w: int, network: int) -> torch.Tensor:
        at = self.couple.at(rows, h, w)
        if network >= at.shape[1]:
            return torch.ones(len(rows), h * w, device=at.device)
        return at[torch.tensor(rows.image, device=at.device), network]


def normalise(weights: torch.Tensor) -> torch.Tensor:
    """(rows, parts, pixels) → each pixel's weights summing to 1; a pixel no part covers gets 1/parts each."""
    total = weights.sum(dim=1, keepdim=True)
    even = torch.full_like(weights, 1.0 / weights.shape[1])
    return torch.where(total > 1e-6, weights / total.clamp_min(1e-6), even)


def attention_size(length: int, aspect: float) -> tuple[int, int]:
    """The (h, w) of an attention over `length` pixels of an image with height/width `aspect`."""
    guess = max(1, round(math.sqrt(length * aspect)))
    for h in sorted(range(max(1, guess - 3), guess + 4), key=lambda c: abs(c - guess)):
        if length % h == 0:
            return h, length // h
    raise ValueError(f"no attention size of {length} pixels near aspect {aspect}")


# ---------------------------------------------------------------- the text


def encode_parts(ctx: BatchContext, parts: list[tuple], nets=None) -> Conditioning:
    """The batch's parts packed along the tokens: part k of every image after part k - 1, each padded to the
    batch's chunk count; the negative (and unconditional) rows repeated once per part, so CFG stacks them.

    `nets` (network.regional): part k is encoded with LoRA k alone, and the negative without any network.
    SDXL: the prompt rows' added conditioning is the last part's pooled embedding (the reference's choice).
    """
    text, n, count = ctx.text, len(parts[0]), len(ctx.jobs)

    def encode(prompts: list[str], network: int | None) -> _Encoded:
        with _text_networks(ctx, nets, network):
            done = text.text.encode_texts(prompts, None, clip_skip=text.clip_skip, origins=text.origins[:count])
            empty = text.text.encode_texts([""], None, clip_skip=text.clip_skip).cond
        return _Encoded(done.cond, done.chunks, empty, done.pooled)

    encoded = [encode([strip_tags(image_parts[k].text) for image_parts in parts], k) for k in range(n)]
    unguided = text.negatives is None
    negative = None if unguided else encode(text.negatives[:count], None)
    chunks = [max(e.chunks[j] for e in encoded + ([] if unguided else [negative])) for j in range(count)]
    tokens = max(chunks) * CHUNK_TOKENS
    packed = torch.cat([e.padded(tokens) for e in encoded], dim=1)
    rows = Rows.of_images(count)
    if len(set(chunks)) > 1:
        rows = rows.with_image_data(**{TEXT_CHUNKS: torch.tensor(chunks)}).with_call_data(**{TEXT_TOKENS: tokens})
    sizes = text.time_ids  # SDXL's (prompt, negative) size values; None for SD1/SD2
    cond = Conditioning(embeddings=packed, negative=None if unguided else negative.padded(tokens).repeat(1, n, 1),
                        cfg_scales=text.cfg_scales, rows=rows, added=encoded[-1].added(sizes, 0),
                        negative_added=None if unguided else negative.added(sizes, 1))
    if text.three_parts:
        uncond = encode([""] * count, None)
        cond = dataclasses.replace(cond, uncond=uncond.padded(tokens).repeat(1, n, 1),
                                   negative_scale=text.negative_scale, uncond_added=uncond.added(sizes, 0))
    return cond


@dataclass(frozen=True)
class _Encoded:
    """One encoding of the batch's texts: embeddings, chunks per row, the empty prompt's chunk (the padding), and
    SDXL's pooled embeddings (None for SD1/SD2)."""

    embeddings: torch.Tensor
    chunks: tuple[int, ...]
    empty: torch.Tensor
    pooled: torch.Tensor | None

    def padded(self, tokens: int) -> torch.Tensor:
        """Embeddings padded with the empty prompt's chunk to `tokens` (as the encoder pads shorter texts)."""
        missing = (tokens - self.embeddings.shape[1]) // CHUNK_TOKENS
        if not missing:
            return self.embeddings
        pad = self.empty.expand(self.embeddings.shape[0], -1, -1).repeat(1, missing, 1)
        return torch.cat([self.embeddings, pad], dim=1)

    def added(self, sizes: tuple[torch.Tensor, torch.Tensor] | None, side: int) -> torch.Tensor | None:
        """SDXL's added conditioning of these rows: pooled text, then the size values of `side` (0 prompt,
        1 negative, as BatchText gives them); None for SD1/SD2."""
        if sizes is None or self.pooled is None:
            return None
        return torch.cat([self.pooled, sizes[side].to(self.pooled)], dim=1)


@contextlib.contextmanager
def _text_networks(ctx: BatchContext, nets, network: int | None) -> Iterator[None]:
    """Regional LoRA: the text encoder with network `network` alone (None: none) at the batch's multipliers,
    back to them afterwards; without `nets`, as it is."""
    if nets is None:
        yield
        return
    current, engine_text = nets.current, ctx.engine.text
    alone = tuple(mul if i == network else 0.0 for i, mul in enumerate(current))
    engine_text.network_key = nets.apply(alone)
    try:
        yield
    finally:
        engine_text.network_key = nets.apply(current)


def part_weights(jobs: tuple[ImageJob, ...], parts: list[tuple], width: int, height: int,
                 device: torch.device) -> torch.Tensor:
    """(images, parts, H, W): each image's region weights (its mask, or whole-image regions) × part weights."""
    stacked = []
    for job, image_parts in zip(jobs, parts, strict=True):
        regions = region_weights(job.region_mask, len(image_parts), width, height, job.region_codes)
        weights = torch.tensor([p.weight for p in image_parts], dtype=torch.float32).view(-1, 1, 1)
        stacked.append(torch.from_numpy(regions) * weights)
    return torch.stack(stacked).to(device)


# ---------------------------------------------------------------- the cross-attention


def couple_attention(module: torch.nn.Module, hidden_states: torch.Tensor,
                     encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
    """An attn2 forward: prompt rows attend to each part and blend; other rows attend to their text once."""
    rows = current()
    couple = rows.per_call.get(COUPLE) if rows is not None else None
    forward = type(module).forward
    if couple is None or encoder_hidden_states is None:
        return forward(module, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    t = couple.tokens
    prompt = torch.tensor([r for r, part in enumerate(rows.part) if part == PROMPT])
    other = torch.tensor([r for r, part in enumerate(rows.part) if part != PROMPT], dtype=torch.long)
    out = torch.empty_like(hidden_states)
    if len(other):
        sub = _sub_rows(rows, other, region=0)
        with calling(sub):
            out[other] = forward(module, hidden_states[other], encoder_hidden_states[other, :t],
                                 None if attention_mask is None else attention_mask[other, ..., :t], **kwargs)
    if len(prompt):
        out[prompt] = _blend(module, forward, rows, couple, prompt, hidden_states, encoder_hidden_states,
                             attention_mask, kwargs)
    return out


def _blend(module, forward, rows: Rows, couple: Couple, index: torch.Tensor, hidden: torch.Tensor,
           text: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """Rows `index` against every part in one attention call (part-major), blended per pixel."""
    n, t = couple.parts, couple.tokens
    x = hidden[index].repeat(n, 1, 1)
    context = torch.cat([text[index, k * t : (k + 1) * t] for k in range(n)])
    part_mask = None if mask is None else torch.cat([mask[index, ..., k * t : (k + 1) * t] for k in range(n)])
    sub = _stacked_parts(rows, index, n)
    with calling(sub):
        outs = forward(module, x, context, part_mask, **kwargs).view(n, len(index), *hidden.shape[1:])
    weights = couple.weights_at(rows, hidden.shape[1], index).to(outs.dtype)  # (rows, parts, pixels)
    return torch.einsum("krpc,rkp->rpc", outs, weights)


def _sub_rows(rows: Rows, index: torch.Tensor, region: int) -> Rows:
    """The rows `index` of a call as a call of their own (LoRA's per-row data still finds their images)."""
    picked = index.tolist()
    return dataclasses.replace(rows, image=tuple(rows.image[r] for r in picked),
                               part=tuple(rows.part[r] for r in picked), region=(region,) * len(picked))


def _stacked_parts(rows: Rows, index: torch.Tensor, n: int) -> Rows:
    """Rows `index` once per part, part-major, each with its part as its region."""
    picked = index.tolist()
    return dataclasses.replace(rows, image=tuple(rows.image[r] for r in picked) * n,
                               part=tuple(rows.part[r] for r in picked) * n,
                               region=tuple(k for k in range(n) for _ in picked))


@contextlib.contextmanager
def coupled(unet: torch.nn.Module) -> Iterator[None]:
    """Inside the block every cross-attention of the UNet blends the parts (inert for calls without them)."""
    modules = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    for m in modules:
        m.forward = types.MethodType(couple_attention, m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward  # back to the class's forward


def with_couple(unet: torch.nn.Module) -> ModelFn:
    def wrap(inner: ModelFn) -> ModelFn:
        def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
            with coupled(unet):
                return inner(x, t, cond)

        return model

    return wrap


class AttentionCouple(Feature):
    name = "attention_couple"
    order = 30  # encode: inside LoRA's (60), which re-encodes per multiplier set; UNet: inside CFG

    def batch_hooks(self, ctx: BatchContext) -> BatchHooks | None:
        if ctx.key.and_parts < 2:
            return None
        parts = [split_parts(job.prompt, job.origin) for job in ctx.jobs]
        weights = part_weights(ctx.jobs, parts, ctx.key.width, ctx.key.height, ctx.engine.placement.device)

        nets = ctx.patches.get("lora") if ctx.run is not None and ctx.run.network.regional else None

        def encode(inner: Encode) -> Conditioning:
            cond = encode_parts(ctx, parts, nets)
            couple = Couple(len(parts[0]), cond.embeddings.shape[1] // len(parts[0]), ctx.key.height / ctx.key.width)
            data = {COUPLE: couple, **({REGIONAL_NETWORKS: RegionalNetworks(couple)} if nets is not None else {})}
            rows = cond.rows_for(cond.embeddings).with_image_data(**{WEIGHTS: weights}).with_call_data(**data)
            return dataclasses.replace(cond, rows=rows)

        return BatchHooks(encode=encode, unet=with_couple(ctx.engine.bundle.unet))


FEATURE = AttentionCouple()

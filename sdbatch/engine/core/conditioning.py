"""A batch's text conditioning: its prompts, negative prompts and CFG scales through the (cached) text encoder.

Images whose prompts need different numbers of 75-token chunks share a batch: each is encoded at its own count
and padded; the row contract says how much of each row's text is its own, and the UNet call masks the rest.

SDXL's added conditioning (the pooled text embedding and the six size values of `sdxl_schema.SizeConditioning`)
goes with each CFG part's text as `Conditioning.added` / `negative_added` / `uncond_added`.

Features that change how text is encoded (LoRA on the text encoder, XTI's per-block text) wrap `BatchText.encode`
as `encode` hooks; they call it again after changing the encoder's state, so every call encodes the same texts.
"""

from __future__ import annotations

import dataclasses

import torch

from sdbatch.config.sdxl_schema import DEFAULT as DEFAULT_SIZES
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.rows import TEXT_CHUNKS, TEXT_TOKENS, Rows
from sdbatch.engine.text.encoder import EncodedBatch, TextEncoder
from sdbatch.errors import ConfigError
from sdbatch.plan.jobs import ImageJob
from sdbatch.prompts.extra_networks import strip_tags


class BatchText:
    """The texts one batch encodes, and the settings it encodes them with.

    Without CFG (every scale ≤ 1) no negative prompt is encoded. With a negative scale the real unconditional
    ("" per image) is encoded in the same call as the prompts, so all three parts share one chunk count (the
    UNet gets them in one call) and XTI's per-block encodings cover it too.
    """

    def __init__(self, text: TextEncoder, jobs: tuple[ImageJob, ...], negative_scale: float | None, clip_skip: int,
                 device: torch.device) -> None:
        self.text, self.count, self.clip_skip = text, len(jobs), clip_skip
        guided = any(j.cfg_scale > 1 for j in jobs)
        self.three_parts = guided and negative_scale is not None
        self.negative_scale = negative_scale
        self.prompts = [strip_tags(j.prompt) for j in jobs]
        self.origins = [j.origin for j in jobs]
        self.negatives = [j.negative_prompt for j in jobs] if guided else None
        if self.three_parts:
            self.prompts, self.origins = self.prompts + [""] * len(jobs), self.origins * 2
            self.negatives = self.negatives * 2
        self.cfg_scales = torch.tensor([j.cfg_scale for j in jobs], dtype=torch.float32, device=device)
        self.time_ids = _time_ids(jobs, sdxl=text.text_encoder_2 is not None)

    def all_texts(self) -> list[str]:
        """Every text the batch encodes (prompts, negatives, the unconditional "")."""
        return self.prompts + (self.negatives or [])

    def encode(self, block: int | None = None) -> Conditioning:
        """The batch's conditioning; `block` encodes with that XTI block's vectors.

        Each image's texts are encoded with its own chunk count; when the images' counts differ, the rows carry
        them (TEXT_CHUNKS) and the UNet masks the padding, so an image does not depend on its batch.
        """
        groups = list(range(self.count)) * (2 if self.three_parts else 1)  # the "" of image i goes with image i
        encoded = self.text.encode_texts(self.prompts, self.negatives, clip_skip=self.clip_skip,
                                         origins=self.origins, block=block, groups=groups)
        embeddings, negative = encoded.cond, encoded.uncond
        added = _added(encoded, self.time_ids)
        rows = Rows.of_images(self.count)
        chunks = encoded.chunks[: self.count]
        if len(set(chunks)) > 1:
            rows = rows.with_image_data(**{TEXT_CHUNKS: torch.tensor(chunks)}).with_call_data(
                **{TEXT_TOKENS: embeddings.shape[1]})
        cond = Conditioning(embeddings=embeddings, negative=negative, cfg_scales=self.cfg_scales, rows=rows,
                            added=added[0], negative_added=added[1])
        if not self.three_parts:
            return cond
        n = self.count
        cond = dataclasses.replace(cond, embeddings=embeddings[:n], negative=negative[:n], uncond=embeddings[n:],
                                   negative_scale=self.negative_scale)
        if added[0] is None:
            return cond
        # the real unconditional "" is a prompt-side text: its size values are the prompt's (as diffusers' uncond)
        return dataclasses.replace(cond, added=added[0][:n], negative_added=added[1][:n], uncond_added=added[0][n:])


def _time_ids(jobs: tuple[ImageJob, ...], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SDXL's (prompt, negative) size values of each image, (B, 6) each; None for SD1/SD2, where size options are
    refused (one line naming the prompt's origin)."""
    if not sdxl:
        given = next((j for j in jobs if j.sdxl is not None), None)
        if given is not None:
            raise ConfigError(f"{given.origin}: SDXL size conditioning (sdxl.* or --ow --oh --nw --nh --ct --cl) "
                              "needs an SDXL model; remove it or use an SDXL checkpoint")
        return None
    pairs = [(j.sdxl or DEFAULT_SIZES).time_ids(j.height, j.width) for j in jobs]
    return (torch.tensor([p for p, _ in pairs], dtype=torch.float32),
            torch.tensor([n for _, n in pairs], dtype=torch.float32))


def _added(encoded: EncodedBatch, time_ids: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """(prompt rows', negative rows') SDXL added conditioning: pooled text then size values; (None, None) else."""
    if time_ids is None or encoded.pooled is None:
        return None, None
    rows = encoded.pooled.shape[0] // time_ids[0].shape[0]  # with a negative scale: prompts then the "" rows
    prompt = torch.cat([encoded.pooled, time_ids[0].repeat(rows, 1).to(encoded.pooled)], dim=1)
    negative = None if encoded.pooled_uncond is None else torch.cat(
        [encoded.pooled_uncond, time_ids[1].repeat(rows, 1).to(encoded.pooled_uncond)], dim=1)
    return prompt, negative

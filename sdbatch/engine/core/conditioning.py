"""A batch's text conditioning: its prompts, negative prompts and CFG scales through the (cached) text encoder.

Images whose prompts need different numbers of 75-token chunks share a batch: each is encoded at its own count
and padded; the row contract says how much of each row's text is its own, and the UNet call masks the rest.

Features that change how text is encoded (LoRA on the text encoder, XTI's per-block text) wrap `BatchText.encode`
as `encode` hooks; they call it again after changing the encoder's state, so every call encodes the same texts.
"""

from __future__ import annotations

import dataclasses

import torch

from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.rows import TEXT_CHUNKS, TEXT_TOKENS, Rows
from sdbatch.engine.text.encoder import TextEncoder
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
        rows = Rows.of_images(self.count)
        chunks = encoded.chunks[: self.count]
        if len(set(chunks)) > 1:
            rows = rows.with_image_data(**{TEXT_CHUNKS: torch.tensor(chunks)}).with_call_data(
                **{TEXT_TOKENS: embeddings.shape[1]})
        cond = Conditioning(embeddings=embeddings, negative=negative, cfg_scales=self.cfg_scales, rows=rows)
        if not self.three_parts:
            return cond
        n = self.count
        return dataclasses.replace(cond, embeddings=embeddings[:n], negative=negative[:n], uncond=embeddings[n:],
                                   negative_scale=self.negative_scale)

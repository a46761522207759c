"""Batch invariance for prompts of different lengths: an image never depends on the prompts beside it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from engine_helpers import spec
from PIL import Image

from sdbatch.cli.runner import run
from sdbatch.engine.core import model_fn
from sdbatch.engine.core.model_fn import padding_mask
from sdbatch.engine.core.rows import TEXT_CHUNKS, TEXT_TOKENS, Rows
from sdbatch.engine.models.export import save_single_file
from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.engine.text.tokenizer import ClipTokenizer

torch.set_num_threads(1)

LINES = ["a red cube --d 11", "a (red:1.6) cube --d 11", "a [[blue]] sphere BREAK on grass --d 12"]
# SD's conventional head sizes: the UNet's 8 heads, the text encoder's 64 channels per head (four heads here).
# With them an unmasked padding chunk visibly changes the short prompts' images (about 25 levels).
TEXT = {"hidden_size": 256, "intermediate_size": 512}
UNET = {"block_out_channels": (64, 128)}


@pytest.fixture(scope="module")
def heads_model(tmp_path_factory):
    components = build_tiny_components("sd1", 3, text=TEXT, unet=UNET)
    return components, save_single_file(tmp_path_factory.mktemp("heads") / "heads.safetensors", *components, "sd1")


def test_each_prompt_is_encoded_at_its_own_chunk_count(heads_model) -> None:
    (_, _, text_encoder), _ = heads_model
    encoder = TextEncoder(ClipTokenizer(), text_encoder)
    prompts = ["a (red:1.6) cube", "a [[blue]] sphere BREAK on grass"]
    mixed = encoder.encode_texts(prompts, ["", ""], clip_skip=1, max_multiples=3)
    assert mixed.chunks == (1, 2) and mixed.cond.shape[1] == 154
    for i, prompt in enumerate(prompts):
        alone = encoder.encode_texts([prompt], [""], clip_skip=1, max_multiples=3)
        own = alone.cond.shape[1]
        assert torch.equal(mixed.cond[i, :own], alone.cond[0]) and torch.equal(mixed.uncond[i, :own], alone.uncond[0])
    # the negative's chunks count for its prompt too: both halves of an image's CFG call share one length
    assert encoder.encode_texts(["a cat"], ["x BREAK y"], clip_skip=1, max_multiples=3).chunks == (2,)
    grouped = encoder.encode_texts(["a cat", "a dog", ""], ["", "", "x BREAK y"], clip_skip=1, max_multiples=3,
                                   groups=[0, 1, 0])
    assert grouped.chunks == (2, 1, 2), "the texts of one image share its count"


def test_the_padding_of_shorter_rows_is_masked() -> None:
    rows = Rows.of_images(2).with_image_data(**{TEXT_CHUNKS: torch.tensor([1, 2])})
    rows = rows.with_call_data(**{TEXT_TOKENS: 154}).stacked(["negative", "prompt"])
    mask = padding_mask(rows, 2 * 154, torch.device("cpu"))  # two encodings one after the other (XTI packs 16)
    assert mask.shape == (4, 308)
    assert mask[0].tolist() == ([1.0] * 77 + [0.0] * 77) * 2 and mask[1].tolist() == [1.0] * 308
    assert torch.equal(mask[2:], mask[:2])
    assert padding_mask(Rows.of_images(2), 154, torch.device("cpu")) is None, "equal lengths: nothing to mask"


def _images(run_dir) -> dict[str, np.ndarray]:
    lines = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]
    return {line["raw_prompt"]: np.asarray(Image.open(run_dir / line["file"])).astype(int) for line in lines}


def test_mixed_chunk_counts_are_batch_invariant(heads_model, tmp_path, monkeypatch) -> None:
    _, path = heads_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    base = spec(path, prompt=None, prompt_file=str(prompts), max_embeddings_multiples=3, steps=6, width=64,
                height=64, negative_prompt="blurry")
    one = _images(run(dataclasses.replace(base, batch_size=1), tmp_path / "one").run_dir)
    four = _images(run(dataclasses.replace(base, batch_size=4), tmp_path / "four").run_dir)
    assert one.keys() == four.keys() == set(LINES)
    for line in LINES:
        assert np.abs(one[line] - four[line]).max() <= 1, line
    monkeypatch.setattr(model_fn, "padding_mask", lambda *args: None)  # the padding attended to, as before
    unmasked = _images(run(dataclasses.replace(base, batch_size=4), tmp_path / "unmasked").run_dir)
    assert min(np.abs(one[line] - unmasked[line]).max() for line in LINES[:2]) > 8, "the test model is sensitive"

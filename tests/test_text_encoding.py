"""Weighted, chunked text encoding on the tiny SD1 text encoder: exactness, normalisation, chunks, cache."""

from __future__ import annotations

import logging

import pytest
import torch

from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.engine.text.tokenizer import ClipTokenizer
from sdbatch.errors import ConfigError

torch.set_num_threads(1)

TOK = ClipTokenizer()


@pytest.fixture
def encoder(sd1_components) -> TextEncoder:
    return TextEncoder(ClipTokenizer(), sd1_components[2])


def plain(text_encoder, rows: list[list[int]], clip_skip: int = 1) -> torch.Tensor:
    """The text encoder run directly on padded id rows, (N, 77, D)."""
    with torch.no_grad():
        out = text_encoder(torch.tensor(rows), output_hidden_states=True)
    if clip_skip == 1:
        return out.last_hidden_state
    return text_encoder.final_layer_norm(out.hidden_states[-clip_skip])


def prompt_of(n_tokens: int) -> str:
    text = " ".join(["word"] * n_tokens)
    assert len(TOK.encode(text)) == n_tokens
    return text


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_unweighted_prompts_equal_the_plain_encoding_exactly(encoder, sd1_components, clip_skip) -> None:
    prompts = ["a lighthouse at dusk", "a (red:1.0) cube", r"a \(b\)"]
    rows = [TOK.encode_padded(p)[0] for p in ["a lighthouse at dusk", "a red cube", "a (b)"]]
    cond, uncond = encoder.encode_batch(prompts, None, clip_skip=clip_skip)
    assert uncond is None
    assert torch.equal(cond, plain(sd1_components[2], rows, clip_skip))
    one = encoder.encode(["a lighthouse at dusk"], clip_skip)
    assert torch.equal(one, plain(sd1_components[2], rows[:1], clip_skip))


def reference_weighting(emb: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """gen_img_inventory.md §7.3 written out: scale rows, then restore the (abs) mean of the whole tensor."""
    scaled = emb * weights[:, None]
    if mode == "none":
        return scaled
    stat = (lambda e: e.abs()) if mode == "abs" else (lambda e: e)
    return scaled * (stat(emb).mean() / stat(scaled).mean())


@pytest.mark.parametrize("mode", ["original", "abs", "none"])
def test_weighted_prompt_follows_the_normalisation_formula(encoder, sd1_components, mode) -> None:
    got = encoder.encode_batch(["a (cat:1.5) [dog]"], None, clip_skip=1, normalize=mode)[0][0]
    a, cat, dog = TOK.encode("a"), TOK.encode("cat"), TOK.encode("dog")
    row = TOK.pad(a + cat + dog)
    weights = torch.ones(77)
    weights[1 + len(a) : 1 + len(a) + len(cat)] = 1.5
    weights[1 + len(a) + len(cat) : 1 + len(a) + len(cat) + len(dog)] = 1 / 1.1
    expected = reference_weighting(plain(sd1_components[2], [row])[0], weights, mode)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, plain(sd1_components[2], [row])[0], atol=1e-4)


def test_long_prompt_is_encoded_in_chunks(encoder, sd1_components) -> None:
    text = prompt_of(150)
    ids = TOK.encode(text)
    cond, _ = encoder.encode_batch([text], None, clip_skip=1, max_multiples=3)
    assert cond.shape == (1, 154, 32)  # two chunks of 77; k=3 allows a third that nobody needs
    rows = [TOK.pad(ids[:75]), TOK.pad(ids[75:])]
    assert torch.equal(cond[0], plain(sd1_components[2], rows).reshape(154, 32))


def test_truncation_past_k_chunks_warns_once(encoder, caplog) -> None:
    text = prompt_of(100)
    with caplog.at_level(logging.WARNING):
        cond, _ = encoder.encode_batch([text, text], None, clip_skip=1, origins=["prompts.txt:4", "prompts.txt:5"])
        encoder.encode_batch([text], None, clip_skip=1, origins=["prompts.txt:4"])
    assert cond.shape == (2, 77, 32)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "prompts.txt:4" in warnings[0].getMessage() and "truncated" in warnings[0].getMessage()
    assert "max_embeddings_multiples=1" in warnings[0].getMessage()
    with caplog.at_level(logging.WARNING):
        assert encoder.encode_batch([prompt_of(250)], None, clip_skip=1, max_multiples=3)[0].shape == (1, 231, 32)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_prompts_and_negatives_get_the_same_chunk_count(encoder, sd1_components) -> None:
    cond, uncond = encoder.encode_batch(["a cat", "a dog"], ["", prompt_of(100)], clip_skip=1, max_multiples=3)
    assert cond.shape == uncond.shape == (2, 154, 32)
    empty, cat = plain(sd1_components[2], [TOK.pad([]), TOK.pad(TOK.encode("a cat"))])
    assert torch.equal(cond[0, :77], cat) and torch.equal(cond[0, 77:], empty)  # unused chunk = empty prompt
    assert torch.equal(uncond[0], torch.cat([empty, empty]))


def test_break_starts_a_new_chunk(encoder, sd1_components) -> None:
    cond = encoder.encode(["a cat BREAK a dog"], clip_skip=1)  # k=1 still allows nothing but one chunk
    assert cond.shape == (1, 77, 32)
    cond, _ = encoder.encode_batch(["a cat BREAK a dog"], None, clip_skip=1, max_multiples=3)
    assert cond.shape == (1, 154, 32)
    rows = [TOK.pad(TOK.encode("a cat")), TOK.pad(TOK.encode("a dog"))]
    assert torch.equal(cond[0], plain(sd1_components[2], rows).reshape(154, 32))
    assert encoder.tokenize("a cat BREAK", 3).chunks == (tuple(TOK.encode("a cat")),)
    assert encoder.tokenize("BREAK a cat", 3).chunks == ((), tuple(TOK.encode("a cat")))
    assert len(encoder.tokenize(f"{prompt_of(75)} BREAK a", 3).chunks) == 2  # a full chunk gets no empty one


def test_sd2_chunks_pad_with_the_pad_token_after_eos() -> None:
    sd2 = ClipTokenizer("!")
    enc = TextEncoder(sd2, torch.nn.Identity())
    tokens = enc.tokenize("a cat BREAK a dog", 2)
    rows = enc._chunk_ids(tokens, 3)
    cat = sd2.encode("a cat")
    assert rows[0] == [sd2.bos_id, *cat, sd2.eos_id] + [sd2.pad_id] * (75 - len(cat))
    assert rows[2] == [sd2.bos_id, sd2.eos_id] + [sd2.pad_id] * 75


class CountingEncoder(TextEncoder):
    calls = 0

    def _hidden(self, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        self.calls += 1
        return super()._hidden(ids, clip_skip)


def test_cache_avoids_rerunning_the_encoder(sd1_components) -> None:
    enc = CountingEncoder(ClipTokenizer(), sd1_components[2])
    first = enc.encode_batch(["a (cat:1.2)", "a dog", "a dog"], ["blurry"] * 3, clip_skip=1)
    assert (enc.calls, enc.encoded) == (2, 3)  # one call per half; the repeated prompt runs once
    again = enc.encode_batch(["a dog", "a (cat:1.2)"], ["blurry", "blurry"], clip_skip=1)
    assert (enc.calls, enc.encoded) == (2, 3)
    assert torch.equal(again[0][1], first[0][0])
    enc.encode_batch(["a dog"], None, clip_skip=1, normalize="abs")  # same values, but its own cache key
    assert (enc.calls, enc.encoded) == (3, 4)
    enc.encode_batch(["a dog"], [prompt_of(80)], clip_skip=1, max_multiples=2)  # two chunks: a new encoding
    assert (enc.calls, enc.encoded) == (5, 6)


def test_invalid_settings_are_config_errors(encoder) -> None:
    with pytest.raises(ConfigError, match="emb_normalize_mode"):
        encoder.encode_batch(["a"], None, clip_skip=1, normalize="mean")
    with pytest.raises(ConfigError, match="max_embeddings_multiples"):
        encoder.encode_batch(["a"], None, clip_skip=1, max_multiples=0)

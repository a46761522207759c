"""The tiny test and demo models exercise every path: no norm is an identity, the text mean is not ~0."""

from __future__ import annotations

import pytest
import torch

from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.engine.text.tokenizer import ClipTokenizer

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_norms_and_biases_are_not_their_defaults(family) -> None:
    for model in build_tiny_components(family, 0):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm)]
        assert norms
        for norm in norms:
            assert (norm.weight - 1).abs().mean() > 0.03 and norm.bias.abs().mean() > 0.03, norm
        biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
                  and m.bias is not None]
        assert all((bias != 0).all() for bias in biases)


def test_the_text_mean_that_original_normalisation_divides_by_is_not_rounding_noise(sd1_components) -> None:
    encoder = TextEncoder(ClipTokenizer(), sd1_components[2])
    plain = encoder.encode(["a red cube"], clip_skip=1)
    assert plain.mean().abs() > 1e-3  # it was ~1e-8 with default-initialised norms
    weighted = encoder.encode_batch(["a (red:1.5) cube"], None, clip_skip=1, normalize="original")[0]
    unnormalised = encoder.encode_batch(["a (red:1.5) cube"], None, clip_skip=1, normalize="none")[0]
    assert torch.allclose(weighted.mean(), plain.mean(), rtol=1e-4), "original mode restores the mean"
    assert (weighted - unnormalised).abs().max() > 1e-3, "and that visibly rescales the embeddings"

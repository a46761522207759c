"""Extended Textual Inversion on a tiny UNet with SD's 16 cross-attention blocks: files, routing, runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from engine_helpers import max_diff, ours, pixels, spec

from sdbatch.cli.runner import run
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.core.model_fn import Conditioning
from sdbatch.engine.core.rows import calling
from sdbatch.engine.features import xti
from sdbatch.engine.models.export import save_single_file
from sdbatch.engine.models.tiny import build_tiny_components
from sdbatch.engine.text.embeddings import XTI_LAYERS, load_embedding, load_embeddings
from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.engine.text.tokenizer import ClipTokenizer
from sdbatch.errors import ModelError
from sdbatch.prompts.png_info import parse_infotext, read_png_params

torch.set_num_threads(1)

TOK = ClipTokenizer()
# SD's UNet layout at a tiny width: three cross-attention levels of two layers, 16 transformer blocks.
# 64 channels keep GroupNorm(32) above one value per group at the 1×1 bottom of 64-px images.
UNET_16 = {"block_out_channels": (64, 64, 64, 64), "layers_per_block": 2,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}


@pytest.fixture(scope="module")
def sd16_components():
    """(unet, vae, text_encoder) with the 16-block layout. Shared: copy before changing."""
    return build_tiny_components("sd1", 0, unet=UNET_16)


@pytest.fixture(scope="module")
def sd16_file(tmp_path_factory, sd16_components) -> Path:
    return save_single_file(tmp_path_factory.mktemp("sd16") / "tiny-sd16.safetensors", *sd16_components, "sd1")


def word_row(text_encoder: torch.nn.Module, word: str) -> torch.Tensor:
    (token,) = TOK.encode(word)
    return text_encoder.get_input_embeddings().weight[token].detach().clone()[None]  # (1, D)


def xti_file(path: Path, layers: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.clone().contiguous() for k, v in layers.items()}, str(path))
    else:
        torch.save(layers, path)
    return path


def all_layers(vectors: torch.Tensor, **changed: torch.Tensor) -> dict[str, torch.Tensor]:
    return {layer: changed.get(layer, vectors) for layer in XTI_LAYERS}


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_xti_file_loads_in_layer_order(tmp_path, suffix) -> None:
    layers = {layer: torch.full((2, 32), float(i)) for i, layer in enumerate(XTI_LAYERS)}
    scrambled = dict(sorted(layers.items(), reverse=True))  # file order must not matter
    emb = load_embedding(xti_file(tmp_path / f"style{suffix}", scrambled), xti=True)
    assert emb.name == "style" and emb.xti and emb.vectors.shape == (16, 2, 32)
    assert [int(emb.vectors[i, 0, 0]) for i in range(16)] == list(range(16))


def test_bad_xti_files_are_explained(tmp_path) -> None:
    partial = all_layers(torch.zeros(1, 32))
    del partial["MID"], partial["OUT11"]
    uneven = all_layers(torch.zeros(1, 32), MID=torch.zeros(2, 32))
    cases = {"partial": (partial, "missing MID, OUT11"),
             "plain": ({"emb_params": torch.zeros(1, 32)}, "belongs in model.textual_inversion"),
             "uneven": (uneven, "tensors of one shape"),
             "extra": ({**all_layers(torch.zeros(1, 32)), "x": torch.zeros(1)}, "unexpected keys: x")}
    for name, (content, match) in cases.items():
        with pytest.raises(ModelError, match=match) as info:
            load_embedding(xti_file(tmp_path / f"{name}.pt", content), xti=True)
        assert str(info.value).startswith("model.xti_embeddings: ") and "\n" not in str(info.value)


def test_xti_and_ti_names_must_differ(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    ti = tmp_path / "same.pt"
    torch.save({"emb_params": torch.zeros(1, 32)}, ti)
    other = xti_file(tmp_path / "x" / "Same.pt", all_layers(torch.zeros(1, 32)))
    with pytest.raises(ModelError, match="same prompt token"):
        load_embeddings([str(ti)], [str(other)])


# ---------------------------------------------------------------- routing in the UNet


def test_blocks_are_named_like_sd(sd16_components, sd1_components) -> None:
    unet = sd16_components[0]
    blocks = xti.cross_attention_blocks(unet)
    assert list(blocks) == list(XTI_LAYERS)
    assert blocks["IN01"] is unet.down_blocks[0].attentions[0] and blocks["MID"] is unet.mid_block.attentions[0]
    assert blocks["OUT03"] is unet.up_blocks[1].attentions[0] and blocks["OUT11"] is unet.up_blocks[3].attentions[2]
    with pytest.raises(ModelError, match="XTI needs SD's UNet layout.*4 cross-attention blocks"):
        xti.install(copy.deepcopy(sd1_components[0]))  # the default tiny model has one level of attention


def _received(unet: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Record the encoder states each block's cross-attention (attn2) gets."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, block in xti.cross_attention_blocks(unet).items():
        def spy(module, args, kwargs, name=name):
            seen[name] = kwargs["encoder_hidden_states"]
        handles.append(block.transformer_blocks[0].attn2.register_forward_pre_hook(spy, with_kwargs=True))
    return seen, handles


def test_each_block_gets_its_own_encoding(sd16_components, caplog) -> None:
    unet = copy.deepcopy(sd16_components[0])
    xti.install(unet)
    xti.install(unet)  # idempotent
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    states = torch.randn(16, 2, 77, 32)
    base = Conditioning(embeddings=torch.zeros(2, 77, 32))
    cond = xti.conditioning(base, [(states[b], None) for b in range(16)])
    assert cond.embeddings.shape == (2, 16 * 77, 32)
    seen, handles = _received(unet)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        with calling(cond.rows):  # the token count travels in the call's row contract
            unet(x, t, encoder_hidden_states=cond.embeddings, **cond.unet_kwargs)
        for b, name in enumerate(XTI_LAYERS):
            assert torch.equal(seen[name], states[b]), name
        plain = unet(x, t, encoder_hidden_states=states[3]).sample  # no marker: the hooks do nothing
        assert all(torch.equal(s, states[3]) for s in seen.values())
        same = [(states[3], None)] * 16
        packed = xti.conditioning(base, same)
        with calling(packed.rows):
            assert torch.equal(unet(x, t, encoder_hidden_states=packed.embeddings, **packed.unet_kwargs).sample, plain)
    assert "not expected" not in caplog.text  # the marker never reaches the attention processors
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------- text


def test_text_is_encoded_per_block_with_that_blocks_vectors(sd16_components, tmp_path) -> None:
    te = copy.deepcopy(sd16_components[2])
    path = xti_file(tmp_path / "myxti.pt", all_layers(word_row(te, "cat"), MID=word_row(te, "dog")))
    enc = TextEncoder(ClipTokenizer(), te)
    enc.set_embeddings(load_embeddings([], [str(path)]))
    mid = XTI_LAYERS.index("MID")
    assert enc.uses_xti(["x", "a (myxti:1.1)"]) and not enc.uses_xti(["a cat"])
    cat, dog = enc.encode(["a (cat:1.1) house"], 1), enc.encode(["a (dog:1.1) house"], 1)
    for b in range(16):
        got = enc.encode_batch(["a (myxti:1.1) house"], None, clip_skip=1, block=b)[0]
        assert torch.equal(got, dog if b == mid else cat), XTI_LAYERS[b]
    before = enc.encoded
    for b in range(16):  # a text without XTI names is the same for every block: cached after the first
        enc.encode_batch(["a plain text"], None, clip_skip=1, block=b)
    assert enc.encoded == before + 1


# ---------------------------------------------------------------- whole runs


def test_run_with_xti_routes_per_block_and_records_it(sd16_file, tmp_path) -> None:
    run_spec = spec(sd16_file, prompt=["a myxti house", "a dog"], negative_prompt="[myxti]", seed=3, steps=3,
                    batch_size=2)
    engine = get_engine(run_spec.model, run_spec.perf)
    te = engine.bundle.text_encoder
    (tmp_path / "v2").mkdir()
    same = xti_file(tmp_path / "myxti.safetensors", all_layers(word_row(te, "cat")))
    mid_dog = xti_file(tmp_path / "v2" / "myxti.pt", all_layers(word_row(te, "cat"), MID=word_row(te, "dog")))
    try:
        with_file = lambda f: dataclasses.replace(  # noqa: E731
            run_spec, model=dataclasses.replace(run_spec.model, xti_embeddings=[str(f)]))
        first = run(with_file(same), tmp_path / "same")
        # every layer holds the vector of "cat": the images are those of the plain word, exactly
        engine.set_textual_inversion([])
        plain = ours(run_spec, ["a cat house", "a dog"], [3, 4], negative="[cat]")
        assert max_diff([pixels(p) for p in first.written], plain) == 0
        second = run(with_file(mid_dog), tmp_path / "mid-dog")  # only MID differs: a different image
        assert not np.array_equal(pixels(second.written[0]), plain[0])
        lines = [json.loads(x) for x in (tmp_path / "same" / "manifest.jsonl").read_text().splitlines()]
        assert lines[0]["xti_embeddings"] == [{"name": "myxti", "file": str(same.resolve()),
                                               "hash": load_embedding(same, xti=True).hash}]
        assert lines[1]["xti_embeddings"] == lines[0]["xti_embeddings"]  # the negative uses it
        assert lines[0]["textual_inversion"] == []
        assert "TI hashes" not in parse_infotext(read_png_params(first.written[0])["parameters"])
    finally:
        engine.set_textual_inversion([])


def test_xti_on_a_model_without_the_layout_is_an_error(sd1_single_file, tmp_path) -> None:
    run_spec = spec(sd1_single_file)
    path = xti_file(tmp_path / "x.pt", all_layers(torch.zeros(1, 32)))
    model = dataclasses.replace(run_spec.model, xti_embeddings=[str(path)])
    with pytest.raises(ModelError, match="model.xti_embeddings: XTI needs SD's UNet layout"):
        run(dataclasses.replace(run_spec, model=model), tmp_path / "run")

"""Textual Inversion on the tiny models: file formats, safe loading, token splicing, caches, metadata, runs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
from engine_helpers import spec

from sdbatch.cli.runner import run
from sdbatch.engine.core.engine import get_engine
from sdbatch.engine.text.embeddings import load_embedding, load_embeddings, register
from sdbatch.engine.text.encoder import TextEncoder
from sdbatch.engine.text.tokenizer import ClipTokenizer
from sdbatch.errors import ModelError
from sdbatch.outputs.metadata import image_params, infotext
from sdbatch.plan.jobs import EmbeddingRef, ImageJob, ModelInfo
from sdbatch.prompts.embedding_names import used_names
from sdbatch.prompts.png_info import parse_infotext, read_png_params

torch.set_num_threads(1)

TOK = ClipTokenizer()


@pytest.fixture
def te(sd1_components) -> torch.nn.Module:
    """A private copy of the tiny SD1 text encoder: registration grows it, the shared fixture must stay."""
    return copy.deepcopy(sd1_components[2])


def rows_of(text_encoder: torch.nn.Module, words: str) -> torch.Tensor:
    """The text encoder's own input vectors of the tokens of ``words``, (n, D)."""
    return text_encoder.get_input_embeddings().weight[TOK.encode(words)].detach().clone()


def a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                "name": "ignored", "step": 1500, "sd_checkpoint": "abc", "sd_checkpoint_name": "x"}, path)
    return path


def emb_params(path: Path, vectors: torch.Tensor) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({"emb_params": vectors.contiguous()}, str(path))
    else:
        torch.save({"emb_params": vectors}, path)
    return path


def encoder_with(te: torch.nn.Module, *files: Path) -> TextEncoder:
    enc = TextEncoder(ClipTokenizer(), te)
    enc.set_embeddings(load_embeddings([str(f) for f in files]))
    return enc


# ---------------------------------------------------------------- file formats


def _legacy_parameter_dict(path: Path, v: torch.Tensor) -> None:
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(v)}), "name": "x"}, path)


FORMATS = {
    "a1111.pt": lambda p, v: a1111_pt(p, v),
    "legacy.pt": _legacy_parameter_dict,  # original TI code
    "a1111.safetensors": lambda p, v: emb_params(p, v),
    "kohya.pt": lambda p, v: emb_params(p, v),
    "kohya.ckpt": lambda p, v: emb_params(p, v),
    "diffusers.bin": lambda p, v: torch.save({"<my-concept>": v[0]}, p),  # learned_embeds.bin: one (D,) vector
    "diffusers.safetensors": lambda p, v: safetensors.torch.save_file({"<tok>": v.contiguous()}, str(p)),
}


@pytest.mark.parametrize("kind", FORMATS)
def test_each_file_format_loads(tmp_path, kind) -> None:
    vectors = torch.randn(1 if kind == "diffusers.bin" else 2, 32)
    path = tmp_path / f"my-emb{Path(kind).suffix}"
    FORMATS[kind](path, vectors)
    emb = load_embedding(path)
    assert emb.name == "my-emb" and emb.file == str(path.resolve())
    assert emb.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert emb.vectors.dtype == torch.float32 and not emb.vectors.requires_grad
    assert torch.equal(emb.vectors, vectors)


def test_half_precision_file_is_read_as_float32(tmp_path) -> None:
    vectors = torch.randn(3, 32).half()
    emb = load_embedding(emb_params(tmp_path / "h.safetensors", vectors))
    assert emb.vectors.dtype == torch.float32 and torch.equal(emb.vectors, vectors.float())


def test_sdxl_embedding_reads_both_parts(tmp_path) -> None:
    """clip_l and clip_g side by side: a width no SD1/SD2 text encoder takes (tests/test_sdxl.py uses them)."""
    path = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.ones(2, 1280)}, str(path))
    assert load_embedding(path).vectors.shape == (2, 2048)
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 768)}, str(path))
    with pytest.raises(ModelError, match="SDXL embedding without both clip_l and clip_g"):
        load_embedding(path)


@pytest.mark.parametrize("content, match", [
    ({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, "not a Textual Inversion embedding.*found keys: a, b"),
    ({"emb_params": torch.zeros(2, 3, 32)}, "shape \\(2, 3, 32\\)"),
    ({"emb_params": torch.zeros(76, 32)}, "76 vectors; at most 75"),
    ({"emb_params": torch.zeros(2, 32, dtype=torch.int64)}, "expected floats"),
])
def test_unusable_content_is_explained(tmp_path, content, match) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ModelError, match=match):
        load_embedding(path)


def test_missing_corrupt_and_unknown_files_give_one_line_errors(tmp_path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all")
    cases = {tmp_path / "nope.pt": "does not exist", tmp_path: "is a folder", broken: "not a valid safetensors",
             garbage: "not a valid PyTorch checkpoint", tmp_path / "e.png": "stored in images",
             tmp_path / "e.txt": "unknown extension"}
    (tmp_path / "e.png").write_bytes(b"png")
    (tmp_path / "e.txt").write_text("x")
    for path, match in cases.items():
        with pytest.raises(ModelError, match=match) as info:
            load_embedding(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


class _Payload:
    """Unpickling this calls open(marker, "w"): it creates a file, as a malicious embedding could."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": _Payload(marker)}, path)
    with pytest.raises(ModelError, match="refusing to load") as info:
        load_embedding(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load does create the file
    assert marker.exists()


def test_two_files_with_one_name_are_an_error(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    first = emb_params(tmp_path / "a" / "Style.pt", torch.zeros(1, 32))
    second = emb_params(tmp_path / "style.safetensors", torch.zeros(1, 32))
    with pytest.raises(ModelError, match="same prompt token 'style'"):
        load_embeddings([str(first), str(second)])


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_one_vector_embedding_encodes_exactly_like_its_word(te, tmp_path, clip_skip) -> None:
    enc = encoder_with(te, a1111_pt(tmp_path / "myembed.pt", rows_of(te, "cat")))
    got = enc.encode(["a myembed on a mat, MyEmbed"], clip_skip)
    assert torch.equal(got, enc.encode(["a cat on a mat, cat"], clip_skip))
    assert not torch.equal(got, enc.encode(["a dog on a mat, dog"], clip_skip))


def test_weights_apply_to_embedding_vectors(te, tmp_path) -> None:
    enc = encoder_with(te, a1111_pt(tmp_path / "myembed.pt", rows_of(te, "cat")))
    for weighted, reference in [("a (myembed:1.2)", "a (cat:1.2)"), ("[myembed] dog", "[cat] dog"),
                                ("((myembed)), x", "((cat)), x")]:
        assert torch.equal(enc.encode([weighted], 1), enc.encode([reference], 1)), weighted
    assert enc.tokenize("a (myembed:1.2)", 1).weights == ((1.0, 1.2),)


def test_multi_vector_embedding_takes_one_position_per_vector(te, tmp_path) -> None:
    enc = encoder_with(te, emb_params(tmp_path / "tri.safetensors", rows_of(te, "red fluffy cat")))
    tokens = enc.tokenize("a tri", 1)
    assert len(tokens.chunks[0]) == 4 and tokens.chunks[0][0] == TOK.encode("a")[0]
    assert all(t >= 49408 for t in tokens.chunks[0][1:])
    assert torch.equal(enc.encode(["a (tri:0.9)"], 1), enc.encode(["a (red fluffy cat:0.9)"], 1))


def test_multi_vector_embedding_counts_towards_the_chunk_budget(te, tmp_path) -> None:
    enc = encoder_with(te, emb_params(tmp_path / "tri.pt", rows_of(te, "red fluffy cat")))
    words = lambda n: " ".join(["word"] * n)  # noqa: E731
    assert [len(c) for c in enc.tokenize(f"{words(72)} tri", 2).chunks] == [75]
    # 74 + 3 does not fit: the embedding moves whole to the next chunk (A1111), never split
    assert [len(c) for c in enc.tokenize(f"{words(74)} tri", 2).chunks] == [74, 3]
    cond = enc.encode_batch([f"{words(74)} tri"], None, clip_skip=1, max_multiples=2)[0]
    ref = enc.encode_batch([f"{words(74)} BREAK red fluffy cat"], None, clip_skip=1, max_multiples=2)[0]
    assert torch.equal(cond, ref)


def test_truncation_warning_names_the_embedding(te, tmp_path, caplog) -> None:
    enc = encoder_with(te, emb_params(tmp_path / "tri.pt", rows_of(te, "red fluffy cat")))
    with caplog.at_level(logging.WARNING):
        enc.encode([" ".join(["word"] * 74) + " tri dog"], 1)
    assert "dropped: 'tri dog'" in caplog.text


def test_names_match_whole_words_in_any_case(te, tmp_path) -> None:
    enc = encoder_with(te, emb_params(tmp_path / "myembed.pt", rows_of(te, "cat")))
    (new_id,) = enc.tokenize("myembed", 1).chunks[0]
    assert enc.tokenize("MYEMBED, (MyEmbed)", 1).chunks[0] == (new_id, TOK.encode(",")[0], new_id)
    for text in ["myembeds", "my_myembed", "myembed2"]:
        assert enc.tokenize(text, 1).chunks[0] == tuple(TOK.encode(text)), text
    assert used_names(["a (MyEmbed:1.2)", "myembeds"], ["myembed", "other"]) == ["myembed"]


def test_embedding_in_the_negative_prompt(te, tmp_path) -> None:
    enc = encoder_with(te, a1111_pt(tmp_path / "badthing.pt", rows_of(te, "blurry")))
    cond, uncond = enc.encode_batch(["a cat"], ["(badthing:1.3), text"], clip_skip=1)
    assert torch.equal(uncond, enc.encode(["(blurry:1.3), text"], 1))
    assert torch.equal(cond, enc.encode(["a cat"], 1))


def test_wrong_width_names_the_file_and_both_widths(sd2_components, tmp_path) -> None:
    sd2_te = copy.deepcopy(sd2_components[2])  # 64 wide; the file holds 32-wide (tiny SD1) vectors
    path = emb_params(tmp_path / "sd1-style.safetensors", torch.zeros(2, 32))
    with pytest.raises(ModelError, match="sd1-style.safetensors holds vectors of width 32.*takes width 64"):
        encoder_with(sd2_te, path)


def test_sd2_embedding_encodes_like_its_word(sd2_components, tmp_path) -> None:
    sd2_te = copy.deepcopy(sd2_components[2])
    enc = TextEncoder(ClipTokenizer("!"), sd2_te)
    enc.set_embeddings(load_embeddings([str(emb_params(tmp_path / "e.pt", rows_of(sd2_te, "cat")))]))
    assert torch.equal(enc.encode(["a e"], 2), enc.encode(["a cat"], 2))


# ---------------------------------------------------------------- registration on a shared text encoder


def test_registration_is_idempotent_and_leaves_the_rng_alone(te, tmp_path) -> None:
    path = emb_params(tmp_path / "tri.pt", torch.randn(3, 32))
    emb = load_embedding(path)
    state = torch.get_rng_state()
    ids = register(te, [emb])
    assert torch.equal(torch.get_rng_state(), state)
    assert ids == [(49408, 49409, 49410)] and te.get_input_embeddings().weight.shape[0] == 49411
    assert register(te, [load_embedding(path)]) == ids and te.get_input_embeddings().weight.shape[0] == 49411
    assert torch.equal(te.get_input_embeddings().weight[49408:], emb.vectors)
    assert te.config.vocab_size == 49411


def test_another_file_under_the_same_name_changes_the_encoding(te, tmp_path) -> None:
    (tmp_path / "b").mkdir()
    cat = a1111_pt(tmp_path / "myembed.pt", rows_of(te, "cat"))
    dog = emb_params(tmp_path / "b" / "myembed.safetensors", rows_of(te, "dog"))
    enc = encoder_with(te, cat)
    as_cat = enc.encode(["a myembed", "a (myembed:1.2)"], 1)
    other = TextEncoder(ClipTokenizer(), te)  # a second engine on the same model (e.g. another clip_skip)
    other.set_embeddings(load_embeddings([str(dog)]))
    assert torch.equal(other.encode(["a myembed"], 1), other.encode(["a dog"], 1))
    enc.set_embeddings(load_embeddings([str(dog)]))  # the next run of the first engine uses the other file
    assert torch.equal(enc.encode(["a myembed", "a (myembed:1.2)"], 1), enc.encode(["a dog", "a (dog:1.2)"], 1))
    enc.set_embeddings(load_embeddings([str(cat)]))
    assert torch.equal(enc.encode(["a myembed", "a (myembed:1.2)"], 1), as_cat)
    assert torch.equal(enc.encode(["a myembed"], 1), enc.encode(["a cat"], 1))
    enc.set_embeddings([])  # a run without embeddings: the name is ordinary text again
    assert enc.tokenize("myembed", 1).chunks[0] == tuple(TOK.encode("myembed"))
    assert te.get_input_embeddings().weight.shape[0] == 49409  # one slot for (myembed, 1 vector) all along


def test_vector_count_change_under_one_name_gets_new_ids(te, tmp_path) -> None:
    (tmp_path / "b").mkdir()
    enc = encoder_with(te, emb_params(tmp_path / "e.pt", rows_of(te, "cat")))
    one = enc.tokenize("e", 1).chunks[0]
    enc.set_embeddings(load_embeddings([str(emb_params(tmp_path / "b" / "e.pt", rows_of(te, "red cat")))]))
    assert len(enc.tokenize("e", 1).chunks[0]) == 2 and torch.equal(enc.encode(["e"], 1), enc.encode(["red cat"], 1))
    assert one[0] not in enc.tokenize("e", 1).chunks[0]


# ---------------------------------------------------------------- metadata


def test_infotext_and_json_record_only_the_embeddings_used() -> None:
    refs = (EmbeddingRef("goodstyle", "/e/goodstyle.pt", "0123456789ab"),
            EmbeddingRef("bad,hands", "/e/bad,hands.pt", "ba5eba11ba5e"),
            EmbeddingRef("unused", "/e/unused.pt", "ffffffffffff"))
    model = ModelInfo(name="m", hash="6ce0161689", family="sd1", v_prediction=False, clip_skip=1, precision="fp32",
                      embeddings=refs)
    job = ImageJob(index=0, file_name="00000-1.png", prompt="a (GoodStyle:1.2) cat", negative_prompt="bad,hands",
                   seed=1, width=512, height=512, steps=20, sampler="ddim", schedule="default", cfg_scale=7.0,
                   eta=0.0, origin="prompt")
    params = image_params(job, model, "0.1.0")
    assert params["textual_inversion"] == [{"name": "goodstyle", "file": "/e/goodstyle.pt", "hash": "0123456789ab"},
                                           {"name": "bad,hands", "file": "/e/bad,hands.pt", "hash": "ba5eba11ba5e"}]
    text = infotext(params)
    assert text.endswith(', TI hashes: "goodstyle: 0123456789ab, badhands: ba5eba11ba5e", Version: sdbatch 0.1.0')
    assert parse_infotext(text)["TI hashes"] == "goodstyle: 0123456789ab, badhands: ba5eba11ba5e"
    plain = image_params(dataclasses.replace(job, prompt="a cat", negative_prompt=""), model, "0.1.0")
    assert plain["textual_inversion"] == [] and "TI hashes" not in infotext(plain)


# ---------------------------------------------------------------- whole runs


def test_run_with_embeddings_records_them_and_never_reads_a_stale_encoding(sd1_single_file, tmp_path) -> None:
    (tmp_path / "v2").mkdir()
    engine = None
    try:
        te = get_engine(spec(sd1_single_file).model, spec(sd1_single_file).perf).bundle.text_encoder
        first = a1111_pt(tmp_path / "mystyle.pt", rows_of(te, "cat"))
        second = emb_params(tmp_path / "v2" / "mystyle.safetensors", rows_of(te, "dog"))
        results = []
        for n, file in enumerate([first, second]):
            model = dataclasses.replace(spec(sd1_single_file).model, textual_inversion=[str(file)])
            run_spec = spec(sd1_single_file, model=model, prompt=["a mystyle house", "a house"],
                            negative_prompt="(mystyle:0.5)" if n else "", seed=7, steps=3)
            results.append(run(run_spec, tmp_path / f"run{n}"))
            engine = get_engine(run_spec.model, run_spec.perf)
            word = "cat" if n == 0 else "dog"
            assert torch.equal(engine.text.encode(["a mystyle house"], 1), engine.text.encode([f"a {word} house"], 1))
        file_hash = hashlib.sha256(first.read_bytes()).hexdigest()[:12]
        lines = [json.loads(x) for x in (tmp_path / "run0" / "manifest.jsonl").read_text().splitlines()]
        assert lines[0]["textual_inversion"] == [{"name": "mystyle", "file": str(first.resolve()), "hash": file_hash}]
        assert lines[1]["textual_inversion"] == []  # "a house" uses no embedding
        meta = read_png_params(results[0].written[0])
        assert meta["sdbatch"] == lines[0]
        assert parse_infotext(meta["parameters"])["TI hashes"] == f"mystyle: {file_hash}"
        assert "TI hashes" not in parse_infotext(read_png_params(results[0].written[1])["parameters"])
        assert f"{first.resolve()}: {file_hash}" in (tmp_path / "run0" / "config.yaml").read_text()
        second_lines = [json.loads(x) for x in (tmp_path / "run1" / "manifest.jsonl").read_text().splitlines()]
        assert [len(x["textual_inversion"]) for x in second_lines] == [1, 1]  # the negative uses it too
        assert second_lines[0]["textual_inversion"][0]["file"] == str(second.resolve())
    finally:
        if engine is not None:
            engine.set_textual_inversion([])  # later tests share this engine

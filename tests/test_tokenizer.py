"""Tests for the offline CLIP tokenizer, checked against transformers.CLIPTokenizer built from our files."""

from __future__ import annotations

import pytest

from sdbatch.engine.text.tokenizer import ClipTokenizer, clean_text, load_bpe, write_hf_tokenizer_files

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"

# Prompts that CLIP's ftfy/html cleanup leaves alone (transformers' CLIPTokenizer only does NFC).
PLAIN = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, highly detailed, 8k, sharp focus",
    "portrait of a woman, (red:1.2) dress, [blue] sky, ((smile))",
    "a (cyberpunk:1.35) city at night; neon lights / rain",
    "an astronaut riding a horse on mars, trending on artstation",
    "it's a dog's life, they're happy, we've won, i'm here, you'll see, he'd go",
    "THE CAT'S HAT IS RED",
    "   lots    of\twhitespace \n\n and newlines   ",
    "numbers 1234567890 and 3.14159 and 1/2 and -42",
    "café crème brûlée à la mode, naïve façade",
    "日本語のプロンプト、富士山と桜",
    "emoji party 🎉🐱🚀 and ❤️ hearts",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "photorealistic, unreal engine 5, octane render, 4k uhd",
    "a painting by greg rutkowski and alphonse mucha",
    "low quality, blurry, jpeg artifacts, watermark, text, signature",
    "email me at foo@bar.com or visit https://example.org/path?q=1",
    "tabs\tand\tcolons: semi;colons; and dashes -- like — this",
    "C++ code and #hashtags and $100 and 50% off",
    "Ελληνικά και русский текст и 한국어",
    "über straße größe",
    "x",
    "",
    "a" * 80,
    "red green blue " * 40,
]
WITH_BANG = [
    "wow!!! amazing!",
    "!!!",
    "hello! world!! (masterpiece:1.2)!!",
    "stop!?! what?!",
]
# Prompts that CLIP's cleanup changes: html entities, curly quotes, ligatures, full-width chars.
CLEANUP = [
    "salt &amp; pepper",
    "fish &amp;amp; chips",
    "a &lt;tag&gt; and &quot;quotes&quot;",
    "\u201ccurly quotes\u201d and \u2018single\u2019",
    "\ufb01ne \ufb02owers",
    "\uff21\uff22\uff23 full width",
]
CORPUS = PLAIN + WITH_BANG + CLEANUP


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, pad in (("sd1", SD1_PAD), ("sd2", SD2_PAD)):
        directory = write_hf_tokenizer_files(tmp_path_factory.mktemp(name), pad)
        out[pad] = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    return out


def hf_ids(hf: object, text: str) -> list[int]:
    return hf(text, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.parametrize(("pad", "pad_id"), [(SD1_PAD, 49407), (SD2_PAD, 0)])
def test_known_ids(pad: str, pad_id: int) -> None:
    tok = ClipTokenizer(pad)
    ids, truncated = tok.encode_padded("a photo of a cat")
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [pad_id] * 70
    assert not truncated
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.model_max_length) == (49406, 49407, pad_id, 77)


@pytest.mark.parametrize("text", PLAIN + WITH_BANG)
def test_matches_transformers_sd1(hf_tokenizers: dict, text: str) -> None:
    assert ClipTokenizer(SD1_PAD).encode_padded(text)[0] == hf_ids(hf_tokenizers[SD1_PAD], text)


@pytest.mark.parametrize("text", PLAIN)
def test_matches_transformers_sd2(hf_tokenizers: dict, text: str) -> None:
    assert ClipTokenizer(SD2_PAD).encode_padded(text)[0] == hf_ids(hf_tokenizers[SD2_PAD], text)


@pytest.mark.parametrize("text", CORPUS)
def test_matches_transformers_on_cleaned_text(hf_tokenizers: dict, text: str) -> None:
    # transformers skips ftfy/html cleanup, so feed it text already cleaned the CLIP way.
    for pad, hf in hf_tokenizers.items():
        if pad == SD2_PAD and "!" in text:
            continue
        assert ClipTokenizer(pad).encode_padded(text)[0] == hf_ids(hf, clean_text(text))


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ("salt &amp; pepper", "salt & pepper"),
        ("fish &amp;amp; chips", "fish & chips"),
        ("\u201ccurly\u201d", '"curly"'),
        ("\ufb01ne", "fine"),
        ("\uff21\uff22\uff23", "abc"),
        ("  A\u00a0 B\n", "a b"),
    ],
)
def test_clip_cleanup(raw: str, plain: str) -> None:
    tok = ClipTokenizer()
    assert tok.encode(raw) == tok.encode(plain)


@pytest.mark.parametrize("text", WITH_BANG + ["!", "!!", "a!b"])
def test_pad_token_does_not_change_splitting(text: str) -> None:
    sd1, sd2 = ClipTokenizer(SD1_PAD), ClipTokenizer(SD2_PAD)
    assert sd2.encode(text) == sd1.encode(text)
    # "!!!" is one BPE token; a lone "!" is "!</w>" (256), never the SD2 pad id 0 ("!" mid-word).
    assert sd2.encode("!!!") == [995] and sd2.encode("!") == [256]


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>"])
def test_literal_special_tokens_are_plain_text(special: str) -> None:
    tok = ClipTokenizer()
    ids = tok.encode(f"a cat {special} a dog")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == f"a cat {special.lower()} a dog".replace("<|", "<| ").replace("|>", " |>")


def test_truncation(hf_tokenizers: dict) -> None:
    text = " ".join(f"word{i % 10}" if i % 2 else "cat" for i in range(100))
    for pad, hf in hf_tokenizers.items():
        tok = ClipTokenizer(pad)
        ids, truncated = tok.encode_padded(text)
        assert truncated and len(ids) == 77
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert ids == hf_ids(hf, text)


def test_truncation_boundary() -> None:
    tok = ClipTokenizer()
    assert tok.encode_padded("cat " * 75) == ([49406] + [2368] * 75 + [49407], False)
    assert tok.encode_padded("cat " * 76)[1]
    short, truncated = tok.encode_padded("cat " * 10, length=8)
    assert short == [49406] + [2368] * 6 + [49407] and truncated
    assert tok.pad([1, 2], length=6) == [49406, 1, 2, 49407, 49407, 49407]


@pytest.mark.parametrize("text", ["a photo of a cat", "café 日本語 🎉", "supercalifragilisticexpialidocious"])
def test_decode_round_trip(text: str) -> None:
    tok = ClipTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_padded(text)[0][: len(tok.encode(text)) + 2]) == text


def test_vocab_is_cached_and_validated() -> None:
    assert load_bpe() is load_bpe()
    assert ClipTokenizer()._bpe is ClipTokenizer(SD2_PAD)._bpe
    assert len(load_bpe().encoder) == 49408
    with pytest.raises(ValueError):
        ClipTokenizer("<pad>")

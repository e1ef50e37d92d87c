"""Byte-level BPE: training, the Hugging Face layout, exact round trips, the fast paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers

from genloop.data import tokenizer as tokenizer_module
from genloop.data.tokenizer import (
    _ASCII_WORDS,
    DEFAULT_SPECIAL_TOKENS,
    EOS,
    _byte_level_alphabet,
    _FastEncoder,
    encode_documents,
    eos_token_id,
    load_hf_tokenizer,
    load_tokenizer,
    tokenize_parallel,
    train_bpe,
)
from genloop.errors import ConfigError, GenloopError, NotFoundError

CODE = '''\
def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return f"Point({self.x!r}, {self.y!r})"  # it's fine, isn't it?
'''
PROSE = (
    "The quick brown fox jumps over the lazy dog. Ça va? Ünïcödé — naïve café, 日本語のテキスト, "
    "emoji 🙂 and numbers 12345 6789.\n\tTabs\r\nand CRLF lines.  Double  spaces.\n"
)
CORPUS = [CODE, PROSE] * 20 + [f"value_{i} = {i * 37} # line {i}\n" for i in range(200)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe(iter(CORPUS), tmp_path_factory.mktemp("tok"), vocab_size=600)


@pytest.fixture(scope="module")
def library(tok_dir: Path) -> Tokenizer:
    """The library's own tokenizer, special-token strings encoded as text (like ours)."""
    tok = load_tokenizer(tok_dir)
    tok.encode_special_tokens = True
    return tok


def reference(tok: Tokenizer, text: str, eos: int) -> list[int]:
    return [*tok.encode(text, add_special_tokens=False).ids, eos]


def test_saved_in_hugging_face_layout(tok_dir: Path) -> None:
    names = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == EOS
    assert config["pad_token"] == "<|pad|>"
    assert config["chat_template"]
    tok = load_tokenizer(tok_dir)
    assert 300 < tok.get_vocab_size() <= 600  # the corpus may run out of merges first
    for i, special in enumerate(DEFAULT_SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i


def test_transformers_loads_it_offline_with_the_chat_template(tok_dir: Path) -> None:
    hf = load_hf_tokenizer(tok_dir)
    assert hf.eos_token == EOS and hf.pad_token == "<|pad|>"
    assert hf.eos_token_id == eos_token_id(tok_dir)
    assert hf.decode(hf.encode(CODE, add_special_tokens=False)) == CODE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n"
        "<|assistant|>\nHello!<|endoftext|>\n"
    )
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi<|endoftext|>\n<|assistant|>\n")
    # The assistant's reply and its end-of-text are what SFT trains on.
    out = hf.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = np.array(out["input_ids"]), np.array(out["assistant_masks"], dtype=bool)
    assert hf.decode(ids[mask]) == "Hello!<|endoftext|>"
    assert ids[mask][-1] == hf.eos_token_id


def test_documents_end_with_eos_and_match_the_library(tok_dir: Path, library: Tokenizer) -> None:
    eos = eos_token_id(tok_dir)
    texts = [CODE, PROSE, "", "x", f"mentions {EOS} inside", "  \n\n   leading and trailing  \n"]
    for text, ids in zip(texts, encode_documents(tok_dir, texts), strict=True):
        assert ids.dtype == np.uint32
        assert ids.tolist() == reference(library, text, eos)
        assert library.decode(ids[:-1].tolist(), skip_special_tokens=False) == text
    assert encode_documents(tok_dir, [""])[0].tolist() == [eos]


ASCII = st.text(st.characters(max_codepoint=127))
# Whitespace of every kind (Oniguruma's \s and Python's differ on \x1c-\x1f), apostrophes
# for the contractions, digits, letters, and non-ASCII neighbours.
TRICKY = st.lists(
    st.sampled_from(
        [
            *" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2003\u2028\u3000\u180e'sdtmlvre09aZ_.(-",
            *("é", "日", "🙂", "²", "\u0301", EOS, "'ll", "  ", "\n    "),
        ]
    )
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(), ASCII, TRICKY))
def test_round_trip_and_parity_on_arbitrary_text(
    tok_dir: Path, library: Tokenizer, text: str
) -> None:
    (ids,) = encode_documents(tok_dir, [text])
    eos = eos_token_id(tok_dir)
    assert ids.tolist() == reference(library, text, eos)
    assert library.decode(ids[:-1].tolist(), skip_special_tokens=False) == text


@settings(max_examples=30, deadline=None)
@given(lines=st.lists(st.one_of(ASCII, TRICKY, st.text()), max_size=12))
def test_parity_on_multiline_mixed_text(
    tok_dir: Path, library: Tokenizer, lines: list[str]
) -> None:
    """Non-ASCII documents are cut at line starts; the cuts must not change any id."""
    text = "\n".join(lines)
    (ids,) = encode_documents(tok_dir, [text])
    assert ids.tolist() == reference(library, text, eos_token_id(tok_dir))


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(ASCII, TRICKY.filter(str.isascii)))
def test_native_scanner_splits_as_the_pattern(tok_dir: Path, text: str) -> None:
    """The C scanner finds the GPT-2 pattern's pre-tokens (its ASCII transcription)."""
    native = _FastEncoder(tok_dir).native
    assert native is not None
    assert native.words(text) == _ASCII_WORDS.findall(text)
    assert "".join(native.words(text)) == text


def test_the_c_extension_is_built_and_used(tok_dir: Path) -> None:
    """make install compiles genloop/data/_bpe.c; losing it would silently cost 5x speed."""
    assert tokenizer_module._bpe is not None, "the _bpe C extension was not built"
    assert _FastEncoder(tok_dir).native is not None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(ASCII, TRICKY, st.text()), max_size=8))
def test_python_path_matches_the_library_too(
    tok_dir: Path, library: Tokenizer, lines: list[str]
) -> None:
    """The fallback for machines without the extension gives the same ids."""
    text = "\n".join(lines)
    (ids,) = _FastEncoder(tok_dir, native=False).encode([text])
    assert ids.tolist() == reference(library, text, eos_token_id(tok_dir))


def test_native_cache_refills_when_full(tok_dir: Path, library: Tokenizer) -> None:
    """A cache that empties every few words still gives the library's ids."""
    from genloop.data import _bpe

    roomy = _FastEncoder(tok_dir).native
    assert roomy is not None
    spec = json.loads(library.to_str())
    model = spec["model"]
    vocab = model["vocab"]
    tiny = _bpe.Encoder(
        np.array([vocab[c] for c in _byte_level_alphabet()], dtype=np.uint32).tobytes(),
        np.array(
            [(vocab[a], vocab[b], vocab[a + b]) for a, b in model["merges"]], dtype=np.uint32
        ).tobytes(),
        3,
    )
    for text in (CODE, CODE, "x = 1\n" * 50, ""):
        assert tiny.encode(text) == roomy.encode(text)
        assert tiny.cached <= 3
        expected = library.encode(text, add_special_tokens=False).ids
        assert np.frombuffer(tiny.encode(text), dtype=np.uint32).tolist() == expected
    with pytest.raises(ValueError, match="ASCII"):
        tiny.encode("café")
    with pytest.raises(ValueError, match="max_words"):
        _bpe.Encoder(bytes(1024), b"", 0)


def test_other_tokenizers_use_the_library_path(tmp_path: Path, tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    tok.normalizer = normalizers.Lowercase()  # the word cache would be wrong here
    tok.save(str(tmp_path / "tokenizer.json"))
    (ids,) = encode_documents(tmp_path, ["Hello World"])
    assert tok.decode(ids[:-1].tolist()) == "hello world"


def test_parallel_is_ordered_and_equal_to_serial(tok_dir: Path) -> None:
    texts = [f"{CODE}\n# document {i}\n" if i % 3 else f"{PROSE} {i}" for i in range(60)]
    serial = encode_documents(tok_dir, texts)
    for workers in (1, 2):
        out = list(tokenize_parallel(tok_dir, iter(texts), workers=workers, batch_size=7))
        assert len(out) == len(texts)
        for a, b in zip(out, serial, strict=True):
            assert np.array_equal(a, b)


def test_training_is_deterministic(tmp_path: Path, tok_dir: Path) -> None:
    again = train_bpe(iter(CORPUS), tmp_path / "again", vocab_size=600)
    assert (again / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too small"):
        train_bpe(["abc"], tmp_path / "a", vocab_size=100)
    with pytest.raises(ConfigError, match="duplicates"):
        train_bpe(["abc"], tmp_path / "b", special_tokens=("<a>", "<a>"))
    with pytest.raises(ConfigError, match="chat template"):
        train_bpe(["abc"], tmp_path / "c", special_tokens=("<eos>",))
    with pytest.raises(GenloopError, match="no text"):
        train_bpe(["", ""], tmp_path / "d")
    with pytest.raises(NotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(GenloopError, match="not a valid tokenizer"):
        load_tokenizer(bad)


def test_custom_tokens_and_template(tmp_path: Path) -> None:
    out = train_bpe(
        CORPUS, tmp_path, vocab_size=400, special_tokens=("</s>",), chat_template="{{ 1 }}"
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == "</s>"
    assert config["chat_template"] == "{{ 1 }}"
    assert encode_documents(out, ["a"])[0][-1] == load_tokenizer(out).token_to_id("</s>")


def test_arrays_are_writable_and_empty_input_gives_nothing(tok_dir: Path) -> None:
    (ids,) = encode_documents(tok_dir, ["abc"])
    ids[0] = 0  # callers may reuse the buffers
    assert encode_documents(tok_dir, []) == []
    assert list(tokenize_parallel(tok_dir, iter([]), workers=1)) == []

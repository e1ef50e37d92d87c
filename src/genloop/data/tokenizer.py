"""Byte-level BPE tokenizers: train, save in the Hugging Face layout, load, tokenize fast.

``train_bpe`` trains a GPT-2-style byte-level BPE with Hugging Face ``tokenizers`` and saves
``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``, so that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it offline, chat template
included. Any existing tokenizer directory with a ``tokenizer.json`` works everywhere else.

Documents are tokenized as ``ids(text) + [eos]``. Special-token strings inside a document
(a scraped page that mentions ``<|endoftext|>``) are encoded as plain text: only the eos
appended here ends a document.

Speed. ``tokenizers`` spends most of its time per pre-token (allocations for offsets,
alignments and token strings), 3-4 MB/s per core on code here. The GPT-2 pre-tokenizer
regex splits text into words that BPE then encodes independently, so the ids of a text are
the concatenation of the ids of its words, and words repeat: a per-worker word → ids cache
skips BPE for almost every word. For ASCII text a small C extension (``_bpe.c``) does the
whole job, the GPT-2 pattern as a scanner, the cache and the BPE merges: about 125 MB/s
per core with a cold cache on the python-stdlib corpus, 170 MB/s warm. Other text keeps
the library's own pre-tokenizer, line by line (see ``_FastEncoder``). Without the extension
(a source install with no C compiler) the same cache runs in Python with ``re`` and an ASCII
transcription of the pattern (about 14 MB/s cold, 21 MB/s warm). Every path gives exactly
``Tokenizer.encode``'s ids (tests check it on arbitrary text). Tokenization runs in worker
processes, one Rust thread each.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from genloop.errors import ConfigError, GenloopError, NotFoundError

try:  # built by pip install (setuptools ext-modules); optional, see the module docstring
    from genloop.data import _bpe
except ImportError:  # pragma: no cover - a source tree whose extension was not built
    _bpe = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>")
SENTINEL = "<extra_id_{}>"  # T5's sentinel tokens, <extra_id_0> … (span corruption)
# a special token by one of these names becomes the mask token (masked-LM pretraining)
MASK_TOKENS: tuple[str, ...] = ("<|mask|>", "[MASK]", "<mask>")

# One turn per message: the role's token, a newline, the content, end of text. The
# assistant's content and its end-of-text sit in a {% generation %} block, so that
# transformers' apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly
# the tokens supervised fine-tuning trains on. (A newline right after a block tag would be
# eaten by transformers' trim_blocks, hence the newline as an expression.)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|endoftext|>{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|endoftext|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# the files that make a tokenizer in a Hugging Face directory (any of them may be absent)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)

_TRAIN_BATCH = 1000  # texts per batch handed to the trainer
_BATCH_CHARS = 1 << 20  # a parallel batch closes at this many characters …
_CACHE_WORDS = 1 << 18  # word cache entries per encoder before it is cleared (~40 MB)
_CACHE_WORD_CHARS = 256  # longer words are not cached (as in tokenizers' own BPE cache)


# --------------------------------------------------------------------------- training


def train_bpe(
    texts: Iterable[str],
    out_dir: Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str | None = None,
    model_max_length: int = 2048,
    sentinel_tokens: int = 0,
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir`` (Hugging Face layout).

    The first special token ends documents and is also bos and unk; ``<|pad|>`` pads when
    present (else the first token); ``<|mask|>`` (or another of :data:`MASK_TOKENS`) is
    the mask token when present. ``chat_template`` defaults to
    :data:`DEFAULT_CHAT_TEMPLATE`, which needs the default special tokens.
    ``sentinel_tokens`` adds ``<extra_id_0>`` … ``<extra_id_{n-1}>`` after the special
    tokens (T5's sentinels, see :func:`sentinel_ids`). Returns ``out_dir``.
    """
    if sentinel_tokens < 0:
        raise ConfigError(f"sentinel_tokens must be at least 0, not {sentinel_tokens}")
    special = list(special_tokens) + [SENTINEL.format(i) for i in range(sentinel_tokens)]
    if not special:
        raise ConfigError("special_tokens is empty; the first one ends documents")
    if len(set(special)) != len(special):
        raise ConfigError(f"special_tokens has duplicates: {special}")
    if vocab_size < 256 + len(special):
        raise ConfigError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 byte "
            f"tokens and {len(special)} special tokens"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, not {min_frequency}")
    if chat_template is None:
        missing = [t for t in DEFAULT_SPECIAL_TOKENS if t not in special]
        if missing:
            raise ConfigError(
                f"the default chat template uses {missing}, which are not in special_tokens; "
                "add them or pass a chat_template written for your tokens"
            )
        chat_template = DEFAULT_CHAT_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def batches() -> Iterator[list[str]]:
        nonlocal seen
        batch: list[str] = []
        for text in texts:
            if text:
                batch.append(text)
            if len(batch) >= _TRAIN_BATCH:
                seen += len(batch)
                yield batch
                batch = []
        if batch:
            seen += len(batch)
            yield batch

    tokenizer.train_from_iterator(batches(), trainer=trainer)
    if seen == 0:
        raise GenloopError("no text to train the tokenizer on (every document is empty)")

    eos = special[0]
    pad = PAD if PAD in special else eos
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    names = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": pad}
    mask = next((t for t in special if t in MASK_TOKENS), None)
    if mask is not None:
        names["mask_token"] = mask
    extra = [t for t in special if t not in names.values()]
    config = {
        # PreTrainedTokenizerFast: what transformers 4.x and engines reading this layout
        # (vLLM) expect; transformers 5 maps it to its tokenizers backend.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "additional_special_tokens": extra,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    _write_json(out_dir / CONFIG_FILE, config)
    _write_json(out_dir / SPECIAL_TOKENS_FILE, {**names, "additional_special_tokens": extra})
    return out_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- loading


def tokenizer_file(path: Path) -> Path:
    """``path/tokenizer.json`` for a tokenizer directory, or ``path`` itself for the file."""
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise NotFoundError(
            f"no tokenizer at {path}: expected a directory with {TOKENIZER_FILE} "
            "(Hugging Face layout) or the path of that file"
        )
    return file


def load_tokenizer(path: Path) -> Tokenizer:
    """The fast ``tokenizers.Tokenizer`` of a tokenizer directory (or ``tokenizer.json``)."""
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception for a malformed file
        raise GenloopError(f"{file}: not a valid tokenizer file ({e})") from e


def load_hf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The transformers tokenizer of a directory (chat template, special token names).

    Imports transformers lazily (it is slow to import); never touches the network.
    """
    from transformers import AutoTokenizer

    directory = path if path.is_dir() else path.parent
    tokenizer_file(directory)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def eos_token_id(path: Path, tokenizer: Tokenizer | None = None) -> int:
    """The id that ends a document: ``eos_token`` of ``tokenizer_config.json`` when the
    directory has one, else its ``sep_token`` (BERT-style tokenizers have no eos; BERT
    separates documents with [SEP]), else ``<|endoftext|>``."""
    tok = tokenizer or load_tokenizer(path)
    config_path = (path if path.is_dir() else path.parent) / CONFIG_FILE
    name: str = EOS
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("sep_token", "eos_token"):  # eos_token wins when both are set
            value = config.get(key)
            if isinstance(value, dict):  # the AddedToken form {"content": ...}
                value = value.get("content")
            if isinstance(value, str):
                name = value
    token_id = tok.token_to_id(name)
    if token_id is None:
        raise GenloopError(
            f"tokenizer at {path} has no end-of-document token {name!r}; set eos_token in "
            f"{CONFIG_FILE}"
        )
    return token_id


def sentinel_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids of the tokenizer's sentinels ``<extra_id_0>``, ``<extra_id_1>`` … in order,
    up to the first name it lacks (T5 tokenizers have 100; ``train_bpe`` adds
    ``sentinel_tokens`` of them)."""
    ids: list[int] = []
    while (token_id := tokenizer.token_to_id(SENTINEL.format(len(ids)))) is not None:
        ids.append(token_id)
    return ids


# ------------------------------------------------------------------------- tokenizing

_WS = "\t\n\x0b\x0c\r\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_ASCII_WS = "\t\n\x0b\x0c\r\x20"
# The GPT-2 pre-tokenizer pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# for ASCII text, with \s spelled out as Oniguruma's (Python's \s would add \x1c-\x1f). The
# contractions move after letters and digits, which they never compete with (they start
# with an apostrophe); that order is faster and matches the same words.
_ASCII_WORDS = re.compile(
    rf" ?[A-Za-z]+| ?[0-9]+|'(?:[stmd]|re|ve|ll)| ?[^{_ASCII_WS}A-Za-z0-9]+"
    rf"|[{_ASCII_WS}]+(?![^{_ASCII_WS}])|[{_ASCII_WS}]+"
)
# A line break (with the whitespace after it) followed by a non-space. In the GPT-2 pattern
# a pre-token holding a non-space holds at most one leading space, so the last whitespace
# character before a non-space always starts a pre-token: cutting there (match end - 1)
# never changes the tokenization. _WS is Oniguruma's \s (checked over all of Unicode).
_LINE_START = re.compile(rf"\n[{_WS}]*(?=[^{_WS}])")


def _fast_path_ok(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer ``spec`` (its JSON) is a plain GPT-2-style byte-level BPE, for
    which the word cache gives exactly the library's ids."""
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("add_prefix_space") is False
        and pre.get("use_regex", True) is True
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and all(t.get("special") for t in spec.get("added_tokens", []))
    )


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value (what byte-level vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + i)) for i, b in enumerate(extra))
    return [chars[b] for b in range(256)]


def _native_encoder(spec: dict[str, Any]) -> _bpe.Encoder | None:
    """The C encoder (``_bpe.Encoder``) for a byte-level BPE ``spec``, or None where it does
    not apply: extension not built, a big-endian machine (it writes native uint32), a
    vocabulary whose merges do not name its own tokens, or ``ignore_merges``."""
    model = spec["model"]
    if _bpe is None or sys.byteorder != "little" or model.get("ignore_merges"):
        return None
    vocab: dict[str, int] = model["vocab"]
    try:
        byte_ids = [vocab[c] for c in _byte_level_alphabet()]
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        merges = [(vocab[a], vocab[b], vocab[a + b]) for a, b in pairs]
    except (KeyError, ValueError, TypeError):
        return None
    return _bpe.Encoder(
        np.array(byte_ids, dtype=np.uint32).tobytes(),
        np.array(merges, dtype=np.uint32).reshape(-1, 3).tobytes(),
        _CACHE_WORDS,
    )


class _FastEncoder:
    """Document → uint32 ids + eos, with a word cache where that is exact."""

    def __init__(self, path: Path, *, native: bool = True) -> None:
        """``native=False`` keeps the pure-Python cache even where the C one is built."""
        self.tokenizer = load_tokenizer(path)
        # Special-token strings in documents are text; only our eos ends a document.
        self.tokenizer.encode_special_tokens = True
        self.eos = np.array([eos_token_id(path, self.tokenizer)], dtype="<u4").tobytes()
        spec = json.loads(self.tokenizer.to_str())
        self.fast = _fast_path_ok(spec)
        self.native = _native_encoder(spec) if self.fast and native else None
        self.cache: dict[str, bytes] = {}

    def _ids(self, texts: list[str]) -> list[bytes]:
        """The library's ids for each text (no special tokens added), as uint32 bytes."""
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype="<u4").tobytes() for e in encodings]

    def _ascii(self, text: str) -> bytes:
        if self.native is not None:
            return self.native.encode(text)
        words = _ASCII_WORDS.findall(text)
        cache = self.cache
        try:
            return b"".join(map(cache.__getitem__, words))
        except KeyError:
            pass
        if len(cache) > _CACHE_WORDS:
            cache.clear()
        missing = list(set(words).difference(cache))
        cache.update(zip(missing, self._ids(missing), strict=True))
        out = b"".join(map(cache.__getitem__, words))
        for w in missing:
            if len(w) > _CACHE_WORD_CHARS:
                del cache[w]
        return out

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All documents' ids (eos after each) in one array, and each document's length."""
        parts = [self._encode_one(t) for t in texts] if self.fast else self._ids(list(texts))
        lengths = np.fromiter((len(p) // 4 + 1 for p in parts), dtype=np.int64, count=len(parts))
        # bytearray: a writable array, like the ones the worker processes send back
        flat = np.frombuffer(bytearray(self.eos.join([*parts, b""])), dtype="<u4")
        return flat, lengths

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return _split(self.encode_flat(texts))

    def _encode_one(self, text: str) -> bytes:
        if text.isascii():  # O(1) in CPython: str objects know whether they are ASCII
            return self._ascii(text)
        # Cut at line starts; ASCII lines take the cache, the others the library.
        cuts = [0, *(m.end() - 1 for m in _LINE_START.finditer(text)), len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(cuts)]
        out: list[bytes] = [b""] * len(pieces)
        slow = [i for i, p in enumerate(pieces) if not p.isascii()]
        for i, ids in zip(slow, self._ids([pieces[i] for i in slow]), strict=True):
            out[i] = ids
        for i, p in enumerate(pieces):
            if p.isascii():
                out[i] = self._ascii(p)
        return b"".join(out)


def encode_documents(tokenizer_path: Path, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (uint32) of each text, each followed by the end-of-document id.

    Loads the tokenizer on every call: for a stream of texts use :func:`tokenize_parallel`.
    """
    return _FastEncoder(tokenizer_path).encode(texts)


def _batches(texts: Iterable[str], batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= batch_size or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_encoder: _FastEncoder | None = None


def _init_worker(path: str) -> None:
    global _worker_encoder
    # One process per core already: no Rust thread pool on top of it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _worker_encoder = _FastEncoder(Path(path))


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """In a worker: one flat array and the lengths (cheaper to send than many arrays)."""
    assert _worker_encoder is not None, "worker not initialized"
    return _worker_encoder.encode_flat(texts)


def tokenize_parallel(
    tokenizer_path: Path,
    texts: Iterable[str],
    workers: int,
    batch_size: int = 256,
) -> Iterator[np.ndarray]:
    """Token ids (uint32, eos-terminated) of each text, in input order.

    ``workers`` processes (forkserver) each load the tokenizer once; ``workers <= 1`` runs in
    this process. Texts go out in batches of ``batch_size`` texts or about 1M characters,
    with a bounded number in flight, so memory stays flat however long ``texts`` is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    if workers <= 1:
        encoder = _FastEncoder(tokenizer_path)
        for batch in _batches(texts, batch_size):
            yield from encoder.encode(batch)
        return
    tokenizer_file(tokenizer_path)  # fail here, not in every worker
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(str(tokenizer_path),)
    ) as pool:
        window: list[Future[tuple[np.ndarray, np.ndarray]]] = []
        for batch in _batches(texts, batch_size):
            window.append(pool.submit(_encode_batch, batch))
            if len(window) >= 3 * workers:
                yield from _split(window.pop(0).result())
        for future in window:
            yield from _split(future.result())


def _split(result: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    flat, lengths = result
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []

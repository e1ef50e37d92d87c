"""Text cleaning steps: unicode and whitespace normalization, stop words, quality filters.

Each step is a small picklable callable (``name``, ``__call__(record) -> Record | Dropped``)
that the prepare runner sends to worker processes. Steps change ``record.text`` only when
the text really changes, because the runner counts a record as changed by comparing text.
Records without text (images) pass through untouched.

Speed matters here (the target is ≥ 20 MB/s per core for the whole clean + dedup chain),
so the work is done by C-level string methods and precompiled regexes, each guarded by a
cheap test that skips it when there is nothing to do; no Python loop touches characters.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections import Counter
from typing import Literal

from genloop.data.records import Dropped, Record

NormalForm = Literal["NFC", "NFKC", "none"]

# C0 controls other than \t and \n (\r is turned into \n first), and DEL. These bytes
# never occur inside a multi-byte UTF-8 sequence, so deleting them from the UTF-8 encoding
# with bytes.translate (C speed, ~10× faster than a regex) deletes exactly those characters.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])
_EXTRA_BLANK_LINES_RE = re.compile(r"\n\n\n\n+")  # 3+ blank lines → 2 (a literal prefix: fast)


class Normalize:
    """Unicode normalization, whitespace cleanup and optional lowercasing.

    Whitespace cleanup turns ``\\r\\n`` and ``\\r`` into ``\\n``, drops C0 control
    characters (NUL, form feed …) other than tab and newline, strips trailing whitespace on
    every line, collapses three or more blank lines into two, and strips blank lines at the
    start and whitespace at the end of the document. Indentation is never touched: code
    depends on it.
    """

    name = "normalize"

    def __init__(
        self,
        form: NormalForm = "NFC",
        strip_whitespace: bool = True,
        lowercase: bool = False,
    ) -> None:
        if form not in ("NFC", "NFKC", "none"):
            raise ValueError(f"form must be 'NFC', 'NFKC' or 'none', not {form!r}")
        self.form = form
        self.strip_whitespace = strip_whitespace
        self.lowercase = lowercase

    def __call__(self, record: Record) -> Record | Dropped:
        if record.text is None:
            return record
        text = normalize_text(record.text, self.form, self.strip_whitespace, self.lowercase)
        if text != record.text:
            record.text = text
        return record


def normalize_text(
    text: str,
    form: NormalForm = "NFC",
    strip_whitespace: bool = True,
    lowercase: bool = False,
) -> str:
    """What :class:`Normalize` does to one text."""
    ascii_only = text.isascii()
    if form != "none" and not ascii_only and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    raw = text.encode("utf-8", "surrogatepass")
    kept = raw.translate(None, _CONTROL_BYTES)
    if len(kept) != len(raw):
        text = kept.decode("utf-8", "surrogatepass")
    if strip_whitespace:
        # The substring tests are cheap; the rewrite runs only when a line needs it
        # (always for non-ASCII text, which may end lines with other Unicode spaces).
        if not ascii_only or " \n" in text or ("\t" in text and "\t\n" in text):
            text = "\n".join([line.rstrip() for line in text.split("\n")])
        if "\n\n\n\n" in text:
            text = _EXTRA_BLANK_LINES_RE.sub("\n\n\n", text)
        # Leading blank lines go, but the first line keeps its indentation.
        text = text.lstrip("\n").rstrip()
    if lowercase:
        text = text.lower()
    return text


# A small English stop-word list (no nltk download at run time).
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not now of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves
    """.split()  # noqa: SIM905 (a word list reads better as text)
)


# Words (letters, with inner apostrophes) and what lies between them, kept by split().
_WORD_RE = re.compile(r"([^\W\d_]+(?:['’][^\W\d_]+)*)")


class RemoveStopwords:
    """Remove stop words (case-insensitive, whole words, with the spaces after them).

    Off by default in pipelines: generative models need the stop words to write sentences.
    It is meant for classification-style corpora and experiments.
    """

    name = "remove_stopwords"

    def __init__(self, words: frozenset[str] | None = None) -> None:
        self.words = frozenset(w.lower() for w in words) if words else ENGLISH_STOPWORDS

    def __call__(self, record: Record) -> Record | Dropped:
        if not record.text:
            return record
        parts = _WORD_RE.split(record.text)  # [between, word, between, word, …, between]
        out = [parts[0]]
        stop = self.words
        for i in range(1, len(parts), 2):
            if parts[i].lower() in stop:
                out.append(parts[i + 1].lstrip(" \t"))
            else:
                out += (parts[i], parts[i + 1])
        text = "".join(out)
        if text != record.text:
            record.text = text
        return record


# Characters that count as "symbols" for the quality filter. Every printable ASCII
# character except '#' is ordinary in prose or code (code is full of ()[]{}=<>*&|); '#'
# counts because Gopher's rule flags '#'-heavy documents, and so do ASCII control
# characters other than whitespace. Outside ASCII a character is ordinary when it is a
# letter, digit, mark, whitespace, punctuation (any script's) or one of a few common
# symbols (currency, ©, °, ×, arrows …); the rest is a symbol: emoji, box drawing, U+FFFD
# from broken decoding, private use, format characters — and the ellipsis '…' (Gopher's
# other symbol). The regex finds the candidates; their Unicode category decides.
_SYMBOL_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])
_COMMON_SYMBOLS = "€£¥¢©®™°×÷±≤≥≠→←↑↓·§¶"
_NON_ASCII_CANDIDATE_RE = re.compile("[^\\w\\s\x00-\x7f" + _COMMON_SYMBOLS + "]")


class QualityFilter:
    """Drop records that are empty, too short, too long, repetitive or mostly symbols.

    Reasons: ``empty`` (no text, or only whitespace), ``too_short`` / ``too_long``
    (characters, outside ``[min_chars, max_chars]``; ``max_chars=None``: no upper limit),
    ``repetitive``, ``symbols``.

    Repetition follows Gopher (Rae et al. 2021, "duplicate line character fraction"): the
    fraction of the characters in lines that repeat a line seen earlier in the document.
    When a document has at most three distinct non-empty lines, where lines say little,
    and at least 50 words, the fraction of word characters covered by its most frequent
    word bigram (Gopher's top-2-gram rule) counts too, which catches "buy now buy now …"
    on one line.
    Source code repeats lines naturally (``else:``, ``return None``); at the default 0.3
    only ``bisect.py`` (0.38) of the 734 standard-library modules is dropped.

    The symbol ratio is the fraction of characters that are neither letters, digits,
    marks, whitespace nor punctuation (see ``_COMMON_SYMBOLS`` for the exceptions): broken
    decodings, emoji runs and '#'-banners fail it; prose in any script and source code do
    not, since ASCII punctuation counts as ordinary (the standard library peaks at 0.08).
    """

    name = "quality"

    def __init__(
        self,
        min_chars: int = 20,
        max_chars: int | None = 1_000_000,
        max_repetition_ratio: float = 0.3,
        max_symbol_ratio: float = 0.3,
    ) -> None:
        if min_chars < 0 or (max_chars is not None and max_chars < min_chars):
            raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.max_repetition_ratio = max_repetition_ratio
        self.max_symbol_ratio = max_symbol_ratio

    def __call__(self, record: Record) -> Record | Dropped:
        text = record.text
        if text is None:
            return record if record.data is not None else Dropped("empty", "no text")
        n = len(text)
        if n == 0 or text.isspace():
            return Dropped("empty", "only whitespace" if n else "empty text")
        if n < self.min_chars:
            return Dropped("too_short", f"{n} characters < {self.min_chars}")
        if self.max_chars is not None and n > self.max_chars:
            return Dropped("too_long", f"{n} characters > {self.max_chars}")
        # Only characters outside ASCII can add to the cheap ASCII count, so the (slower)
        # regex runs only when they are numerous enough to matter.
        count, non_ascii = _ascii_symbols(text)
        if (count + non_ascii) / n > self.max_symbol_ratio and (
            symbols := symbol_ratio(text)
        ) > self.max_symbol_ratio:
            return Dropped("symbols", f"symbol ratio {symbols:.2f} > {self.max_symbol_ratio}")
        repeated = repetition_ratio(text)
        if repeated > self.max_repetition_ratio:
            return Dropped(
                "repetitive", f"repetition ratio {repeated:.2f} > {self.max_repetition_ratio}"
            )
        return record


def symbol_ratio(text: str) -> float:
    """Fraction of ``text``'s characters that are symbols (see :class:`QualityFilter`)."""
    if not text:
        return 0.0
    count, non_ascii = _ascii_symbols(text)
    if non_ascii:
        category = unicodedata.category
        candidates = _NON_ASCII_CANDIDATE_RE.findall(text)
        count += sum(1 for c in candidates if category(c)[0] not in "MP" or c == "…")
    return count / len(text)


def _ascii_symbols(text: str) -> tuple[int, int]:
    """(ASCII symbols in ``text``, characters outside ASCII), at C speed."""
    raw = text.encode("utf-8", "surrogatepass")
    count = raw.count(b"#") + len(raw) - len(raw.translate(None, _SYMBOL_CONTROL_BYTES))
    non_ascii = 0 if text.isascii() else len(text) - len(text.encode("ascii", "ignore"))
    return count, non_ascii


def repetition_ratio(text: str) -> float:
    """Fraction of ``text`` that repeats itself (see :class:`QualityFilter`)."""
    lines = text.split("\n")
    total = len(text) - len(lines) + 1  # characters in lines, newlines excluded
    unique = set(lines)
    ratio = (total - sum(map(len, unique))) / total if total else 0.0
    unique.discard("")
    if len(unique) <= 3:
        ratio = max(ratio, _top_bigram_fraction(text))
    return ratio


def _top_bigram_fraction(text: str) -> float:
    words = text.split()
    if len(words) < 50:  # too few words to call repetitive (an import list, a title)
        return 0.0
    bigram, k = Counter(itertools.pairwise(words)).most_common(1)[0]
    if k < 2:
        return 0.0
    chars = sum(map(len, words))
    return k * (len(bigram[0]) + len(bigram[1])) / chars

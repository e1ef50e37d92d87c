"""Text augmentation of row datasets: EDA edits, and the filters every generated row passes.

*EDA* (Wei & Zou 2019, "Easy Data Augmentation Techniques for Boosting Performance on Text
Classification Tasks") makes a new text from an old one with one of four edits, each
touching ``n = max(1, ⌊alpha · words⌋)`` words:

* ``swap``: swap two random words, ``n`` times;
* ``delete``: delete each word with probability ``alpha`` (one word always stays);
* ``insert``: insert a synonym of a random non-stop word at a random position, ``n`` times
  (without a synonym source: a copy of one of the text's own non-stop words);
* ``replace``: replace ``n`` random distinct non-stop words by one of their synonyms.

Words are the text's whitespace-separated pieces, so punctuation stays attached
("movie!" swaps as one word); synonyms replace the letters of a word and keep what is
around them ("movie!" → "film!"), and keep a leading capital. Synonyms come from a
callable ``word → [synonym, ...]`` (``genloop.models.synonyms`` builds one from a masked
LM's embeddings); edits are seeded: the same text, seed and edit give the same result.

:class:`RowFilter` then judges every generated text: quality first (``data.clean``'s
:class:`~genloop.data.clean.QualityFilter`: ``empty``, ``too_short``, ``too_long``,
``symbols``, ``repetitive``), then ``duplicate`` (the same text as a source row or an
earlier generated one, ignoring case and whitespace) and ``near_duplicate`` (MinHash LSH,
``data.dedup``). :class:`RougeFilter` is Self-Instruct's novelty filter (Wang et al. 2022,
§2.3): a new instruction whose ROUGE-L F-measure with any instruction already in the pool
is ≥ 0.7 is dropped (``rouge_similar``).

Which field of a row is augmented: ``classification`` → ``text``, ``sft`` and ``dpo`` →
``prompt``, ``retrieval`` → ``query`` (:data:`AUGMENTED_FIELD`); the other fields (the
label, the response) are kept. Token-classification rows are refused: an edit moves words
away from their labels.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

from genloop.data.clean import ENGLISH_STOPWORDS, QualityFilter, normalize_text
from genloop.data.dedup import ExactDedup, NearDedup, exact_key, minhash_signature
from genloop.data.records import Dropped, Record
from genloop.errors import GenloopError

EdaOp = Literal["swap", "delete", "insert", "replace"]
EDA_OPS: tuple[EdaOp, ...] = get_args(EdaOp)
Synonyms = Callable[[str], Sequence[str]]  # a word → its synonyms, best first

AUGMENTED_FIELD = {"classification": "text", "sft": "prompt", "dpo": "prompt", "retrieval": "query"}
MAX_ALPHA = 0.5
ROUGE_THRESHOLD = 0.7  # Self-Instruct's cut
# a word's letters (inner apostrophes and hyphens too) and what lies around them
_CORE_RE = re.compile(r"^(\W*)([^\W\d_]+(?:['’-][^\W\d_]+)*)(\W*)$")


def augmented_field(kind: str, method: str) -> str:
    """The field ``method`` rewrites in a ``kind`` row; a clear error for kinds it can't."""
    if kind not in AUGMENTED_FIELD:
        kinds = ", ".join(AUGMENTED_FIELD)
        why = (
            ": an edit moves words away from their labels" if kind == "token_classification" else ""
        )
        raise GenloopError(
            f"{method} can't augment a {kind} dataset{why}; it augments {kinds} rows"
        )
    return AUGMENTED_FIELD[kind]


def row_sha256(row: Mapping[str, Any]) -> str:
    """The hash a generated row names its source by (the row's JSON, keys sorted)."""
    line = json.dumps(dict(row), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(line.encode("utf-8", "surrogatepass")).hexdigest()


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one piece of work (a row's copy, a round): stable and order-independent."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def generated_row(
    source: Mapping[str, Any], field: str, text: str, lineage: Mapping[str, Any]
) -> dict[str, Any]:
    """``source`` with ``field`` rewritten to ``text`` and ``meta.augment`` = ``lineage``
    (plus the source's id and hash); the source's ``id`` is not copied (it names the
    source, not this row)."""
    row = {k: v for k, v in source.items() if k not in ("id", "meta")}
    row[field] = text
    meta = dict(source.get("meta") or {}) if isinstance(source.get("meta"), Mapping) else {}
    origin: dict[str, Any] = {"source_sha256": row_sha256(source)}
    if "id" in source:
        origin["source_id"] = source["id"]
    meta["augment"] = dict(lineage) | origin
    row["meta"] = meta
    return row


# ------------------------------------------------------------------------------ EDA


def check_alpha(alpha: float) -> float:
    if not 0.0 < alpha <= MAX_ALPHA:
        raise GenloopError(f"alpha must be in (0, {MAX_ALPHA}], not {alpha}")
    return alpha


def _candidates(words: Sequence[str]) -> list[int]:
    """Positions of words that may be replaced or echoed: letters, not stop words."""
    out = []
    for i, w in enumerate(words):
        m = _CORE_RE.match(w)
        if m and m.group(2).lower() not in ENGLISH_STOPWORDS:
            out.append(i)
    return out


def _with_core(word: str, new_core: str) -> str:
    """``word`` with its letters replaced by ``new_core``, punctuation and capital kept."""
    m = _CORE_RE.match(word)
    if not m:
        return new_core
    before, core, after = m.groups()
    if core[:1].isupper() and new_core[:1].islower():
        new_core = new_core[:1].upper() + new_core[1:]
    return before + new_core + after


def _core(word: str) -> str:
    m = _CORE_RE.match(word)
    return m.group(2) if m else word


def _changes(words: Sequence[str], alpha: float) -> int:
    return max(1, int(alpha * len(words)))


def random_swap(words: Sequence[str], alpha: float, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(_changes(out, alpha)):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], alpha: float, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    out = [w for w in words if rng.random() >= alpha]
    return out or [rng.choice(list(words))]


def random_insertion(
    words: Sequence[str], alpha: float, rng: random.Random, synonyms: Synonyms | None = None
) -> list[str]:
    out = list(words)
    for _ in range(_changes(words, alpha)):
        # EDA tries a few random words for one that has a synonym, then gives up
        for _attempt in range(10):
            where = _candidates(out)
            if not where:
                return out
            core = _core(out[rng.choice(where)])
            options = list(synonyms(core)) if synonyms is not None else [core]
            if options:
                out.insert(rng.randrange(len(out) + 1), rng.choice(options))
                break
    return out


def synonym_replacement(
    words: Sequence[str], alpha: float, rng: random.Random, synonyms: Synonyms
) -> list[str]:
    out = list(words)
    where = _candidates(out)
    rng.shuffle(where)
    budget = _changes(words, alpha)
    for i in where:
        if budget == 0:
            break
        options = list(synonyms(_core(out[i])))
        if options:
            out[i] = _with_core(out[i], rng.choice(options))
            budget -= 1
    return out


def eda_edit(
    text: str, op: EdaOp, alpha: float, rng: random.Random, synonyms: Synonyms | None = None
) -> str:
    """``text`` after one EDA edit (see the module's docstring)."""
    words = text.split()
    if op == "swap":
        out = random_swap(words, alpha, rng)
    elif op == "delete":
        out = random_deletion(words, alpha, rng)
    elif op == "insert":
        out = random_insertion(words, alpha, rng, synonyms)
    elif op == "replace":
        if synonyms is None:
            raise GenloopError("the replace edit needs synonyms (a masked LM's embeddings)")
        out = synonym_replacement(words, alpha, rng, synonyms)
    else:
        raise GenloopError(f"unknown EDA edit {op!r} (edits: {', '.join(EDA_OPS)})")
    return " ".join(out)


def eda_copies(
    text: str,
    copies: int,
    alpha: float,
    seed: int,
    ops: Sequence[EdaOp],
    synonyms: Synonyms | None = None,
) -> list[tuple[EdaOp, int, str]]:
    """``copies`` edited texts, as ``(edit, seed, text)``: the edits taken in turn from a
    seeded shuffle of ``ops`` (so the copies of one text use different edits, as EDA
    spreads its copies over its four), each from its own seed (derived from ``seed`` and
    the copy's number; ``eda_edit(text, op, alpha, random.Random(seed))`` rebuilds it)."""
    if not ops:
        raise GenloopError("no EDA edits to apply")
    order = list(ops)
    random.Random(seed).shuffle(order)  # noqa: S311 (data augmentation, not a secret)
    out = []
    for i in range(copies):
        op = order[i % len(order)]
        copy_seed = derive_seed(seed, i)
        rng = random.Random(copy_seed)  # noqa: S311
        out.append((op, copy_seed, eda_edit(text, op, alpha, rng, synonyms)))
    return out


# -------------------------------------------------------------------------- filters


class RowFilter:
    """Judge generated texts: quality, then duplicates of the source texts or of the
    texts passed so far, then (with ``novelty``) ROUGE-L novelty (module docstring).
    ``dropped`` counts the reasons, ``passed`` the texts that got through."""

    def __init__(
        self,
        sources: Iterable[str],
        *,
        min_chars: int = 5,
        max_chars: int | None = 10_000,
        near_threshold: float | None = 0.85,
        shingle_size: int = 5,
        novelty: RougeFilter | None = None,
    ) -> None:
        self.quality = QualityFilter(min_chars=min_chars, max_chars=max_chars)
        self.shingle_size = shingle_size
        self.exact = ExactDedup()
        self.near = NearDedup(threshold=near_threshold) if near_threshold is not None else None
        self.novelty = novelty
        self.dropped: Counter[str] = Counter()
        self.details: dict[str, str] = {}
        self.passed = 0
        for i, text in enumerate(sources):
            self.exact.seen_before(self._key(text))
            if self.near is not None:
                self.near.duplicate_of(f"s{i}", self._signature(text))

    @staticmethod
    def _key(text: str) -> bytes:
        return exact_key(" ".join(normalize_text(text, lowercase=True).split()))

    def _signature(self, text: str) -> Any:
        return minhash_signature(text, shingle_size=self.shingle_size)

    def reason(self, text: str) -> str | None:
        """Why ``text`` is dropped (counted), or None: it is kept and remembered."""
        verdict = self.quality(Record(id="", source="augment", text=text))
        why: str | None = verdict.reason if isinstance(verdict, Dropped) else None
        if why is None and self.exact.seen_before(self._key(text)):
            why = "duplicate"
        if (
            why is None
            and self.near is not None
            and self.near.duplicate_of(f"g{self.passed}", self._signature(text)) is not None
        ):
            why = "near_duplicate"
        if why is None and self.novelty is not None and not self.novelty.is_novel(text):
            why = "rouge_similar"
        if why is None:
            self.passed += 1
        else:
            self.dropped[why] += 1
        return why

    def drop(self, reason: str, detail: str | None = None) -> None:
        """Count a text dropped before it got here (a teacher's error, say); the first
        ``detail`` of each reason is kept in ``details``."""
        self.dropped[reason] += 1
        if detail is not None:
            self.details.setdefault(reason, detail)


class _Words:
    """ROUGE's tokenizer for any script: lowercase word characters (rouge-score's default
    keeps only ASCII letters and digits, so it would score non-English text 0)."""

    _WORD = re.compile(r"\w+")

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text.lower())


class RougeFilter:
    """Self-Instruct's novelty filter: the highest ROUGE-L F-measure of a text against the
    pool, and ``is_novel`` (below ``threshold``: add it to the pool)."""

    def __init__(self, pool: Iterable[str], threshold: float = ROUGE_THRESHOLD) -> None:
        from rouge_score import rouge_scorer

        if not 0.0 < threshold <= 1.0:
            raise GenloopError(f"the ROUGE-L threshold must be in (0, 1], not {threshold}")
        self.threshold = threshold
        self.pool = list(pool)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())

    def most_similar(self, text: str) -> tuple[float, str | None]:
        best, match = 0.0, None
        for other in self.pool:
            score = float(self._scorer.score(other, text)["rougeL"].fmeasure)
            if score > best:
                best, match = score, other
        return best, match

    def is_novel(self, text: str) -> bool:
        """True (and ``text`` joins the pool) when no pool text is ``threshold``-similar."""
        if self.most_similar(text)[0] >= self.threshold:
            return False
        self.pool.append(text)
        return True

"""Data preparation speed: genloop's data path next to a plain single-process baseline.

Three stages, each run by genloop and by a straightforward baseline written with the same
libraries, side by side in this one run, on the built-in ``python-stdlib`` corpus (loaded
into memory first, so file reading is excluded from both sides):

- clean + exact dedup: genloop's real per-record steps for a code dataset
  (``steps.build_steps``: Normalize + QualityFilter, PII and near dedup off, no parse
  check) run by ``steps.process_chunk`` in N worker processes via ``steps.ordered_map``,
  with ``ExactDedup`` in the main process, against ``unicodedata.normalize`` + ``re.sub``
  whitespace cleanup + the same filters written plainly + ``hashlib.sha256`` into a set,
  in one process. Reported per core (MB/s / N).
- near dedup: genloop's ``minhash_signature`` (through ``process_chunk``, N workers) +
  ``NearDedup``, against datasketch's ``MinHash(num_perm=128).update`` of every word
  5-gram + ``MinHashLSH`` query/insert, in one process. Reported as total MB/s.
- tokenization: genloop's ``tokenize_parallel`` (N workers) against
  ``tokenizers.Tokenizer.encode_batch`` in batches of 256 in one process with one thread,
  with the same tokenizer (a byte-level BPE trained once at the start with ``train_bpe``,
  not timed). Reported per core.
- code formatting (``data.code.format``): genloop's ``FormatCode`` (one ``ruff format``
  process per chunk of 64 files, then the syntax-tree check) against ``ruff format -``
  once per file with the same check, both in one process (the first ~1 MB under
  ``--quick``). Reported per core.

Extra figures: genloop in one process (``*_1proc``, prepare's own ``workers=1`` path: no
worker start-up, no pickling between processes) and the time to start the worker pool
(``worker_startup_s``), which weighs heavily on a corpus this small.

Each figure is the best of a few runs (the genloop and baseline runs alternate), because
the machine may be shared. The outputs are checked against each other (documents kept,
near duplicates found, token ids), and the run ends with one flat JSON line of figures.

    python benchmarks/bench_data.py [--quick] [--workers N] [--repeat R]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import string
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# The baseline tokenizes in one thread (per core); genloop's workers set the same.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

T = TypeVar("T")

TARGET_MB_S_PER_CORE = 20
QUICK_MB = 3.0  # --quick: the first ~3 MB of the corpus
FORMAT_QUICK_MB = 1.0  # --quick: formatting runs on the first ~1 MB (it is the slowest)
CHUNK_RECORDS = 64  # as prepare.CHUNK_RECORDS
TOKENIZE_BATCH = 256


# ------------------------------------------------------------------------------ corpus


@dataclass
class Corpus:
    ids: list[str]
    texts: list[str]
    source: str
    meta: list[dict[str, Any]]
    nbytes: int = 0

    @property
    def mb(self) -> float:
        return self.nbytes / 1e6


def load_corpus(limit_mb: float | None) -> Corpus:
    from genloop.data.records import Record
    from genloop.data.sources import build_source

    src = build_source({"type": "builtin", "name": "python-stdlib"})
    corpus = Corpus([], [], src.kind, [])
    for item in src.records():
        if not isinstance(item, Record) or item.text is None:
            continue
        corpus.ids.append(item.id)
        corpus.texts.append(item.text)
        corpus.meta.append(item.meta)
        corpus.nbytes += len(item.text.encode("utf-8", "surrogatepass"))
        if limit_mb is not None and corpus.nbytes >= limit_mb * 1e6:
            break
    return corpus


def fresh_records(corpus: Corpus) -> list[Any]:
    """New Record objects (steps change record.text in place), made outside the timers."""
    from genloop.data.records import Record

    return [
        Record(i, corpus.source, text=t, meta=dict(m))
        for i, t, m in zip(corpus.ids, corpus.texts, corpus.meta, strict=True)
    ]


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------ measuring


@dataclass
class Timing:
    best_s: float = float("inf")
    runs_s: list[float] = field(default_factory=list)
    result: Any = None


def alternate(
    repeat: int,
    setups: dict[str, Callable[[], Any]],
    runs: dict[str, Callable[[Any], Any]],
) -> dict[str, Timing]:
    """Run each side ``repeat`` times, alternating; keep the best time and the last result.
    ``setups[name]()`` makes the input of one run, outside the timer."""
    timings = {name: Timing() for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            arg = setups[name]()
            t0 = time.perf_counter()
            result = fn(arg)
            seconds = time.perf_counter() - t0
            t = timings[name]
            t.runs_s.append(seconds)
            t.best_s = min(t.best_s, seconds)
            t.result = result
    return timings


def startup_seconds(repeat: int, fn: Callable[[], Any]) -> float:
    """Best time of ``fn``, a run on one tiny input per worker: what starting the worker
    processes costs (forkserver fork, imports, initializer) before any real work."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------- clean + exact dedup


def data_config(workers: int) -> Any:
    from genloop.config import DataConfig

    return DataConfig.model_validate(
        {
            "name": "bench",
            "kind": "code",
            "sources": [{"type": "builtin", "name": "python-stdlib"}],
            "pii": {"enabled": False},
            "dedup": {"exact": True, "near": False},
            "code": {"require_parse": False},
            "workers": workers,
        }
    )


def genloop_results(records: list[Any], steps: Any, workers: int) -> Iterator[Any]:
    """What prepare._clean_and_split iterates over: process_chunk per chunk, in order."""
    from genloop.data import steps as steps_mod

    parts = chunks(records, CHUNK_RECORDS)
    if workers <= 1:
        return (steps_mod.process_chunk(c, steps) for c in parts)
    return steps_mod.ordered_map(
        steps_mod.process_chunk, parts, workers, steps_mod.init_worker, (steps,)
    )


def pool_startup(source: str, steps: Any, workers: int) -> None:
    """``ordered_map`` over one tiny record per worker (only start-up costs anything)."""
    from genloop.data import steps as steps_mod
    from genloop.data.records import Record

    if workers <= 1:
        return
    parts = [[Record(f"tiny-{i}", source, text=f"x = {i}  # start-up")] for i in range(workers)]
    for _ in steps_mod.ordered_map(
        steps_mod.process_chunk, parts, workers, steps_mod.init_worker, (steps,)
    ):
        pass


def genloop_clean_dedup(records: list[Any], steps: Any, workers: int) -> dict[str, Any]:
    from genloop.data.dedup import ExactDedup

    exact = ExactDedup()
    kept: list[str] = []
    drops: Counter[str] = Counter()
    for outcomes, _counts in genloop_results(records, steps, workers):
        for o in outcomes:
            if o.dropped is not None:
                drops[o.dropped.reason] += 1
                continue
            if o.exact_key is not None and exact.seen_before(o.exact_key):
                drops["duplicate"] += 1
                continue
            kept.append(o.record.id)
    return {"kept": kept, "drops": drops}


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TRAILING_WS_RE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN_RE = re.compile(r"\n{4,}")
# Printable ASCII is ordinary in code and prose, except '#' (as genloop's filter counts).
_ORDINARY_ASCII = frozenset(string.printable) - {"#"}


def baseline_clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    text = _TRAILING_WS_RE.sub("", text)  # trailing spaces, line by line
    text = _BLANK_RUN_RE.sub("\n\n\n", text)
    return text.lstrip("\n").rstrip()


def baseline_drop_reason(text: str, c: Any) -> str | None:
    """The quality filter written plainly; ``c`` is the CleanConfig."""
    n = len(text)
    if n == 0 or text.isspace():
        return "empty"
    if n < c.min_chars:
        return "too_short"
    if c.max_chars is not None and n > c.max_chars:
        return "too_long"
    symbols = 0
    for ch in text:
        if ch in _ORDINARY_ASCII or ch.isalnum() or ch.isspace():
            continue
        if not ch.isascii() and unicodedata.category(ch)[0] in "MP" and ch != "…":
            continue
        symbols += 1
    if symbols / n > c.max_symbol_ratio:
        return "symbols"
    lines = text.split("\n")
    seen: set[str] = set()
    repeated = total = 0
    for line in lines:
        total += len(line)
        if line in seen:
            repeated += len(line)
        else:
            seen.add(line)
    ratio = repeated / total if total else 0.0
    seen.discard("")
    if len(seen) <= 3:  # few distinct lines: the most frequent word bigram decides
        words = text.split()
        if len(words) >= 50:
            (a, b), k = Counter(itertools.pairwise(words)).most_common(1)[0]
            if k >= 2:
                ratio = max(ratio, k * (len(a) + len(b)) / sum(map(len, words)))
    if ratio > c.max_repetition_ratio:
        return "repetitive"
    return None


def baseline_clean_dedup(corpus: Corpus, c: Any) -> dict[str, Any]:
    import hashlib

    seen: set[bytes] = set()
    kept: list[str] = []
    drops: Counter[str] = Counter()
    for doc_id, raw in zip(corpus.ids, corpus.texts, strict=True):
        text = baseline_clean(raw)
        reason = baseline_drop_reason(text, c)
        if reason is not None:
            drops[reason] += 1
            continue
        key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if key in seen:
            drops["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(doc_id)
    return {"kept": kept, "drops": drops}


# --------------------------------------------------------------------- near dedup


def genloop_near_dup(records: list[Any], steps: Any, workers: int, threshold: float) -> list[str]:
    from genloop.data.dedup import NearDedup

    near = NearDedup(threshold=threshold, num_perm=steps.num_perm)
    dups: list[str] = []
    for outcomes, _counts in genloop_results(records, steps, workers):
        for o in outcomes:
            rec = o.record
            if near.is_duplicate(f"{rec.source}:{rec.id}", o.signature):
                dups.append(rec.id)
    return dups


def baseline_near_dup(corpus: Corpus, num_perm: int, k: int, threshold: float) -> list[str]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dups: list[str] = []
    for doc_id, text in zip(corpus.ids, corpus.texts, strict=True):
        m = MinHash(num_perm=num_perm)
        words = text.lower().split()
        for i in range(max(1, len(words) - k + 1)):
            m.update(" ".join(words[i : i + k]).encode("utf-8", "surrogatepass"))
        if lsh.query(m):
            dups.append(doc_id)
        else:
            lsh.insert(doc_id, m)
    return dups


# -------------------------------------------------------------------- tokenization


def genloop_tokenize(tok_dir: Path, texts: list[str], workers: int) -> list[Any]:
    from genloop.data.tokenizer import tokenize_parallel

    return list(tokenize_parallel(tok_dir, texts, workers=workers, batch_size=TOKENIZE_BATCH))


def baseline_tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for batch in chunks(texts, TOKENIZE_BATCH):
        out.extend(e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False))
    return out


def same_ids(genloop_ids: list[Any], baseline_ids: list[list[int]], eos: int) -> int:
    """Documents whose ids differ (genloop appends the end-of-document id)."""
    if len(genloop_ids) != len(baseline_ids):
        return max(len(genloop_ids), len(baseline_ids))
    bad = 0
    for g, b in zip(genloop_ids, baseline_ids, strict=True):
        if len(g) != len(b) + 1 or int(g[-1]) != eos or g[:-1].tolist() != b:
            bad += 1
    return bad


# ----------------------------------------------------------------------- formatting


def genloop_format(records: list[Any]) -> list[str]:
    """``FormatCode.batch`` per chunk, as ``process_chunk`` calls it: each file's formatted
    text or drop reason."""
    from genloop.data.code import FormatCode
    from genloop.data.records import Dropped

    step = FormatCode()
    out: list[str] = []
    for part in chunks(records, CHUNK_RECORDS):
        out.extend(r.reason if isinstance(r, Dropped) else r.text for r in step.batch(part))
    return out


def baseline_format(texts: list[str]) -> list[str]:
    """``ruff format -`` once per file, then the same ``ast.dump`` comparison."""
    import subprocess

    from genloop.data.code import ruff_binary, same_program

    ruff = ruff_binary()
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    out: list[str] = []
    for text in texts:
        proc = subprocess.run(
            [ruff, "format", "--isolated", "--no-cache", "-"],
            input=text.encode("utf-8", "surrogatepass"),
            capture_output=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            out.append("unformattable")
            continue
        new = proc.stdout.decode("utf-8")
        if not text.endswith("\n"):
            new = new.removesuffix("\n")
        if new == text:
            out.append(text)
            continue
        try:
            same = same_program(text, new)
        except SyntaxError:
            out.append("unformattable")
            continue
        out.append(new if same else "format_changed_ast")
    return out


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~3 MB subset, under a minute")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (best kept)")
    parser.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary size")
    args = parser.parse_args(argv)
    workers = max(1, args.workers)
    repeat = args.repeat or (2 if args.quick else 3)
    vocab = args.vocab or (4096 if args.quick else 8192)

    from tokenizers import Tokenizer

    from genloop.data.steps import Steps, build_steps
    from genloop.data.tokenizer import eos_token_id, train_bpe

    started = time.perf_counter()
    corpus = load_corpus(QUICK_MB if args.quick else None)
    n_docs = len(corpus.texts)
    print(
        f"corpus: python-stdlib{' (quick subset)' if args.quick else ''}, {n_docs} documents, "
        f"{corpus.mb:.2f} MB in memory; genloop workers: {workers}; "
        f"figures are the best of {repeat} runs (genloop and baseline alternate)",
        flush=True,
    )
    cfg = data_config(workers)
    checks: dict[str, bool] = {}

    # clean + exact dedup -------------------------------------------------------------
    steps = build_steps(cfg)
    names = [type(s).__name__ for s in steps.steps]
    assert names == ["Normalize", "QualityFilter"] and steps.exact and not steps.near, names
    t = alternate(
        repeat,
        {
            "genloop": lambda: fresh_records(corpus),
            "genloop_1proc": lambda: fresh_records(corpus),
            "baseline": lambda: corpus,
        },
        {
            "genloop": lambda recs: genloop_clean_dedup(recs, steps, workers),
            "genloop_1proc": lambda recs: genloop_clean_dedup(recs, steps, 1),
            "baseline": lambda c: baseline_clean_dedup(c, cfg.clean),
        },
    )
    g, b = t["genloop"].result, t["baseline"].result
    clean_g = corpus.mb / t["genloop"].best_s / workers
    clean_startup = startup_seconds(repeat, lambda: pool_startup(corpus.source, steps, workers))
    clean_g1 = corpus.mb / t["genloop_1proc"].best_s
    clean_b = corpus.mb / t["baseline"].best_s
    differ = len(set(g["kept"]).symmetric_difference(b["kept"]))
    tolerance = max(2, n_docs // 200)
    checks["clean_dedup"] = abs(len(g["kept"]) - len(b["kept"])) <= tolerance
    checks["clean_dedup_1proc"] = t["genloop_1proc"].result["kept"] == g["kept"]
    print(
        f"check clean+dedup: kept genloop {len(g['kept'])} / baseline {len(b['kept'])} of "
        f"{n_docs} (tolerance {tolerance}; {differ} ids kept by one side only); drops "
        f"genloop {dict(g['drops'])}, baseline {dict(b['drops'])} -> "
        f"{'OK' if checks['clean_dedup'] else 'MISMATCH'}; genloop in one process keeps the "
        f"same: {'OK' if checks['clean_dedup_1proc'] else 'MISMATCH'}",
        flush=True,
    )

    # near dedup ------------------------------------------------------------------------
    d = cfg.dedup
    near_steps = Steps(
        [], exact=False, near=True, num_perm=d.num_perm, shingle_size=d.shingle_size, binary=False
    )
    t = alternate(
        repeat,
        {
            "genloop": lambda: fresh_records(corpus),
            "genloop_1proc": lambda: fresh_records(corpus),
            "baseline": lambda: corpus,
        },
        {
            "genloop": lambda recs: genloop_near_dup(recs, near_steps, workers, d.threshold),
            "genloop_1proc": lambda recs: genloop_near_dup(recs, near_steps, 1, d.threshold),
            "baseline": lambda c: baseline_near_dup(c, d.num_perm, d.shingle_size, d.threshold),
        },
    )
    g_dups, b_dups = t["genloop"].result, t["baseline"].result
    near_g = corpus.mb / t["genloop"].best_s
    near_g1 = corpus.mb / t["genloop_1proc"].best_s
    near_b = corpus.mb / t["baseline"].best_s
    both = len(set(g_dups) & set(b_dups))
    near_tol = max(3, len(b_dups) // 10)  # different hash functions: estimates differ
    checks["near_dup"] = abs(len(g_dups) - len(b_dups)) <= near_tol
    checks["near_dup_1proc"] = t["genloop_1proc"].result == g_dups
    print(
        f"check near dedup (threshold {d.threshold}, {d.num_perm} permutations, "
        f"{d.shingle_size}-word shingles): near duplicates genloop {len(g_dups)} / baseline "
        f"{len(b_dups)} ({both} found by both; tolerance {near_tol}) -> "
        f"{'OK' if checks['near_dup'] else 'MISMATCH'}; genloop in one process finds the "
        f"same: {'OK' if checks['near_dup_1proc'] else 'MISMATCH'}",
        flush=True,
    )

    # tokenization ------------------------------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="genloop-bench-tok-") as tmp:
        tok_dir = Path(tmp)
        t0 = time.perf_counter()
        train_bpe(corpus.texts, tok_dir, vocab_size=vocab)
        train_s = time.perf_counter() - t0
        tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        # genloop encodes special-token strings inside documents as text; so does this
        tokenizer.encode_special_tokens = True
        eos = eos_token_id(tok_dir, tokenizer)
        t = alternate(
            repeat,
            {name: lambda: corpus.texts for name in ("genloop", "genloop_1proc", "baseline")},
            {
                "genloop": lambda texts: genloop_tokenize(tok_dir, texts, workers),
                "genloop_1proc": lambda texts: genloop_tokenize(tok_dir, texts, 1),
                "baseline": lambda texts: baseline_tokenize(tokenizer, texts),
            },
        )
    tok_g = corpus.mb / t["genloop"].best_s / workers
    tok_g1 = corpus.mb / t["genloop_1proc"].best_s
    tok_b = corpus.mb / t["baseline"].best_s
    bad = same_ids(t["genloop"].result, t["baseline"].result, eos)
    n_tokens = sum(map(len, t["baseline"].result))
    checks["tokenize"] = bad == 0
    checks["tokenize_1proc"] = same_ids(t["genloop_1proc"].result, t["baseline"].result, eos) == 0
    print(
        f"check tokenization (vocab {vocab}, trained in {train_s:.1f} s, not timed): "
        f"{n_tokens} tokens, {n_docs - bad}/{n_docs} documents with identical ids -> "
        f"{'OK' if checks['tokenize'] else 'MISMATCH'}; genloop in one process: "
        f"{'OK' if checks['tokenize_1proc'] else 'MISMATCH'}",
        flush=True,
    )

    # code formatting ---------------------------------------------------------------------
    # the records as the format step sees them in prepare: after normalize (no final newline)
    fmt_texts, fmt_bytes = [], 0
    for text in corpus.texts:
        if args.quick and fmt_bytes > FORMAT_QUICK_MB * 1e6:
            break
        fmt_texts.append(baseline_clean(text))
        fmt_bytes += len(text.encode("utf-8", "surrogatepass"))
    n_fmt = len(fmt_texts)
    fmt_corpus = Corpus(corpus.ids[:n_fmt], fmt_texts, corpus.source, corpus.meta[:n_fmt])
    t = alternate(
        repeat,
        {"genloop": lambda: fresh_records(fmt_corpus), "baseline": lambda: fmt_texts},
        {"genloop": genloop_format, "baseline": baseline_format},
    )
    fmt_mb = fmt_bytes / 1e6
    fmt_g = fmt_mb / t["genloop"].best_s
    fmt_b = fmt_mb / t["baseline"].best_s
    fmt_out = t["genloop"].result
    checks["format"] = fmt_out == t["baseline"].result
    fmt_reasons = Counter(o for o in fmt_out if o in ("unformattable", "format_changed_ast"))
    pairs = zip(fmt_out, fmt_texts, strict=True)
    fmt_changed = sum(o not in fmt_reasons and o != x for o, x in pairs)
    print(
        f"check formatting: {len(fmt_texts)} files ({fmt_mb:.2f} MB), {fmt_changed} changed, "
        f"dropped {dict(fmt_reasons)}; the same outputs as the baseline -> "
        f"{'OK' if checks['format'] else 'MISMATCH'}",
        flush=True,
    )

    # report ------------------------------------------------------------------------------
    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else 0.0

    rows = [
        ("clean + exact dedup, MB/s per core", clean_g, clean_b),
        ("near dedup, MB/s (total)", near_g, near_b),
        ("tokenize, MB/s per core", tok_g, tok_b),
        ("format (ruff + AST check), MB/s/core", fmt_g, fmt_b),
    ]
    print()
    print(f"{'figure':<36} {'genloop':>9} {'baseline':>9} {'ratio':>7}")
    for label, gv, bv in rows:
        print(f"{label:<36} {gv:>9.2f} {bv:>9.2f} {ratio(gv, bv):>6.2f}x")
    print(
        f"(genloop: {workers} worker process(es), per core = MB/s / {workers}; baseline: one "
        f"process, one thread; target {TARGET_MB_S_PER_CORE} MB/s per core; best of {repeat})"
    )
    print(
        f"genloop in one process (prepare's workers=1 path: no worker start-up, no pickling): "
        f"clean + exact dedup {clean_g1:.2f} MB/s, near dedup {near_g1:.2f} MB/s, "
        f"tokenize {tok_g1:.2f} MB/s. Starting {workers} workers (forkserver fork, imports, "
        f"initializer) takes {clean_startup:.2f} s, paid once per run."
    )
    print(f"checks: {'all OK' if all(checks.values()) else checks}")
    figures = {
        "clean_dedup_mb_s_per_core": round(clean_g, 2),
        "baseline_clean_dedup_mb_s_per_core": round(clean_b, 2),
        "clean_dedup_ratio": ratio(clean_g, clean_b),
        "near_dup_mb_s": round(near_g, 2),
        "baseline_near_dup_mb_s": round(near_b, 2),
        "near_dup_ratio": ratio(near_g, near_b),
        "tokenize_mb_s_per_core": round(tok_g, 2),
        "baseline_tokenize_mb_s_per_core": round(tok_b, 2),
        "tokenize_ratio": ratio(tok_g, tok_b),
        "format_mb_s_per_core": round(fmt_g, 2),
        "baseline_format_mb_s_per_core": round(fmt_b, 2),
        "format_ratio": ratio(fmt_g, fmt_b),
        "format_changed": fmt_changed,
        "format_dropped": sum(fmt_reasons.values()),
        "target_mb_s_per_core": TARGET_MB_S_PER_CORE,
        "worker_startup_s": round(clean_startup, 2),
        "clean_dedup_mb_s_1proc": round(clean_g1, 2),
        "near_dup_mb_s_1proc": round(near_g1, 2),
        "tokenize_mb_s_1proc": round(tok_g1, 2),
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "corpus_mb": round(corpus.mb, 2),
        "documents": n_docs,
        "tokenizer_vocab": vocab,
        "repeat": repeat,
        "quick": args.quick,
        "checks_ok": all(checks.values()),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

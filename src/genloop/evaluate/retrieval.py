"""The ``retrieval`` suite: how well a masked_lm model's embeddings find the right document,
against a TF-IDF baseline computed in the same run.

    1. the pairs    the held-out rows of a retrieval dataset (``{"query", "positive"}``,
                    optional ``"negative"``): its ``val`` split, as a pairs dataset has
                    train and val only; ``eval.max_samples`` caps them
    2. the corpus   every distinct positive and hard negative of those rows: each query has
                    one right document among them (texts compared exactly)
    3. rank         the model: cosine similarity of its normalised mean-pooled embeddings
                    (``genloop.models.embeddings``; texts beyond its context are cut); the
                    baseline: scikit-learn's ``TfidfVectorizer`` fit on the corpus, cosine of
                    its L2-normalised vectors
    4. score        recall@1, 5 and 10 (the right document among the k nearest) and MRR (the
                    mean of 1/rank), the baseline's beside each, and their ratio

A tie counts against the query: the right document ranks after every document scored the
same, so a baseline that scores everything 0 (no word in common) gets no hit by luck.

Metrics: ``recall@k``, ``mrr``; ``tfidf_recall@k``, ``tfidf_mrr``; ``recall@k_vs_tfidf``,
``mrr_vs_tfidf`` (model ÷ baseline; left out where the baseline is 0). Per sample: each
query's reciprocal rank for both, so two models compare with bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.errors import GenloopError
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    import numpy as np

    from genloop.config import EvalConfig
    from genloop.models.embeddings import Embedder

SUITE = "retrieval"
KS = (1, 5, 10)
SPLIT = "val"  # the held-out rows of a pairs dataset
SAMPLES = 5  # example queries kept for the report


def ranks(similarities: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """The rank (from 1) of each query's answer among the documents: ``similarities``
    (Q, D), ``answers`` (Q,) document indices. Ties rank the answer last among them."""
    import numpy as np

    right = similarities[np.arange(len(answers)), answers][:, None]  # (Q, 1)
    found: np.ndarray = (similarities >= right).sum(axis=1)
    return found


def rank_metrics(found: np.ndarray, ks: Sequence[int] = KS, prefix: str = "") -> dict[str, float]:
    """recall@k for each k and MRR of the ranks ``found`` (Q,)."""
    out = {f"{prefix}recall@{k}": float((found <= k).mean()) for k in ks}
    out[f"{prefix}mrr"] = float((1.0 / found).mean())
    return out


def tfidf_similarities(queries: Sequence[str], corpus: Sequence[str]) -> np.ndarray:
    """Cosine similarities (Q, D) of TF-IDF vectors fit on ``corpus`` (scikit-learn's
    defaults: word unigrams, smoothed idf, L2-normalised rows)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer()
    try:
        docs = vectorizer.fit_transform(list(corpus))
    except ValueError:  # no word in the corpus at all (empty vocabulary)
        import numpy as np

        return np.zeros((len(queries), len(corpus)), dtype=np.float64)
    sims = (vectorizer.transform(list(queries)) @ docs.T).toarray()
    result: np.ndarray = sims
    return result


def evaluate_retrieval(
    embedder: Embedder,
    rows: Sequence[dict[str, Any]],
    *,
    ks: Sequence[int] = KS,
    batch_size: int = 32,
) -> SuiteResult:
    """The suite on retrieval ``rows`` (module docstring, steps 2-4)."""
    import numpy as np

    if len(rows) < 2:
        raise GenloopError(
            f"the retrieval suite needs at least 2 held-out pairs (got {len(rows)}); give the "
            "dataset more rows or a larger val_fraction"
        )
    index: dict[str, int] = {}
    for row in rows:  # the corpus: positives first, then hard negatives, each text once
        index.setdefault(row["positive"], len(index))
    for row in rows:
        if "negative" in row:
            index.setdefault(row["negative"], len(index))
    corpus = list(index)
    queries = [row["query"] for row in rows]
    answers = np.array([index[row["positive"]] for row in rows])

    q = embedder.embed(queries, batch_size=batch_size, truncate=True)  # (Q, H), unit rows
    d = embedder.embed(corpus, batch_size=batch_size, truncate=True)  # (D, H)
    model_ranks = ranks(q @ d.T, answers)
    tfidf_ranks = ranks(tfidf_similarities(queries, corpus), answers)

    metrics = rank_metrics(model_ranks, ks)
    baseline = rank_metrics(tfidf_ranks, ks, prefix="tfidf_")
    metrics.update(baseline)
    for name in [*(f"recall@{k}" for k in ks), "mrr"]:
        if baseline[f"tfidf_{name}"] > 0:
            metrics[f"{name}_vs_tfidf"] = metrics[name] / baseline[f"tfidf_{name}"]
    samples = [
        {
            "query": row["query"],
            "answer": row["positive"],
            "rank": int(r),
            "tfidf_rank": int(t),
        }
        for row, r, t in zip(rows[:SAMPLES], model_ranks, tfidf_ranks, strict=False)
    ]
    settings = {
        "pairs": len(rows),
        "corpus": len(corpus),
        "ks": list(ks),
        "similarity": "cosine of mean-pooled, normalised embeddings",
        "baseline": "TF-IDF (scikit-learn TfidfVectorizer fit on the corpus), cosine",
        "ties": "the answer ranks after every document scored the same",
    }
    per_sample = {
        "reciprocal_rank": (1.0 / model_ranks).tolist(),
        "tfidf_reciprocal_rank": (1.0 / tfidf_ranks).tolist(),
    }
    return SuiteResult(SUITE, metrics, per_sample, samples, settings)


def run_retrieval_suite(
    model_dir: Path, data_dir: Path, dataset_ref: str, cfg: EvalConfig, device: str
) -> SuiteResult:
    """The ``retrieval`` suite of a masked_lm model version on a retrieval dataset's held-out
    rows (at most ``cfg.max_samples``)."""
    from genloop.data.pairs import pairs_kind, read_pairs
    from genloop.models.embeddings import load_embedder

    kind = pairs_kind(data_dir)
    if kind != "retrieval":
        raise GenloopError(
            f"the retrieval suite needs a retrieval dataset ({{query, positive}} rows); "
            f"{dataset_ref} holds {kind} rows: give --dataset NAME of one made with "
            "'genloop data import FILE.jsonl --kind retrieval'"
        )
    rows = read_pairs(data_dir, SPLIT, kind)
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    embedder = load_embedder(model_dir, device=device)
    result = evaluate_retrieval(embedder, rows)
    result.settings.update({"dataset": dataset_ref, "split": SPLIT})
    return result

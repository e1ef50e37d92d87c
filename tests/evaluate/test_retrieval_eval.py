"""The ``retrieval`` suite: recall@k and MRR of a masked_lm model's embeddings on held-out
retrieval pairs, beside a TF-IDF baseline from the same run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from genloop.config import EvalConfig
from genloop.data.pairs import write_pairs_dataset
from genloop.errors import GenloopError
from genloop.evaluate.retrieval import evaluate_retrieval, rank_metrics, ranks, tfidf_similarities
from genloop.evaluate.run import evaluate_model
from genloop.models.embeddings import load_embedder
from genloop.workspace import Workspace, init_workspace, registry

from ..tiny_encoders import build_bert, encoder_tokenizer, retrieval_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_report_plots")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """``enc@1`` (a tiny BERT, masked_lm), ``pairs@1`` (retrieval rows, half held out) and
    ``labels@1`` (classification rows)."""
    root = tmp_path_factory.mktemp("retrieval")
    tok = encoder_tokenizer(root / "tok")
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "enc", "masked_lm", build_bert(root / "bert", tok))
    rows = retrieval_rows(negatives=True)
    write_pairs_dataset(workspace, "pairs", "retrieval", rows, tokenizer_dir=tok, val_fraction=0.5)
    labels = [{"text": r["query"], "label": str(i % 2)} for i, r in enumerate(rows)]
    write_pairs_dataset(
        workspace, "labels", "classification", labels, tokenizer_dir=tok, val_fraction=0.5
    )
    yield workspace
    workspace.close()


def test_ranks_count_ties_against_the_query() -> None:
    sims = np.array([[0.9, 0.1, 0.1], [0.5, 0.5, 0.2], [0.0, 0.0, 0.0]])
    found = ranks(sims, np.array([0, 1, 2]))
    assert found.tolist() == [1, 2, 3]  # a tie ranks the answer after the others
    metrics = rank_metrics(found, ks=(1, 2))
    assert metrics == {"recall@1": 1 / 3, "recall@2": 2 / 3, "mrr": (1 + 1 / 2 + 1 / 3) / 3}


def test_tfidf_finds_shared_words_and_scores_none_without_them() -> None:
    corpus = ["red apples grow here", "blue boats sail there", "green frogs jump"]
    sims = tfidf_similarities(["apples", "boats sail", "owls"], corpus)
    assert sims.shape == (3, 3)
    assert sims[0].argmax() == 0 and sims[1].argmax() == 1
    assert not sims[2].any()  # no word in common: all 0
    assert ranks(sims, np.array([0, 1, 2])).tolist() == [1, 1, 3]


def test_the_suite_reports_the_model_beside_tfidf_with_ratios(ws: Workspace) -> None:
    record = evaluate_model(
        ws, "enc", dataset="pairs", suites=["retrieval"], cfg=EvalConfig(), device="cpu"
    )
    assert record.suite == "retrieval" and record.dataset == "pairs@1"
    m = record.metrics
    for k in (1, 5, 10):
        assert 0.0 <= m[f"recall@{k}"] <= 1.0  # type: ignore[operator]
        assert 0.0 <= m[f"tfidf_recall@{k}"] <= 1.0  # type: ignore[operator]
    # the queries share no word with any document: TF-IDF scores every one 0, finds nothing
    assert m["tfidf_recall@1"] == 0.0 and "recall@1_vs_tfidf" not in m
    assert m["mrr_vs_tfidf"] == pytest.approx(m["mrr"] / m["tfidf_mrr"])  # type: ignore[operator]
    settings = record.settings["suites"]["retrieval"]
    assert settings["split"] == "val" and settings["corpus"] > settings["pairs"] >= 8
    again = evaluate_model(ws, "enc", dataset="pairs", suites=["retrieval"], device="cpu")
    assert again.metrics == record.metrics


def test_the_suite_agrees_with_its_parts_on_word_overlap(tmp_path: Path, ws: Workspace) -> None:
    """Queries that repeat their document's words: TF-IDF finds them all; the model's
    figures are what its embeddings rank, computed here by hand."""
    embedder = load_embedder(registry.artifact_path(ws, "enc"))
    rows = [{"query": f"{w} owl", "positive": f"the {w} owl"} for w in ("red", "blue", "green")]
    result = evaluate_retrieval(embedder, rows)
    assert result.metrics["tfidf_recall@1"] == 1.0 and result.metrics["tfidf_mrr"] == 1.0
    q = embedder.embed([r["query"] for r in rows])
    d = embedder.embed([r["positive"] for r in rows])
    want = rank_metrics(ranks(q @ d.T, np.arange(3)))
    assert result.metrics["mrr"] == pytest.approx(want["mrr"])
    assert result.metrics["recall@1_vs_tfidf"] == pytest.approx(want["recall@1"])
    assert len(result.per_sample["reciprocal_rank"]) == 3


def test_wrong_suites_and_datasets_are_refused_by_name(ws: Workspace) -> None:
    with pytest.raises(GenloopError, match="perplexity suite needs a text model"):
        evaluate_model(ws, "enc", dataset="pairs", suites=["perplexity"], device="cpu")
    with pytest.raises(GenloopError, match=r"holds classification rows.*--kind retrieval"):
        evaluate_model(ws, "enc", dataset="labels", suites=["retrieval"], device="cpu")
    with pytest.raises(GenloopError, match="records no training dataset"):
        evaluate_model(ws, "enc", device="cpu")

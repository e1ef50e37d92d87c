"""The masked_lm suites: the metrics against their references (scikit-learn's macro F1,
conlleval's chunks, pseudo-perplexity by hand), bootstrap intervals, and ``genloop eval``
on masked LMs registered in a workspace (each runs its head's suite by default)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genloop.data.tokenizer import DEFAULT_SPECIAL_TOKENS
from genloop.errors import GenloopError
from genloop.evaluate.compare import bootstrap_ci, paired_bootstrap_ci
from genloop.evaluate.encoders import (
    entity_spans,
    evaluate_classification,
    evaluate_mlm,
    evaluate_token_classification,
    macro_f1,
)
from genloop.models import masked_lm as mlm
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import PROSE, write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_report_plots")

SPECIALS = [*DEFAULT_SPECIAL_TOKENS, "<|mask|>"]
SIZES = {"n_layer": 2, "n_embd": 32, "n_head": 2, "context_length": 64}


# ------------------------------------------------------------------------------ metrics


def test_macro_f1_is_scikit_learns() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        truth, guess = rng.integers(0, 4, 30), rng.integers(0, 5, 30)
        assert math.isclose(
            float(macro_f1(truth, guess)), f1_score(truth, guess, average="macro"), rel_tol=1e-9
        )


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        (["I-PER", "I-PER", "O", "I-LOC", "I-PER"], [("PER", 0, 2), ("LOC", 3, 4), ("PER", 4, 5)]),
        (["B-PER", "B-PER", "I-LOC"], [("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 3)]),
        (
            ["S-PER", "B-LOC", "I-LOC", "E-LOC", "I-LOC"],
            [("PER", 0, 1), ("LOC", 1, 4), ("LOC", 4, 5)],
        ),
        (["PER", "PER", "O", "LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),  # no prefixes: I-
        (["O", "O"], []),
    ],
)
def test_entities_are_conlleval_chunks(tags: list[str], spans: list[tuple[str, int, int]]) -> None:
    assert entity_spans(tags) == spans


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_samples() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random(40) < 0.7, rng.random(4000) < 0.7
    lo, hi = bootstrap_ci(len(small), lambda idx: small[idx].mean(axis=-1))
    assert lo <= small.mean() <= hi and (lo, hi) == bootstrap_ci(
        len(small), lambda idx: small[idx].mean(axis=-1)
    )
    lo2, hi2 = bootstrap_ci(len(large), lambda idx: large[idx].mean(axis=-1))
    assert hi2 - lo2 < (hi - lo) / 5
    # the paired interval is the bootstrap of the difference, as before
    a, b = rng.random(50), rng.random(50) + 0.1
    assert paired_bootstrap_ci(a, b) == bootstrap_ci(50, lambda i: b[i].mean(-1) - a[i].mean(-1))


# ------------------------------------------------------------------------------- suites


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe

    path = tmp_path_factory.mktemp("tok")
    texts = [PROSE, *(f"{PROSE} {i}" for i in range(20))]
    train_bpe(texts, path, vocab_size=320, special_tokens=SPECIALS)
    return mlm.frame_tokenizer(load_hf_tokenizer(path), 64)


def build(task: str, tok: Any, **extra: Any) -> Any:
    torch.manual_seed(0)
    config = {"task": task, "vocab_size": len(tok), **SIZES, **extra}
    config.update(pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id)
    config.update(sep_token_id=tok.sep_token_id, mask_token_id=tok.mask_token_id)
    return mlm.FAMILY.build(config).eval()


def sentences(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    words = PROSE.split()
    return [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(n)]


def test_classification_scores_agreement_with_intervals(tok: Any) -> None:
    model = build("sequence_classification", tok, labels=["a", "b", "c"])
    texts = [" ".join(s) for s in sentences(60)]
    said = mlm.predict_labels(model, tok, texts)
    rows = [{"text": t, "label": p} for t, p in zip(texts, said, strict=True)]
    perfect = evaluate_classification(model, tok, rows)
    assert perfect.metrics["accuracy"] == perfect.metrics["macro_f1"] == 1.0
    assert perfect.metrics["accuracy_ci_low"] == perfect.metrics["accuracy_ci_high"] == 1.0
    other = {"a": "b", "b": "c", "c": "a"}
    half = [{**r, "label": other[r["label"]]} if i % 2 else r for i, r in enumerate(rows)]
    result = evaluate_classification(model, tok, half)
    m = result.metrics
    assert m["accuracy"] == 0.5 and result.per_sample["accuracy"] == [1.0, 0.0] * 30
    assert m["accuracy_ci_low"] < 0.5 < m["accuracy_ci_high"] and m["accuracy_ci_high"] < 0.7
    assert m["macro_f1_ci_low"] <= m["macro_f1"] <= m["macro_f1_ci_high"]
    with pytest.raises(
        GenloopError, match=r"labels the model does not predict \(z; it predicts a, b, c\)"
    ):
        evaluate_classification(model, tok, [{"text": "x", "label": "z"}])


def test_token_classification_scores_words_and_entities(tok: Any) -> None:
    model = build("token_classification", tok, labels=["B-X", "I-X", "O"])
    rows_words = sentences(40)
    said = mlm.predict_tags(model, tok, rows_words)
    rows = [{"tokens": w, "labels": t} for w, t in zip(rows_words, said, strict=True)]
    result = evaluate_token_classification(model, tok, rows)
    assert result.metrics["token_accuracy"] == 1.0
    assert any(entity_spans(t) for t in said)  # there are entities to find …
    assert result.metrics["entity_f1"] == result.metrics["entity_f1_X"] == 1.0  # … all found
    flipped = [{**r, "labels": ["O"] * len(r["labels"])} for r in rows]
    worse = evaluate_token_classification(model, tok, flipped)
    assert worse.metrics["entity_f1"] == 0.0 and worse.metrics["entity_precision"] == 0.0
    assert worse.metrics["token_accuracy"] == np.mean(worse.per_sample["token_accuracy"])


def test_mlm_suite_scores_masked_tokens_and_pseudo_perplexity(tok: Any, tmp_path: Path) -> None:
    from genloop.data.pack import ShardWriter

    model = build("mlm", tok)
    ids = tok(" ".join(PROSE.split() * 4), add_special_tokens=False)["input_ids"]
    writer = ShardWriter(tmp_path / "tokens", "test", len(tok))
    writer.add(np.array(ids * 3, dtype=np.uint32))
    writer.close()
    result = evaluate_mlm(model, tok, tmp_path / "tokens", "test", 16, pppl_tokens=12, seed=3)
    m, s = result.metrics, result.settings
    assert s["masked_tokens"] == len(result.per_sample["masked_accuracy"]) > 0
    assert m["masked_accuracy"] == np.mean(result.per_sample["masked_accuracy"])
    # pseudo-perplexity by hand: the first window, each of its first 12 tokens masked alone
    row = [tok.cls_token_id, *ids[:15]]
    log_p = []
    with torch.no_grad():
        for j in range(1, 13):
            masked = list(row)
            masked[j] = tok.mask_token_id
            logits = model(input_ids=torch.tensor([masked])).logits[0, j]
            log_p.append(float(logits.log_softmax(-1)[row[j]]))
    assert s["pseudo_perplexity_tokens"] == 12
    assert math.isclose(m["pseudo_perplexity"], math.exp(-np.mean(log_p)), rel_tol=1e-4)
    assert 1 < m["pseudo_perplexity"] < 2 * len(tok)  # an untrained model: near uniform


# ------------------------------------------------------------------------- genloop eval


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Iterator[Workspace]:
    """A text dataset and labeled rows, with an MLM, a classifier and a tagger registered
    against them (untrained: eval scores whatever it is given)."""
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.pairs import write_pairs_dataset
    from genloop.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("eval")
    workspace = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "prose",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    tokenizer = TokenizerConfig(vocab_size=320, seq_len=32, special_tokens=SPECIALS)
    prose, _ = prepare_dataset(workspace, data, tokenizer)
    tok_dir = workspace.store.open_verified(prose.artifact) / "tokenizer"
    texts = [
        {"text": " ".join(s), "label": "long" if len(s) > 6 else "short"} for s in sentences(80)
    ]
    tags = [
        {"tokens": s, "labels": ["B-A" if w == "cat" else "O" for w in s]} for s in sentences(80)
    ]
    topics = write_pairs_dataset(
        workspace, "topics", "classification", texts, tokenizer_dir=tok_dir
    )
    tagged = write_pairs_dataset(
        workspace, "tagged", "token_classification", tags, tokenizer_dir=tok_dir
    )
    for name, model, dataset in (
        ("enc", build("mlm", tok), prose),
        ("clf", build("sequence_classification", tok, labels=["long", "short"]), topics),
        ("tagger", build("token_classification", tok, labels=["B-A", "O"]), tagged),
    ):
        out = root / name
        mlm.FAMILY.save(model, out, tokenizer_dir=tok_dir)
        registry.register_model(workspace, name, "masked_lm", out, dataset_version_id=dataset.id)
    yield workspace
    workspace.close()


@pytest.mark.parametrize(
    ("ref", "suite", "metrics"),
    [
        ("enc", "mlm", {"masked_accuracy", "pseudo_perplexity"}),
        ("clf", "classification", {"accuracy", "macro_f1", "macro_f1_ci_high"}),
        ("tagger", "token_classification", {"token_accuracy", "entity_f1", "entity_f1_A"}),
    ],
)
def test_genloop_eval_runs_the_heads_suite_and_stores_it(
    ws: Workspace, ref: str, suite: str, metrics: set[str]
) -> None:
    from genloop.config import EvalConfig
    from genloop.evaluate.run import evaluate_model

    record = evaluate_model(ws, ref, cfg=EvalConfig(max_samples=20), device="cpu")
    assert record.suites == [suite] and metrics <= set(record.metrics)
    assert metrics <= set(registry.resolve(ws, ref).metrics)  # merged into the version's
    if suite != "mlm":  # row datasets have no test split: the val rows are read
        from genloop.evaluate.store import load_results

        assert load_results(ws, record)[0].settings["split"] == "val"


def test_a_suite_of_another_head_is_refused_by_name(ws: Workspace) -> None:
    from genloop.evaluate.run import evaluate_model

    with pytest.raises(
        GenloopError,
        match=r"classification suite needs a sequence_classification model; this one is mlm "
        r"\(it runs: mlm\)",
    ):
        evaluate_model(ws, "enc", suites=["classification"], dataset="topics", device="cpu")
    with pytest.raises(GenloopError, match="the perplexity suite needs a text model"):
        evaluate_model(ws, "clf", suites=["perplexity"], device="cpu")
    with pytest.raises(
        GenloopError,
        match="the classification suite reads classification rows; dataset tagged@1 holds "
        "token_classification",
    ):
        evaluate_model(ws, "clf", suites=["classification"], dataset="tagged", device="cpu")

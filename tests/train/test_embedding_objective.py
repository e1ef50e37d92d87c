"""The embedding objective: sentence-transformers' MultipleNegativesRankingLoss on retrieval
rows, in-batch negatives plus hard negatives, on a tiny BertForMaskedLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from genloop.config import TrainConfig
from genloop.data.pairs import read_pairs, write_pairs_dataset
from genloop.errors import ConfigError, GenloopError
from genloop.train.embedding import (
    ContrastiveEmbedding,
    make_embedding_objective,
    multiple_negatives_ranking_loss,
)
from genloop.train.families import TrainingData
from genloop.workspace import Workspace

from ..tiny_encoders import build_bert, encoder_tokenizer, recall_at_1, retrieval_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def st_mnrl(anchors: torch.Tensor, candidates: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss, written out from its source:
    ``scores = util.cos_sim(a, cat(positives, negatives)) * scale``, labels
    ``range(len(a))``, ``nn.CrossEntropyLoss``; ``cos_sim`` normalises with
    ``F.normalize(p=2, dim=1)`` and multiplies."""
    a = F.normalize(anchors, p=2, dim=1)
    b = F.normalize(candidates, p=2, dim=1)
    scores = torch.mm(a, b.transpose(0, 1)) * scale
    labels = torch.tensor(range(len(scores)), dtype=torch.long, device=scores.device)
    return torch.nn.CrossEntropyLoss()(scores, labels)


def st_mean_pooling(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' ``Pooling(pooling_mode='mean')``."""
    mask = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).float()
    return (token_embeddings * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return encoder_tokenizer(tmp_path_factory.mktemp("tok"))


def bert(tok_dir: Path, tmp: Path, seed: int = 0) -> Any:
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(build_bert(tmp / f"bert{seed}", tok_dir, seed=seed))


def data(
    ws: Workspace, tok_dir: Path, rows: list[dict[str, Any]], val: float = 0.0
) -> TrainingData:
    info = write_pairs_dataset(
        ws, "pairs", "retrieval", rows, tokenizer_dir=tok_dir, val_fraction=val
    )
    return TrainingData(
        ref=info.ref, dir=workspace_dir(ws, info.artifact), tokenizer_dir=tok_dir, seq_len=64
    )


def workspace_dir(ws: Workspace, artifact: str) -> Path:
    return ws.store.open_verified(artifact)


def config(**train: Any) -> TrainConfig:
    return TrainConfig.model_validate({"objective": "embedding", "batch_size": 8, **train})


def test_the_loss_is_sentence_transformers_mnrl_with_and_without_hard_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(6, 16, generator=g) for _ in range(3))
    assert torch.allclose(multiple_negatives_ranking_loss(q, p), st_mnrl(q, p), atol=1e-6)
    docs = torch.cat([p, n])
    assert torch.allclose(multiple_negatives_ranking_loss(q, docs), st_mnrl(q, docs), atol=1e-6)
    assert torch.allclose(
        multiple_negatives_ranking_loss(q, docs, scale=5.0), st_mnrl(q, docs, 5.0), atol=1e-6
    )
    # an all-False mask changes nothing; masking a wrong answer lowers the loss
    none = torch.zeros(6, 12, dtype=torch.bool)
    assert torch.allclose(multiple_negatives_ranking_loss(q, docs, same=none), st_mnrl(q, docs))
    one = none.clone()
    one[0, 1] = True
    assert multiple_negatives_ranking_loss(q, docs, same=one) < st_mnrl(q, docs)


def test_the_objective_loss_on_a_batch_equals_the_reference_on_the_encoder(
    workspace: Workspace, tok_dir: Path, tmp_path: Path
) -> None:
    model = bert(tok_dir, tmp_path)
    rows = retrieval_rows(negatives=True)[:6]
    objective = make_embedding_objective(config(), data(workspace, tok_dir, rows), model, CPU)
    assert isinstance(objective, ContrastiveEmbedding)
    batch = objective.collate(objective.train)
    assert batch["doc_ids"].shape[0] == 12  # 6 positives, then 6 hard negatives
    assert not batch["same"].any()  # no document repeats another's text
    loss, tokens = objective.loss(model, batch)
    assert tokens == int(batch["query_mask"].sum() + batch["doc_mask"].sum())

    def encode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return st_mean_pooling(hidden, mask)

    with torch.no_grad():
        want = st_mnrl(
            encode(batch["query_ids"], batch["query_mask"]),
            encode(batch["doc_ids"], batch["doc_mask"]),
        )
    assert torch.allclose(loss.detach(), want, atol=1e-5)


def test_a_shared_positive_is_not_a_negative_of_its_own_queries(
    workspace: Workspace, tok_dir: Path, tmp_path: Path
) -> None:
    rows = retrieval_rows()[:4]
    rows.append({"query": "which other cat", "positive": rows[0]["positive"]})
    objective = make_embedding_objective(
        config(), data(workspace, tok_dir, rows), bert(tok_dir, tmp_path), CPU
    )
    batch = objective.collate(objective.train)
    same = batch["same"]
    first = [i for i, r in enumerate(objective.train) if r.positive_doc == 0]
    assert len(first) == 2
    a, b = first
    assert same[a, b] and same[b, a]
    assert int(same.sum()) == 2


def test_training_lowers_the_loss_and_raises_recall(
    workspace: Workspace, tok_dir: Path, tmp_path: Path
) -> None:
    """The rows pair words that share nothing, so only training can find the pairs: the
    recall of the training rows starts near chance and must end near 1."""
    from transformers import BertForMaskedLM

    from genloop.models.embeddings import load_embedder

    model_dir = build_bert(tmp_path / "bert", tok_dir, seed=1)
    model = BertForMaskedLM.from_pretrained(model_dir)
    rows = retrieval_rows(negatives=True)
    pairs = data(workspace, tok_dir, rows, val=0.25)
    objective = make_embedding_objective(config(seed=1), pairs, model, CPU)
    assert objective.val and all(len(b["query_ids"]) > 1 for b in objective.val_batches(4))
    train = read_pairs(pairs.dir, "train", "retrieval")
    assert len(train) == len(objective.train) > 10
    embedder = load_embedder(model_dir)
    embedder.encoder = model.bert  # the model being trained, through the serving code

    def recall() -> float:
        model.eval()
        q = embedder.embed([r["query"] for r in train])
        d = embedder.embed([r["positive"] for r in train])
        return recall_at_1(q, d)

    before = recall()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _step, batch in zip(range(40), objective.train_batches(0), strict=False):
        loss, _ = objective.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = recall()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert before < 0.4 and after > 0.8, (before, after)


def test_wrong_data_and_settings_are_refused_by_name(
    workspace: Workspace, tok_dir: Path, tmp_path: Path
) -> None:
    model = bert(tok_dir, tmp_path)
    retrieval = data(workspace, tok_dir, retrieval_rows()[:6])
    with pytest.raises(ConfigError, match="batch_size ≥ 2"):
        make_embedding_objective(config(batch_size=1), retrieval, model, CPU)
    with pytest.raises(ConfigError, match=r"needs model\.family"):
        make_embedding_objective(TrainConfig(objective="sft"), retrieval, model, CPU)
    info = write_pairs_dataset(
        workspace,
        "labels",
        "classification",
        [{"text": "a cat", "label": "x"}, {"text": "a dog", "label": "y"}],
        tokenizer_dir=tok_dir,
        val_fraction=0.0,
    )
    labels = TrainingData(info.ref, workspace_dir(workspace, info.artifact), tok_dir, 64)
    with pytest.raises(GenloopError, match="--kind retrieval"):
        make_embedding_objective(config(), labels, model, CPU)
    with pytest.raises(GenloopError, match="needs a transformers model with an encoder"):
        make_embedding_objective(config(), retrieval, torch.nn.Linear(2, 2), CPU)

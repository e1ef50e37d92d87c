"""The ``embedding`` objective: contrastive fine-tuning of a masked_lm encoder on retrieval rows.

A ``retrieval`` dataset (``genloop.data.pairs``; ``genloop data import FILE.jsonl --kind
retrieval``) holds ``{"query", "positive"}`` rows, with an optional hard ``"negative"``. A
batch of B rows is B queries and their documents: the B positives, then the hard negatives
of the rows that have one (H of them). Both sides go through the model's encoder
(``model.base_model``) and are mean-pooled and normalised as every genloop embedding is
(``genloop.models.embeddings``). The loss is sentence-transformers'
``MultipleNegativesRankingLoss`` (in-batch negatives; Henderson et al. 2017, the InfoNCE of
van den Oord et al. 2018 with cosine similarity):

    s_ij = scale · cos(q_i, d_j)            i < B, j < B + H   (scale 20, as theirs)
    L    = mean_i  -log softmax_j(s_i·)_i    (q_i's answer is d_i; every other d_j is a negative)

Two rows of a batch can share a positive (a document with several queries): the other's
copy would then count as a wrong answer. sentence-transformers keeps such rows apart with
its ``NoDuplicatesBatchSampler``; here a document whose text equals q_i's positive is left
out of q_i's softmax (its score set to -inf), which is the same loss whenever a batch holds
no duplicates.

The masked_lm family's builder calls :func:`make_embedding_objective`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import TrainingData, wrong_family

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import TrainConfig
    from genloop.train.objectives import Batch

OBJECTIVE = "embedding"
SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default


@dataclass(frozen=True)
class RetrievalExample:
    """One tokenized row; ``*_doc`` are ids of distinct document texts (duplicate masking)."""

    query: list[int]
    positive: list[int]
    negative: list[int] | None
    positive_doc: int
    negative_doc: int | None


def multiple_negatives_ranking_loss(
    queries: Tensor, documents: Tensor, *, scale: float = SCALE, same: Tensor | None = None
) -> Tensor:
    """Cross-entropy of scaled cosine similarities: ``queries`` (B, D) against
    ``documents`` (B + H, D), query i's answer being document i. ``same`` (B, B + H) bool
    marks documents left out of a query's softmax (duplicates of its answer)."""
    import torch
    import torch.nn.functional as F

    from genloop.models.embeddings import normalize

    scores = scale * normalize(queries) @ normalize(documents).T  # (B, B + H)
    if same is not None:
        scores = scores.masked_fill(same, float("-inf"))
    labels = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores, labels)


def sentence_embeddings(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean-pooled, normalised embeddings (B, H) of a padded batch through the model's
    encoder (``model.base_model``), with gradients."""
    from genloop.models.embeddings import mean_pool, normalize

    encoder = _encoder(model)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return normalize(mean_pool(hidden, attention_mask))


def _encoder(model: nn.Module) -> Any:
    encoder = getattr(model, "base_model", None)
    if encoder is None:
        raise GenloopError(
            f"the embedding objective needs a transformers model with an encoder "
            f"(base_model); got {type(model).__name__} (it trains in one process: run it "
            "without torchrun)"
        )
    return encoder


@dataclass
class ContrastiveEmbedding:
    """In-batch-negatives contrastive training of sentence embeddings (module docstring)."""

    train: list[RetrievalExample]
    val: list[RetrievalExample]
    batch_size: int
    seed: int
    device: torch.device
    pad_id: int
    scale: float = SCALE
    name: str = OBJECTIVE

    def collate(self, rows: Sequence[RetrievalExample]) -> Batch:
        """Queries, then documents (positives, then the hard negatives there are), padded;
        ``same`` marks each query's duplicates of its answer among the documents."""
        import torch

        from genloop.models.embeddings import pad_batch

        docs = [r.positive for r in rows] + [r.negative for r in rows if r.negative is not None]
        doc_ids = [r.positive_doc for r in rows] + [
            r.negative_doc for r in rows if r.negative_doc is not None
        ]
        groups = torch.tensor(doc_ids)
        answers = groups[: len(rows)]
        same = answers[:, None] == groups[None, :]  # (B, B + H)
        same.fill_diagonal_(False)
        q_ids, q_mask = pad_batch([r.query for r in rows], self.pad_id)
        d_ids, d_mask = pad_batch(docs, self.pad_id)
        batch = {
            "query_ids": q_ids,
            "query_mask": q_mask,
            "doc_ids": d_ids,
            "doc_mask": d_mask,
            "same": same,
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        from genloop.train.objectives import batch_indices

        order = batch_indices(
            len(self.train), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx in order:
            yield self.collate([self.train[i] for i in idx])

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val), n * self.batch_size), self.batch_size
        return [
            self.collate(self.val[i : i + b])
            for i in range(0, count, b)
            if min(b, count - i) > 1  # a lone query has no in-batch negative
        ]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        q = sentence_embeddings(model, batch["query_ids"], batch["query_mask"])  # (B, H)
        d = sentence_embeddings(model, batch["doc_ids"], batch["doc_mask"])  # (B + H', H)
        loss = multiple_negatives_ranking_loss(q, d, scale=self.scale, same=batch["same"])
        return loss, int(batch["query_mask"].sum() + batch["doc_mask"].sum())


def make_embedding_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> ContrastiveEmbedding:
    """The ``embedding`` objective on the retrieval rows of ``data`` for ``model`` (a
    masked_lm model; its ``base_model`` is trained). Texts are cut to the encoder's context
    and the dataset's ``seq_len``, whichever is shorter."""
    import torch

    from genloop.data.pairs import pairs_kind, read_pairs
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.embeddings import encoder_context
    from genloop.models.masked_lm import frame_tokenizer

    if t.objective != OBJECTIVE:
        raise wrong_family(t.objective)
    if t.batch_size < 2:
        raise ConfigError("the embedding objective needs train.batch_size ≥ 2 (in-batch negatives)")
    encoder = _encoder(model)
    kind = pairs_kind(data.dir)
    if kind != "retrieval":
        raise GenloopError(
            f"train.objective embedding trains on retrieval rows ({{query, positive}}, optional "
            f"negative), but dataset {data.ref} holds {kind} rows; import some with "
            "'genloop data import FILE.jsonl --kind retrieval'"
        )
    if data.tokenizer_dir is None:
        raise GenloopError(f"dataset {data.ref} has no tokenizer/; import it again with one")
    tokenizer = load_hf_tokenizer(data.tokenizer_dir)
    config = encoder.config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise GenloopError(
            f"the dataset's tokenizer has {len(tokenizer)} tokens but the model only {vocab}: "
            "import the rows with the model's own tokenizer"
        )
    max_len = min(data.seq_len, encoder_context(config))
    tokenizer = frame_tokenizer(tokenizer, max_len)  # cls … sep, as the saved model reads
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(config, "pad_token_id", None)
    docs: dict[str, int] = {}  # distinct document texts, train and val together

    def encode(split: str) -> list[RetrievalExample]:
        rows = read_pairs(data.dir, split, "retrieval")
        if not rows:
            return []
        queries = _tokenize(tokenizer, [r["query"] for r in rows], max_len)
        positives = _tokenize(tokenizer, [r["positive"] for r in rows], max_len)
        negative_rows = [r for r in rows if "negative" in r]
        negatives = iter(_tokenize(tokenizer, [r["negative"] for r in negative_rows], max_len))
        out = []
        for row, q, p in zip(rows, queries, positives, strict=True):
            neg = next(negatives) if "negative" in row else None
            out.append(
                RetrievalExample(
                    query=q,
                    positive=p,
                    negative=neg,
                    positive_doc=docs.setdefault(row["positive"], len(docs)),
                    negative_doc=docs.setdefault(row["negative"], len(docs))
                    if neg is not None
                    else None,
                )
            )
        return out

    train = encode("train")
    if len(train) < 2:
        raise GenloopError(
            f"dataset {data.ref} has {len(train)} training rows; the embedding objective "
            "needs at least 2 (in-batch negatives)"
        )
    return ContrastiveEmbedding(
        train=train,
        val=encode("val"),
        batch_size=t.batch_size,
        seed=t.seed,
        device=torch.device(device),
        pad_id=int(pad_id) if isinstance(pad_id, int) else 0,
    )


def _tokenize(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    if not texts:
        return []
    found = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len)
    return [list(ids) for ids in found["input_ids"]]

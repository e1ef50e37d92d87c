"""Text suites: perplexity on a token split, and generation metrics on prefix → reference pairs.

Perplexity (suite ``perplexity``) reads the split's packed windows exactly as training
does (``TokenDataset``: window ``i`` is stream positions ``[i·T, (i+1)·T]``, documents
packed with their end-of-document ids), so validation loss during training and this
number agree. ``ppl = exp(total NLL / total predicted tokens)``.

Generation (suite ``generation``) continues held-out documents: ``continuation_pairs``
cuts each chosen document into a prefix and the text that follows it, ``evaluate_generation``
generates a continuation of each prefix and ``generation_metrics`` scores them against
the real text:

- ``bleu``: corpus BLEU (sacrebleu, its standard ``13a`` tokenization, 0–100);
  ``sentence_bleu`` is the mean of per-pair sentence BLEU (exponential smoothing, effective
  order), whose per-pair values make bootstrap intervals possible;
- ``rouge1``, ``rouge2``, ``rougeL``: mean F1 (rouge-score, no stemmer, 0–1). Its
  tokenizer lowercases and keeps ``[a-z0-9]`` runs only, so text in other scripts scores 0;
- ``exact_match``: share of predictions equal to their reference once both are stripped
  of surrounding whitespace;
- lengths: ``pred_chars_mean``, ``ref_chars_mean``, ``pred_words_mean``,
  ``ref_words_mean`` (whitespace-separated words) and ``length_ratio`` (total prediction
  words over total reference words).

Every key of ``per_sample`` is also a metric, and that metric is the mean of the list, so a
comparison can bootstrap it.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from genloop.data.jsonl import read_jsonl
from genloop.errors import GenloopError, NotFoundError
from genloop.evaluate.generate import generate_texts
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BLEU_TOKENIZE = "13a"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_SHOWN_SAMPLES = 5

# ---------------------------------------------------------------------------- perplexity


def perplexity(
    model: PreTrainedModel,
    token_dir: Path,
    split: str,
    seq_len: int,
    *,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> SuiteResult:
    """Perplexity of a causal LM on a split's windows of ``seq_len`` predicted tokens.

    ``max_windows`` keeps that many windows spread evenly over the split (window
    ``⌊j·n/m⌋`` for ``j < m``), so a capped run still sees every part of it.
    ``per_sample["nll"]`` holds each window's mean NLL (nats per token).
    """
    from genloop.data.pack import TokenDataset

    if getattr(model.config, "is_encoder_decoder", False):
        raise GenloopError("perplexity on packed token windows needs a causal (decoder-only) LM")
    if batch_size < 1:
        raise GenloopError(f"batch_size must be at least 1, not {batch_size}")
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and seq_len > context:
        raise GenloopError(f"seq_len {seq_len} is longer than the model's context ({context})")
    ds = TokenDataset(token_dir, split, seq_len)
    vocab = int(model.config.vocab_size)
    if ds.vocab_size > vocab:
        raise GenloopError(
            f"split {split!r} in {token_dir} was tokenized with a {ds.vocab_size}-token "
            f"vocabulary, larger than the model's {vocab}: not this model's tokenizer"
        )
    n = len(ds)
    if n == 0:
        raise GenloopError(
            f"split {split!r} has {ds.num_tokens} tokens: too few for one window of {seq_len + 1}"
        )
    if max_windows is not None and max_windows < 1:
        raise GenloopError(f"max_windows must be at least 1, not {max_windows}")
    m = n if max_windows is None else min(n, max_windows)
    windows = (np.arange(m, dtype=np.int64) * n) // m

    device = next(model.parameters()).device
    was_training = model.training
    model.train(False)
    nll: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, m, batch_size):
                pairs = [ds[int(i)] for i in windows[start : start + batch_size]]
                x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)  # (B, T)
                y = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)  # (B, T)
                logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
                ce = F.cross_entropy(
                    logits.float().flatten(0, 1), y.flatten(), reduction="none"
                ).view_as(y)  # (B, T)
                nll.extend(ce.mean(dim=1).tolist())
    finally:
        model.train(was_training)
    mean_nll = float(np.mean(nll))  # windows are equally long: token-weighted = window mean
    return SuiteResult(
        suite="perplexity",
        metrics={"perplexity": math.exp(mean_nll), "nll": mean_nll},
        per_sample={"nll": nll},
        settings={
            "split": split,
            "seq_len": seq_len,
            "windows": m,
            "windows_in_split": n,
            "tokens": m * seq_len,
            "max_windows": max_windows,
            "batch_size": batch_size,
        },
    )


# ------------------------------------------------------------------ continuation pairs


def continuation_pairs(
    docs_jsonl: Path,
    n: int | None,
    prefix_chars: int,
    cont_chars: int,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Up to ``n`` (prefix, reference) pairs from a dataset's ``docs/{split}.jsonl``.

    A document gives its opening text as the prefix (at most ``prefix_chars`` and at most
    half the document) and what follows as the reference (at most ``cont_chars``). Both end
    at a line break when one falls within the budget, else before the last whitespace, else
    exactly at the budget. Documents without a non-blank prefix and reference are skipped.

    Which documents: the ``n`` with the smallest hash of ``(seed, id)``, in file order. The
    choice of a document does not depend on the others, so adding documents to a split
    keeps most of the chosen ones, and a smaller ``n`` picks a subset of a larger one.
    """
    if prefix_chars < 1 or cont_chars < 1:
        raise GenloopError(
            f"prefix_chars and cont_chars must be at least 1, not {prefix_chars}, {cont_chars}"
        )
    if n is not None and n < 1:
        raise GenloopError(f"n must be at least 1, not {n}")
    if not docs_jsonl.is_file():
        raise NotFoundError(f"no documents file {docs_jsonl}")

    def candidates() -> Iterator[tuple[bytes, int, str, str]]:
        for lineno, doc_id, text in _read_docs(docs_jsonl):
            pair = _split_document(text, prefix_chars, cont_chars)
            if pair is not None:
                key = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
                yield key, lineno, pair[0], pair[1]

    chosen = list(candidates()) if n is None else heapq.nsmallest(n, candidates())
    chosen.sort(key=lambda c: c[1])
    return [(prefix, reference) for _, _, prefix, reference in chosen]


def _read_docs(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, id, text) of each row; the line number stands in for a missing id."""
    for lineno, where, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise GenloopError(f'{where}: expected an object with a "text" string')
        doc_id = row.get("id")
        yield lineno, str(lineno if doc_id is None else doc_id), row["text"]


_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def _cut(text: str, start: int, budget: int) -> int:
    """Where a piece of at most ``budget`` characters starting at ``start`` ends."""
    limit = min(len(text), start + budget)
    if limit == len(text):
        return limit
    newline = text.rfind("\n", start, limit)
    if newline >= 0:
        return newline + 1  # the piece keeps its line break
    space = _LAST_SPACE.search(text, start, limit)
    if space is not None and space.start() > start:
        return space.start()  # the next piece starts with the space, as BPE words do
    return limit


def _split_document(text: str, prefix_chars: int, cont_chars: int) -> tuple[str, str] | None:
    if len(text) < 2:
        return None
    p = _cut(text, 0, min(prefix_chars, len(text) // 2))
    e = _cut(text, p, cont_chars)
    prefix, reference = text[:p], text[p:e]
    if not prefix.strip() or not reference.strip():
        return None
    return prefix, reference


# ----------------------------------------------------------------- generation metrics


def generation_metrics(predictions: list[str], references: list[str]) -> SuiteResult:
    """BLEU, ROUGE-1/2/L F1, exact match and length statistics of predictions."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics.bleu import BLEU

    if len(predictions) != len(references):
        raise GenloopError(
            f"{len(predictions)} predictions but {len(references)} references; they pair up"
        )
    if not predictions:
        raise GenloopError("no predictions to score")

    corpus = BLEU(tokenize=BLEU_TOKENIZE)
    corpus_score = corpus.corpus_score(predictions, [references])
    sentence = BLEU(tokenize=BLEU_TOKENIZE, effective_order=True)
    sentence_bleu = [
        float(sentence.sentence_score(p, [r]).score)
        for p, r in zip(predictions, references, strict=True)
    ]
    # rouge1/2/L need no nltk data (only rougeLsum's sentence splitter would)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    rouge: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)  # (target, prediction)
        for t in ROUGE_TYPES:
            rouge[t].append(float(scores[t].fmeasure))
    exact = [float(p.strip() == r.strip()) for p, r in zip(predictions, references, strict=True)]
    pred_words = [len(p.split()) for p in predictions]
    ref_words = [len(r.split()) for r in references]

    per_sample: dict[str, list[float]] = {
        "sentence_bleu": sentence_bleu,
        **rouge,
        "exact_match": exact,
    }
    metrics = {
        "bleu": float(corpus_score.score),
        **{k: float(np.mean(v)) for k, v in per_sample.items()},
        "pred_chars_mean": float(np.mean([len(p) for p in predictions])),
        "ref_chars_mean": float(np.mean([len(r) for r in references])),
        "pred_words_mean": float(np.mean(pred_words)),
        "ref_words_mean": float(np.mean(ref_words)),
        "length_ratio": sum(pred_words) / max(1, sum(ref_words)),
    }
    return SuiteResult(
        suite="generation",
        metrics=metrics,
        per_sample=per_sample,
        settings={"pairs": len(predictions), "bleu_signature": str(corpus.get_signature())},
    )


def evaluate_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    stop: list[str] | None = None,
) -> SuiteResult:
    """Generate a continuation of each prompt and score it against its reference."""
    if not pairs:
        raise GenloopError("no (prompt, reference) pairs to evaluate")
    prompts = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    predictions = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        stop=stop,
    )
    result = generation_metrics(predictions, references)
    generation: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "decoding": "greedy" if temperature == 0 else "sampling",
        "seed": seed,
        "batch_size": batch_size,
        "stop": list(stop or []),
    }
    result.settings = {**generation, **result.settings}
    result.samples = [
        {"prompt": p, "reference": r, "prediction": g}
        for (p, r), g in zip(pairs[:_SHOWN_SAMPLES], predictions, strict=False)
    ]
    return result

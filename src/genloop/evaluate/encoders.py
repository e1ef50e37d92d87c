"""The masked_lm suites of ``genloop eval``: what a BERT-class encoder got right.

    mlm                   masked-token accuracy on held-out token windows (BERT's 15%,
                          80/10/10, with a fixed seed) and pseudo-perplexity (Salazar et al.,
                          2020): each token masked alone and scored given all the others,
                          PPPL = exp(-mean log p(token | rest))
    classification        accuracy and macro F1 on held-out {"text", "label"} rows
    token_classification  token (word) accuracy and entity-level F1 on held-out
                          {"tokens", "labels"} rows

Every figure of the classification suites comes with a bootstrap 95% interval
(``<metric>_ci_low`` / ``_ci_high``; 1000 resamples of the rows, seed 0:
``compare.bootstrap_ci``). ``per_sample`` holds 0/1 correctness per masked token, row or
word, so ``genloop eval compare`` bootstraps the difference between two models.

Macro F1 is the mean over labels of 2·TP / (2·TP + FP + FN), over the labels that occur
in the rows or the predictions (scikit-learn's ``f1_score(average="macro")``). Entities
are chunks of IOB2 / IOBES tags as conlleval and seqeval read them in their default mode:
a chunk starts at ``B-X`` / ``S-X``, or at ``I-X`` / ``E-X`` after anything but a chunk of
type X, and ends before ``O``, ``B-``, ``S-`` or another type, or after ``E-`` / ``S-``;
a tag without a prefix counts as ``I-``. An entity is right when its type, start and end
all are; ``entity_f1`` is micro-averaged, ``entity_f1_<TYPE>`` per type.

A row dataset holds train and val rows only: with ``eval.split`` test (the default) the
suites read the val rows (held out from training) and record that in their settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from genloop.errors import GenloopError
from genloop.evaluate.compare import bootstrap_ci
from genloop.evaluate.results import SuiteResult

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from genloop.config import EvalConfig
    from genloop.workspace.datasets import DatasetVersionInfo

log = logging.getLogger(__name__)

ENCODER_SUITES = ("mlm", "classification", "token_classification")
SUITE_TASK = {
    "mlm": "mlm",
    "classification": "sequence_classification",
    "token_classification": "token_classification",
}
SUITE_KIND = {"classification": "classification", "token_classification": "token_classification"}
MLM_PROBABILITY = 0.15
PPPL_TOKENS = 512  # tokens scored for pseudo-perplexity: one forward pass each
PPPL_WINDOW = 128  # … in windows of at most this many tokens
BATCH = 16
SHOWN = 8  # examples kept for the report


# ------------------------------------------------------------------------------ metrics


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Macro F1 of label ids, (…, n) → (…): over the labels present in either."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    labels = np.union1d(np.unique(truth), np.unique(predicted))
    scores = []
    for k in labels:
        tp = ((truth == k) & (predicted == k)).sum(axis=-1)
        wrong = ((truth == k) != (predicted == k)).sum(axis=-1)  # FP + FN
        present = (truth == k).any(axis=-1) | (predicted == k).any(axis=-1)
        # a label absent from a resample takes no part in its mean
        scores.append(np.where(present, 2 * tp / np.maximum(2 * tp + wrong, 1), np.nan))
    return np.asarray(np.nanmean(np.stack(scores), axis=0))


def f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2·TP / (2·TP + FP + FN), 0 where there is nothing to find or found."""
    tp, fp, fn = np.asarray(tp), np.asarray(fp), np.asarray(fn)
    return np.asarray(2 * tp / np.maximum(2 * tp + fp + fn, 1))


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks of a tag sequence as (type, start, end) (module docstring)."""
    out: list[tuple[str, int, int]] = []
    start, kind = -1, ""
    for i, tag in enumerate(tags):
        prefix, typ = _split_tag(tag)
        if start >= 0 and (prefix in ("O", "B", "S") or typ != kind):
            out.append((kind, start, i))
            start = -1
        if prefix != "O" and start < 0:
            start, kind = i, typ
        if prefix in ("E", "S") and start >= 0:
            out.append((kind, start, i + 1))
            start = -1
    if start >= 0:
        out.append((kind, start, len(tags)))
    return out


def _interval(metrics: dict[str, float], name: str, n: int, statistic: Any) -> None:
    metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = bootstrap_ci(n, statistic)


# --------------------------------------------------------------------------------- suites


def evaluate_classification(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    split: str = "val",
) -> SuiteResult:
    """Accuracy and macro F1 of a sequence classifier on ``rows``, with intervals."""
    from genloop.models.masked_lm import model_labels, predict_labels

    if not rows:
        raise GenloopError(f"no {split} rows to evaluate")
    labels = model_labels(model)
    index = {name: i for i, name in enumerate(labels)}
    _check_known([r["label"] for r in rows], index, split)
    predicted = predict_labels(model, tok, [r["text"] for r in rows])
    truth = np.array([index[r["label"]] for r in rows])
    guess = np.array([index[p] for p in predicted])
    correct = (truth == guess).astype(np.float64)
    metrics = {"accuracy": float(correct.mean()), "macro_f1": float(macro_f1(truth, guess))}
    n = len(rows)
    _interval(metrics, "accuracy", n, lambda idx: correct[idx].mean(axis=-1))
    _interval(metrics, "macro_f1", n, lambda idx: macro_f1(truth[idx], guess[idx]))
    samples = [
        {"text": r["text"][:200], "label": r["label"], "predicted": p}
        for r, p in list(zip(rows, predicted, strict=True))[:SHOWN]
    ]
    settings = {"split": split, "rows": n, "labels": labels, "bootstrap": "1000 resamples, 95%"}
    return SuiteResult("classification", metrics, {"accuracy": correct.tolist()}, samples, settings)


def evaluate_token_classification(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    split: str = "val",
) -> SuiteResult:
    """Word accuracy and entity F1 (micro and per type) of a token classifier on ``rows``."""
    from genloop.models.masked_lm import model_labels, predict_tags

    if not rows:
        raise GenloopError(f"no {split} rows to evaluate")
    labels = model_labels(model)
    _check_known([t for r in rows for t in r["labels"]], dict.fromkeys(labels, 0), split)
    predicted = predict_tags(model, tok, [r["tokens"] for r in rows])
    per_row = [
        [float(t == p) for t, p in zip(r["labels"], tags, strict=True)]
        for r, tags in zip(rows, predicted, strict=True)
    ]
    right = np.array([sum(row) for row in per_row])
    words = np.array([len(row) for row in per_row])
    types = sorted({t for r in rows for t, _, _ in entity_spans(r["labels"])})
    counts = np.zeros((len(rows), len(types) + 1, 3))  # (row, type or all, tp fp fn)
    for i, (r, tags) in enumerate(zip(rows, predicted, strict=True)):
        gold, found = set(entity_spans(r["labels"])), set(entity_spans(tags))
        for span, column in ((gold & found, 0), (found - gold, 1), (gold - found, 2)):
            for typ, _, _ in span:
                counts[i, -1, column] += 1
                if typ in types:
                    counts[i, types.index(typ), column] += 1
    total = counts.sum(axis=0)  # (types + 1, 3)
    metrics = {
        "token_accuracy": float(right.sum() / words.sum()),
        "entity_precision": float(total[-1, 0] / max(total[-1, 0] + total[-1, 1], 1)),
        "entity_recall": float(total[-1, 0] / max(total[-1, 0] + total[-1, 2], 1)),
        "entity_f1": float(f1(*total[-1])),
    }
    for j, typ in enumerate(types):
        metrics[f"entity_f1_{typ}"] = float(f1(*total[j]))
    n = len(rows)
    _interval(metrics, "token_accuracy", n, lambda idx: right[idx].sum(-1) / words[idx].sum(-1))
    _interval(metrics, "entity_f1", n, lambda idx: f1(*counts[idx, -1].sum(axis=1).T))
    samples = [
        {
            "tokens": " ".join(r["tokens"])[:200],
            "labels": " ".join(r["labels"]),
            "predicted": " ".join(p),
        }
        for r, p in list(zip(rows, predicted, strict=True))[:SHOWN]
    ]
    settings = {
        "split": split,
        "rows": n,
        "labels": labels,
        "entities": "conlleval chunks (IOB2/IOBES), exact type and span",
        "bootstrap": "1000 resamples of rows, 95%",
    }
    correct = [x for row in per_row for x in row]
    return SuiteResult(
        "token_classification", metrics, {"token_accuracy": correct}, samples, settings
    )


def _check_known(labels: Sequence[str], index: dict[str, int], split: str) -> None:
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise GenloopError(
            f"the {split} rows have labels the model does not predict ({', '.join(unknown)}; "
            f"it predicts {', '.join(index)}): evaluate it on rows of its own labels"
        )


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    tokens_dir: Path,
    split: str,
    seq_len: int,
    *,
    max_windows: int | None = 200,
    seed: int = 0,
    pppl_tokens: int = PPPL_TOKENS,
) -> SuiteResult:
    """Masked-token accuracy over ``max_windows`` windows of the split (spread evenly,
    each cls + ``seq_len`` - 1 tokens, masked as in pretraining with a fixed seed), and
    pseudo-perplexity over its first ``pppl_tokens`` non-special tokens."""
    from genloop.data.pack import TokenDataset
    from genloop.models.masked_lm import context_length, mask_token_id
    from genloop.train.masking import mask_tokens, masking_for

    device = next(model.parameters()).device
    seq_len = min(seq_len, context_length(model))
    ds = TokenDataset(tokens_dir, split, seq_len - 1)
    config: Any = model.config
    vocab = int(config.vocab_size)
    if ds.vocab_size > vocab:
        raise GenloopError(
            f"split {split!r} in {tokens_dir} was tokenized with a {ds.vocab_size}-token "
            f"vocabulary, larger than the model's {vocab}: not this model's tokenizer"
        )
    n = len(ds)
    if n == 0:
        raise GenloopError(f"split {split!r} is too short for one window of {seq_len} tokens")
    m = n if max_windows is None else min(n, max_windows)
    windows = np.stack([ds[int(i)][0] for i in (np.arange(m) * n) // m])  # (m, seq_len - 1)
    cls = np.full((m, 1), int(tok.cls_token_id), dtype=np.int64)
    ids = np.concatenate([cls, windows], axis=1)
    mask_id = mask_token_id(tok, "the model")
    masking = masking_for(tok, mask_id, MLM_PROBABILITY, whole_word=False)

    # 1. masked-token accuracy, the masks of pretraining drawn once from the seed
    inputs, labels = mask_tokens(ids, np.random.default_rng([seed, 2]), masking)
    hits: list[float] = []
    for b in range(0, m, BATCH):
        logits = model(input_ids=torch.from_numpy(inputs[b : b + BATCH]).to(device)).logits
        target = torch.from_numpy(labels[b : b + BATCH]).to(device)
        keep = target != -100
        hits += (logits[keep].argmax(dim=-1) == target[keep]).float().tolist()

    # 2. pseudo-perplexity: each scored token masked alone, its log-probability given the rest
    width = min(seq_len, PPPL_WINDOW)
    log_p: list[float] = []
    for row in ids[:, :width]:
        positions = np.flatnonzero(~masking.special[row])[: pppl_tokens - len(log_p)]
        for b in range(0, len(positions), BATCH):
            at = positions[b : b + BATCH]
            copies = np.repeat(row[None], len(at), axis=0)
            copies[np.arange(len(at)), at] = masking.mask_id
            logits = model(input_ids=torch.from_numpy(copies).to(device)).logits
            scores = logits[torch.arange(len(at)), torch.from_numpy(at)].float().log_softmax(-1)
            log_p += scores[torch.arange(len(at)), torch.from_numpy(row[at])].tolist()
        if len(log_p) >= pppl_tokens:
            break
    metrics = {
        "masked_accuracy": float(np.mean(hits)) if hits else 0.0,
        "pseudo_perplexity": float(np.exp(-np.mean(log_p))) if log_p else float("nan"),
    }
    settings = {
        "split": split,
        "windows": m,
        "window_tokens": seq_len,
        "mlm_probability": MLM_PROBABILITY,
        "masked_tokens": len(hits),
        "pseudo_perplexity_tokens": len(log_p),
        "pseudo_perplexity_window": width,
        "seed": seed,
    }
    return SuiteResult("mlm", metrics, {"masked_accuracy": hits}, [], settings)


# ------------------------------------------------------------------------- genloop eval


def default_suites(model_dir: Path) -> list[str]:
    """The suite of the masked LM in ``model_dir``, by its task (``retrieval`` for an
    embedding model)."""
    from genloop.models.masked_lm import artifact_task

    task = artifact_task(model_dir)
    for suite, wanted in SUITE_TASK.items():
        if wanted == task:
            return [suite]
    return ["retrieval"]  # an embedding model (the bare encoder)


def run_encoder_suites(
    model_dir: Path,
    data_dir: Path,
    dataset: DatasetVersionInfo,
    suites: Sequence[str],
    cfg: EvalConfig,
    device: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[SuiteResult]:
    """The chosen masked_lm suites on the dataset version in ``data_dir``."""
    from genloop.models.masked_lm import load_masked_lm, task_of

    model, tok = load_masked_lm(model_dir, device=device)
    task = task_of(model)
    for suite in suites:
        if SUITE_TASK[suite] != task:
            runs = [s for s, t in SUITE_TASK.items() if t == task]
            raise GenloopError(
                f"the {suite} suite needs a {SUITE_TASK[suite]} model; this one is "
                f"{task} (it runs: {', '.join(runs) or 'none of the encoder suites'})"
            )
    results = []
    for i, suite in enumerate(suites, 1):
        if progress is not None:
            progress(suite, i, len(suites))
        if suite == "mlm":
            results.append(_mlm_suite(model, tok, data_dir, dataset, cfg))
            continue
        rows, split = _rows(data_dir, dataset.ref, SUITE_KIND[suite], cfg.split)
        if cfg.max_samples is not None:
            rows = rows[: cfg.max_samples]
        run = (
            evaluate_classification if suite == "classification" else evaluate_token_classification
        )
        results.append(run(model, tok, rows, split=split))
    return results


def _mlm_suite(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    data_dir: Path,
    dataset: DatasetVersionInfo,
    cfg: EvalConfig,
) -> SuiteResult:
    tokens = data_dir / "tokens"
    if not tokens.is_dir():
        raise GenloopError(
            f"dataset {dataset.ref} has no token shards; the mlm suite reads a text dataset "
            "prepared with a tokenizer section"
        )
    found = (dataset.stats.get("tokenizer") or {}).get("seq_len") or (
        (dataset.config.get("tokenizer") or {}).get("seq_len")
    )
    seq_len = found if isinstance(found, int) else PPPL_WINDOW
    return evaluate_mlm(
        model, tok, tokens, cfg.split, seq_len, max_windows=cfg.max_samples, seed=cfg.seed
    )


def _rows(data_dir: Path, ref: str, kind: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """The rows of ``split`` of a row dataset of ``kind``; its val rows for ``test``, which
    a row dataset does not have."""
    from genloop.data.pairs import pairs_kind, read_pairs

    found = pairs_kind(data_dir)
    if found != kind:
        raise GenloopError(
            f"the {kind} suite reads {kind} rows; dataset {ref} holds {found} rows "
            "(give another with --dataset)"
        )
    if split == "test" and not (data_dir / "pairs" / "test.jsonl").is_file():
        log.info("dataset %s has no test rows; evaluating its val rows", ref)
        split = "val"
    rows = read_pairs(data_dir, split, kind)
    if not rows:
        raise GenloopError(f"dataset {ref} has no {split} rows to evaluate")
    return rows, split

"""Text augmentation measured downstream: a classifier trained with EDA copies vs without.

The task is real text that ships with Python, nothing downloaded: the first paragraph of
function and method docstrings of eight standard-library packages (asyncio, email, http,
importlib, logging, multiprocessing, unittest, xml), labelled with their package. Each
draw (``--draws``, one seed each) takes a small training set (``--per-class`` docstrings of
every package: a few dozen rows) and keeps every other docstring for the test set, the same
for both sides.

* baseline: the draw's training rows;
* subject: the same rows through the real ``genloop augment text --method eda`` path
  (``pipeline.augment.augment_text``: a workspace, a dataset version, EDA's swap, delete and
  insert with ``--copies`` and ``--alpha``, the quality and duplicate filters), i.e. the
  rows of the augmented version's training split.

Both train the same classifier: TF-IDF over word 1-2-grams + logistic regression
(scikit-learn, C=10), honest and quick. Printed figures: accuracy and macro-F1 on the test
set for each side, averaged over the draws, and their ratios (augmented / baseline). The
EDA paper (Wei & Zou 2019) reports its gains for small training sets with neural
classifiers; a bag-of-n-grams model sees word order only through bigrams, so swaps add
little here — the figures say what it is worth for this classifier, not in general.

    python benchmarks/bench_augment.py [--quick] [--draws N] [--per-class N]
                                       [--copies N] [--alpha A]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest")
PACKAGES += ("xml",)


def docstrings(package: str, min_words: int = 6) -> list[str]:
    """The first paragraph of each function/method docstring in ``package`` (one line)."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    out: set[str] = set()
    for file in files:
        if "test" in file.parts[-2:] or file.name.startswith("test"):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    first = " ".join(doc.split("\n\n")[0].split())
                    if len(first.split()) >= min_words:
                        out.add(first)
    return sorted(out)


def train_and_score(
    train: list[tuple[str, str]], test: list[tuple[str, str]]
) -> tuple[float, float]:
    """(accuracy, macro-F1) of TF-IDF + logistic regression trained on ``train``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        LogisticRegression(C=10.0, max_iter=2000),
    )
    model.fit([t for t, _ in train], [y for _, y in train])
    predicted = model.predict([t for t, _ in test])
    truth = [y for _, y in test]
    return float(accuracy_score(truth, predicted)), float(
        f1_score(truth, predicted, average="macro")
    )


def augmented_rows(
    ws: Any, name: str, rows: list[tuple[str, str]], tok: Path, copies: int, alpha: float, seed: int
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The draw's rows through ``augment_text`` (EDA): the new version's training rows."""
    from genloop.data.pairs import read_pairs, write_pairs_dataset
    from genloop.pipeline.augment import augment_text

    source = [{"text": t, "label": y} for t, y in rows]
    write_pairs_dataset(ws, name, "classification", source, tokenizer_dir=tok, val_fraction=0)
    result = augment_text(ws, name, "eda", copies=copies, alpha=alpha, seed=seed)
    data = ws.store.open_verified(result.version.artifact)
    train = read_pairs(data, "train", "classification")
    return [(r["text"], r["label"]) for r in train], result.version.stats["augment"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 draws instead of 10")
    parser.add_argument("--draws", type=int, default=None, help="training-set draws (seeds)")
    parser.add_argument("--per-class", type=int, default=6, help="training rows per package")
    parser.add_argument("--copies", type=int, default=16, help="EDA copies per row (paper: 16)")
    parser.add_argument("--alpha", type=float, default=0.05, help="EDA alpha (paper: 0.05)")
    args = parser.parse_args()
    draws = args.draws or (3 if args.quick else 10)

    from genloop.data.tokenizer import train_bpe
    from genloop.workspace import init_workspace

    started = time.perf_counter()
    pools = {p: docstrings(p) for p in PACKAGES}
    print(
        "task: which standard-library package a docstring comes from; "
        + ", ".join(f"{p} {len(d)}" for p, d in pools.items())
        + " docstrings"
    )
    print(
        "classifier: TF-IDF (word 1-2-grams, sublinear tf) + logistic regression (C=10), "
        "scikit-learn; the same for both sides"
    )
    print(
        f"augmentation: genloop augment text --method eda --copies {args.copies} "
        f"--alpha {args.alpha} (swap, delete, insert; filtered and deduplicated)"
    )
    base_acc, base_f1, aug_acc, aug_f1 = [], [], [], []
    generated = kept = 0
    dropped: dict[str, int] = {}
    train_rows = test_rows = 0
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as tmp:
        ws = init_workspace(Path(tmp) / "ws")
        every = [t for d in pools.values() for t in d]
        tok = train_bpe(every, Path(tmp) / "tok", vocab_size=512)  # stored with the rows only
        try:
            for draw in range(draws):
                rng = random.Random(draw)
                train: list[tuple[str, str]] = []
                test: list[tuple[str, str]] = []
                for package, texts in pools.items():
                    picked = rng.sample(texts, len(texts))
                    train += [(t, package) for t in picked[: args.per_class]]
                    test += [(t, package) for t in picked[args.per_class :]]
                rows, stats = augmented_rows(
                    ws, f"draw-{draw}", train, tok, args.copies, args.alpha, seed=draw
                )
                a0, f0 = train_and_score(train, test)
                a1, f1 = train_and_score(rows, test)
                base_acc.append(a0)
                base_f1.append(f0)
                aug_acc.append(a1)
                aug_f1.append(f1)
                generated += stats["generated"]
                kept += stats["kept"]
                for reason, n in stats["dropped"].items():
                    dropped[reason] = dropped.get(reason, 0) + n
                train_rows, test_rows = len(train), len(test)
                print(
                    f"draw {draw}: {len(train)} rows → {len(rows)} with EDA; accuracy "
                    f"{a0:.3f} → {a1:.3f}, macro-F1 {f0:.3f} → {f1:.3f} ({len(test)} test rows)"
                )
        finally:
            ws.close()
    acc0, acc1 = statistics.mean(base_acc), statistics.mean(aug_acc)
    f10, f11 = statistics.mean(base_f1), statistics.mean(aug_f1)
    wins = sum(b > a for a, b in zip(base_f1, aug_f1, strict=True))
    print(
        f"without augmentation: accuracy {acc0:.3f}, macro-F1 {f10:.3f}\n"
        f"with EDA:             accuracy {acc1:.3f}, macro-F1 {f11:.3f}\n"
        f"ratio (with / without): accuracy × {acc1 / acc0:.3f}, macro-F1 × {f11 / f10:.3f}; "
        f"EDA better in {wins} of {draws} draws; generated {generated}, kept {kept}, "
        f"dropped {dropped or 'none'}; {time.perf_counter() - started:.0f} s"
    )
    figures = {
        "accuracy_baseline": round(acc0, 4),
        "accuracy_augmented": round(acc1, 4),
        "accuracy_ratio": round(acc1 / acc0, 4),
        "macro_f1_baseline": round(f10, 4),
        "macro_f1_augmented": round(f11, 4),
        "macro_f1_ratio": round(f11 / f10, 4),
        "augmented_better_draws": wins,
        "draws": draws,
        "train_rows": train_rows,
        "test_rows": test_rows,
        "generated_rows": generated,
        "kept_rows": kept,
        "copies": args.copies,
        "alpha": args.alpha,
        "method": "eda",
        "classifier": "tfidf_1_2gram+logistic_regression",
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two models' stored evaluations side by side, with deltas and bootstrap intervals.

    metrics   each model's newest value of every metric on a dataset version both were
              evaluated on (the one ``a`` used most recently; without one, each model's
              newest, with a warning and no intervals)
    delta     b − a, and as a percentage of a
    95% CI    for metrics with per-sample values on both sides from the same suite and
              the same samples (same count and settings): a paired bootstrap of the
              delta, 1000 resamples of the sample indices with a fixed seed

Nothing is evaluated here: a model without a stored evaluation is an error that says to
run ``genloop eval`` first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from genloop.errors import NotFoundError
from genloop.evaluate import store
from genloop.evaluate.results import SuiteResult
from genloop.workspace import registry
from genloop.workspace.workspace import Workspace

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95

Statistic = Callable[[np.ndarray], np.ndarray]  # (R, n) resampled values → (R,) statistic


def _mean(x: np.ndarray) -> np.ndarray:
    return np.asarray(x.mean(axis=-1))


def bootstrap_ci(
    n: int,
    statistic: Statistic,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of a statistic of ``n`` samples over bootstrap resamples.

    ``statistic`` maps the (R, n) resampled sample *indices* to the (R,) statistic of each
    resample, so it can be any function of the samples (macro F1 of predictions and
    labels, F1 of summed entity counts), not only a mean of one value each.
    """
    if n < 1:
        raise ValueError(f"a bootstrap needs at least one sample (got {n})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))  # (R, n)
    values = statistic(idx)  # (R,)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    statistic: Statistic = _mean,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(b) − statistic(a)`` over paired resamples.

    ``a[i]`` and ``b[i]`` are the same sample scored by the two models, so each resample
    draws indices once and takes both models' values at them: the interval reflects the
    variation between samples, not between models.
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1 or len(xa) == 0:
        raise ValueError(f"paired samples need equal, non-zero lengths (got {len(xa)}, {len(xb)})")
    return bootstrap_ci(
        len(xa),
        lambda idx: statistic(xb[idx]) - statistic(xa[idx]),  # (R,) deltas
        resamples=resamples,
        seed=seed,
        level=level,
    )


def _exp_mean(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.exp(x.mean(axis=-1)))


# Metrics that are not the mean of a per-sample list, but a function of another one's
# mean: perplexity = exp(mean per-window NLL).
DERIVED: dict[str, tuple[str, Statistic]] = {"perplexity": ("nll", _exp_mean)}


def _find_per_sample(
    results: Sequence[SuiteResult], metric: str
) -> tuple[SuiteResult, str, Statistic] | None:
    """The suite whose per-sample values back ``metric`` (``suite/name`` for clashes), the
    per-sample key, and the statistic that turns those values into the metric."""
    suite, _, name = metric.rpartition("/")
    key, statistic = DERIVED.get(name, (name, _mean))
    for r in results:
        if (not suite or r.suite == suite) and name in r.metrics and key in r.per_sample:
            return r, key, statistic
    return None


def _interval(
    metric: str, a_results: Sequence[SuiteResult], b_results: Sequence[SuiteResult]
) -> tuple[tuple[float, float] | None, int | None, str | None]:
    """The bootstrap interval of a metric's delta, its sample count, or why there is none."""
    fa, fb = _find_per_sample(a_results, metric), _find_per_sample(b_results, metric)
    if fa is None or fb is None:
        return None, None, None  # not a per-sample metric: nothing to say
    (ra, key, statistic), (rb, _, _) = fa, fb
    va, vb = ra.per_sample[key], rb.per_sample[key]
    if len(va) != len(vb) or not va:
        return None, None, f"{metric}: {len(va)} vs {len(vb)} samples, so no interval"
    differing = sorted(k for k in ra.settings.keys() | rb.settings.keys() if _differs(ra, rb, k))
    if differing:
        return None, len(va), f"{metric}: suite settings differ ({', '.join(differing)})"
    pairs = [(x, y) for x, y in zip(va, vb, strict=True) if _finite(x) and _finite(y)]
    if not pairs:
        return None, len(va), f"{metric}: no finite per-sample values"
    xa, xb = zip(*pairs, strict=True)
    return paired_bootstrap_ci(xa, xb, statistic=statistic), len(va), None


def _differs(ra: SuiteResult, rb: SuiteResult, key: str) -> bool:
    return bool(ra.settings.get(key) != rb.settings.get(key))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def compare(ws: Workspace, a_ref: str, b_ref: str) -> dict[str, Any]:
    """``a`` and ``b``'s stored metrics side by side: values, delta (b − a), delta in %,
    and for per-sample metrics a paired bootstrap 95% interval of the delta."""
    ia, ib = registry.resolve(ws, a_ref), registry.resolve(ws, b_ref)
    for ref, info in ((a_ref, ia), (b_ref, ib)):
        if not store.evaluated_datasets(ws, info.id):
            raise NotFoundError(
                f"{ref} ({info.ref}) has no stored evaluation; run 'genloop eval {ref}' first"
            )
    warnings: list[str] = []
    found, dataset_id = store.common_dataset(ws, ia.id, ib.id)
    if found:
        va = store.latest_metrics(ws, ia.id, dataset_id)
        vb = store.latest_metrics(ws, ib.id, dataset_id)
    else:
        va = store.latest_metrics(ws, ia.id, store.evaluated_datasets(ws, ia.id)[0])
        vb = store.latest_metrics(ws, ib.id, store.evaluated_datasets(ws, ib.id)[0])
        assert va is not None and vb is not None
        warnings.append(
            f"no dataset version both were evaluated on ({ia.ref}: {va.dataset or 'none'}, "
            f"{ib.ref}: {vb.dataset or 'none'}): values are not comparable and have no "
            f"intervals; run 'genloop eval' on one dataset for both"
        )
    assert va is not None and vb is not None
    cache: dict[int, list[SuiteResult]] = {}

    def results(view: store.MetricView, metric: str) -> list[SuiteResult]:
        record = view.sources[metric]
        if record.id not in cache:
            cache[record.id] = store.load_results(ws, record)
        return cache[record.id]

    metrics: dict[str, dict[str, Any]] = {}
    for name in sorted(va.metrics.keys() | vb.metrics.keys()):
        a, b = va.metrics.get(name), vb.metrics.get(name)
        entry: dict[str, Any] = {"a": a, "b": b, "delta": None, "delta_pct": None, "ci": None}
        if _finite(a) and _finite(b):
            assert a is not None and b is not None
            entry["delta"] = b - a
            entry["delta_pct"] = 100 * (b - a) / abs(a) if a else None
            if found:
                ci, n, why = _interval(name, results(va, name), results(vb, name))
                entry["ci"] = list(ci) if ci else None
                entry["n"] = n
                if why:
                    warnings.append(why)
        metrics[name] = entry
    return {
        "a": ia.ref,
        "b": ib.ref,
        "dataset": va.dataset if found else None,
        "evaluations": {"a": va.evaluation_ids, "b": vb.evaluation_ids},
        "metrics": metrics,
        "warnings": warnings,
    }

"""Agreement between annotators, and the rule that settles an item's labels.

Cohen's kappa, κ = (p_o − p_e) / (1 − p_e), compares two annotators on the items both
labeled: p_o is how often they agree, p_e how often they would by chance given how often
each uses each label (``sklearn.metrics.cohen_kappa_score``). What is compared:

    classification  the label of each common item
    spans           the label of each token of each common item
    preference      the choice (A or B) of each common item
    caption         no kappa (free text has no categories): the share of common items whose
                    edited texts are the same (whitespace aside) is reported as ``observed``

κ is undefined (``None``) when chance agreement is certain: both annotators used one and
the same label everywhere.

Settling (the export): an item's value is the majority value of its labels, one vote per
annotator; spans settle token by token. A tie (two annotators who disagree, say) leaves
the item out of the export, and it is counted.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from genloop.feedback.labeling.tasks import same_value


def units(kind: str, value: Mapping[str, Any]) -> list[str]:
    """What kappa compares in one label value."""
    if kind == "spans":
        return [str(x) for x in value["labels"]]
    if kind == "classification":
        return [str(value["label"])]
    return [str(value["choice"])]


def kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two aligned label sequences (None when undefined)."""
    from sklearn.metrics import cohen_kappa_score

    if not a:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # p_e = 1: sklearn warns and returns nan
        value = float(cohen_kappa_score(list(a), list(b)))
    return None if math.isnan(value) else value


def pair_agreement(
    kind: str, a: Mapping[int, Mapping[str, Any]], b: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """Agreement of two annotators' labels (item id → value) on their common items:
    ``items`` (common), ``observed`` (share of items labeled the same) and ``kappa``."""
    common = sorted(set(a) & set(b))
    same = sum(same_value(kind, a[i], b[i]) for i in common)
    out: dict[str, Any] = {
        "items": len(common),
        "observed": same / len(common) if common else None,
        "kappa": None,
    }
    if kind != "caption" and common:
        ua = [u for i in common for u in units(kind, a[i])]
        ub = [u for i in common for u in units(kind, b[i])]
        out["kappa"] = kappa(ua, ub)
    return out


def agreement(
    kind: str, by_annotator: Mapping[str, Mapping[int, Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """:func:`pair_agreement` of every pair of annotators with common items."""
    out = []
    for x, y in itertools.combinations(sorted(by_annotator), 2):
        pair = pair_agreement(kind, by_annotator[x], by_annotator[y])
        if pair["items"]:
            out.append({"annotators": [x, y], **pair})
    return out


def settle(kind: str, values: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The majority value of one item's labels (in the order given), or None on a tie."""
    if not values:
        return None
    if kind == "spans":
        columns = zip(*(v["labels"] for v in values), strict=True)
        settled = [_majority(list(col)) for col in columns]
        if any(x is None for x in settled):
            return None
        return {"labels": settled}
    if kind == "caption":
        texts = [str(v["text"]) for v in values]
        key = _majority([" ".join(t.split()) for t in texts])
        if key is None:
            return None
        return {"text": next(t for t in texts if " ".join(t.split()) == key)}
    field = "label" if kind == "classification" else "choice"
    winner = _majority([str(v[field]) for v in values])
    return None if winner is None else {field: winner}


def _majority(votes: list[str]) -> str | None:
    counts = Counter(votes).most_common(2)
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]

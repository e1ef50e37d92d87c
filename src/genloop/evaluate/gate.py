"""The release gate: does a candidate's stored evaluation pass the rules against production?

    rules      a YAML file (``rules:`` list, or a full config's ``gate`` section), else the
               defaults: perplexity may rise at most 2 %, pass@1 may not drop (each only
               where one of the two models has the metric)
    metrics    each model's newest value of every metric on one dataset version both were
               evaluated on (the one the candidate used most recently)
    checks     one per rule; a missing or non-finite metric fails its rule, with a message

Whether lower or higher is better is never guessed from the metric's name: the rule's op
says it (``max_increase_pct`` / ``no_increase`` for perplexity, ``no_decrease`` / ``min``
for pass@1). ``genloop gate`` exits 0 when every check passes and 1 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genloop.config import GateConfig, GateRule
from genloop.errors import ConfigError, NotFoundError
from genloop.evaluate import store
from genloop.workspace import registry
from genloop.workspace.workspace import Workspace

DEFAULT_RULES = (
    GateRule(metric="perplexity", op="max_increase_pct", value=2.0),
    GateRule(metric="pass@1", op="no_decrease"),
)
RELATIVE_OPS = ("max_increase_pct", "max_decrease_pct", "no_decrease", "no_increase")
# Equal numbers pass no_decrease / no_increase; this only absorbs float round-off.
_TOLERANCE = 1e-9


@dataclass
class GateCheck:
    """One rule's verdict: the candidate's value, the value it was held against (``None``
    for absolute rules), and why it passed or failed."""

    rule: GateRule
    candidate: float | None
    against: float | None
    passed: bool
    message: str

    @property
    def description(self) -> str:
        return describe(self.rule)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.model_dump(),
            "description": self.description,
            "candidate": self.candidate,
            "against": self.against,
            "passed": self.passed,
            "message": self.message,
        }


@dataclass
class GateResult:
    passed: bool
    candidate: str  # "name@version"
    against: str | None
    dataset: str | None
    checks: list[GateCheck]
    evaluations: dict[str, list[int]] = field(default_factory=dict)  # ids each side used

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "candidate": self.candidate,
            "against": self.against,
            "dataset": self.dataset,
            "evaluations": self.evaluations,
            "checks": [c.to_dict() for c in self.checks],
        }


# ---------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------


def load_rules(path: str | Path) -> list[GateRule]:
    """Rules from a YAML file: a ``rules:`` list, or a full config with a ``gate`` section."""
    import yaml

    from genloop.config import load_config

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None  # load_config below names the problem
    if isinstance(data, dict) and "gate" in data and "rules" not in data:
        rules = load_config(path).gate.rules
        where = "the gate section"
    else:
        rules = load_config(path, (), cls=GateConfig).rules
        where = "'rules'"
    if not rules:
        raise ConfigError(
            f"{path}: {where} holds no rules; expected e.g. "
            "'rules: [{metric: perplexity, op: max_increase_pct, value: 2}]'"
        )
    return list(rules)


def describe(rule: GateRule) -> str:
    m, v = rule.metric, rule.value
    match rule.op:
        case "max_increase_pct":
            return f"{m} may rise at most {v:g}%"
        case "max_decrease_pct":
            return f"{m} may drop at most {v:g}%"
        case "min":
            return f"{m} ≥ {v:g}"
        case "max":
            return f"{m} ≤ {v:g}"
        case "no_decrease":
            return f"{m} may not drop"
        case "no_increase":
            return f"{m} may not rise"
    raise AssertionError(rule.op)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_rule(
    rule: GateRule,
    candidate: float | None,
    against: float | None,
    *,
    against_name: str = "production",
) -> GateCheck:
    """Judge one rule on two values (``None``: the metric is missing or not finite)."""
    c, a = _number(candidate), _number(against)

    def verdict(passed: bool, message: str) -> GateCheck:
        return GateCheck(rule, c, a, passed, message)

    if c is None:
        shown = "is missing" if candidate is None else f"is not a finite number ({candidate})"
        return verdict(False, f"the candidate's {rule.metric} {shown}")
    if rule.op == "min":
        assert rule.value is not None
        return verdict(c >= rule.value, f"{rule.metric} {c:.6g} (minimum {rule.value:g})")
    if rule.op == "max":
        assert rule.value is not None
        return verdict(c <= rule.value, f"{rule.metric} {c:.6g} (maximum {rule.value:g})")
    if a is None:
        shown = "is missing" if against is None else f"is not a finite number ({against})"
        return verdict(False, f"{against_name}'s {rule.metric} {shown}, so nothing to compare to")
    change = c - a
    pct = f" ({100 * change / abs(a):+.2f}%)" if a else ""
    base = f"{rule.metric} {c:.6g} vs {a:.6g} on {against_name}{pct}"
    tol = _TOLERANCE * max(1.0, abs(a))
    match rule.op:
        case "max_increase_pct":
            assert rule.value is not None
            allowed = abs(a) * rule.value / 100
            return verdict(change <= allowed + tol, f"{base}, limit +{rule.value:g}%")
        case "max_decrease_pct":
            assert rule.value is not None
            allowed = abs(a) * rule.value / 100
            return verdict(-change <= allowed + tol, f"{base}, limit -{rule.value:g}%")
        case "no_decrease":
            return verdict(change >= -tol, f"{base}, may not drop")
        case "no_increase":
            return verdict(change <= tol, f"{base}, may not rise")
    raise AssertionError(rule.op)


def check_rules(
    rules: Sequence[GateRule],
    candidate: dict[str, float | None],
    against: dict[str, float | None] | None,
    *,
    against_name: str = "production",
) -> list[GateCheck]:
    """Every rule judged on two metric dicts (``against=None``: absolute rules only)."""
    if against is None:
        relative = [describe(r) for r in rules if r.op in RELATIVE_OPS]
        if relative:
            raise ConfigError(
                f"rule '{relative[0]}' compares the candidate with another model: give "
                "--against NAME@production"
            )
    return [
        check_rule(
            r, candidate.get(r.metric), (against or {}).get(r.metric), against_name=against_name
        )
        for r in rules
    ]


# ---------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------


def gate(
    ws: Workspace,
    candidate_ref: str,
    against_ref: str | None,
    rules: Sequence[GateRule] | None = None,
) -> GateResult:
    """Judge ``candidate_ref`` against ``against_ref`` on their stored evaluations.

    ``rules=None`` applies the default rules that concern a metric either model has.
    Raises when the candidate has no evaluation, or the two share no dataset version.
    """
    cand = registry.resolve(ws, candidate_ref)
    cand_datasets = store.evaluated_datasets(ws, cand.id)
    if not cand_datasets:
        raise NotFoundError(
            f"{candidate_ref} ({cand.ref}) has no stored evaluation; run "
            f"'genloop eval {candidate_ref}' first"
        )
    against_view: store.MetricView | None = None
    against_label: str | None = None
    if against_ref is None:
        dataset_id = cand_datasets[0]
    else:
        other = registry.resolve(ws, against_ref)
        against_label = against_ref if against_ref == other.ref else f"{against_ref} ({other.ref})"
        found, dataset_id = store.common_dataset(ws, cand.id, other.id)
        if not found:
            raise NotFoundError(_no_common_dataset(ws, cand_datasets, against_ref, other.id))
        against_view = store.latest_metrics(ws, other.id, dataset_id)
    cand_view = store.latest_metrics(ws, cand.id, dataset_id)
    assert cand_view is not None
    if rules is None:
        present = set(cand_view.metrics) | set(against_view.metrics if against_view else ())
        rules = [r for r in DEFAULT_RULES if r.metric in present]
        if against_view is None:
            rules = [r for r in rules if r.op not in RELATIVE_OPS]
        if not rules:
            names = ", ".join(sorted({r.metric for r in DEFAULT_RULES}))
            raise ConfigError(
                f"the default gate rules check {names}, and neither evaluation has any of "
                "them; give rules with --rules"
            )
    checks = check_rules(
        rules,
        cand_view.metrics,
        against_view.metrics if against_view else None,
        against_name=against_ref or "",
    )
    evaluations = {"candidate": cand_view.evaluation_ids}
    if against_view is not None:
        evaluations["against"] = against_view.evaluation_ids
    return GateResult(
        passed=all(c.passed for c in checks),
        candidate=cand.ref,
        against=against_label,
        dataset=cand_view.dataset,
        checks=checks,
        evaluations=evaluations,
    )


def _dataset_label(ws: Workspace, dataset_version_id: int | None) -> str:
    if dataset_version_id is None:
        return "no dataset"
    from genloop.workspace.datasets import get_dataset_version

    return get_dataset_version(ws, dataset_version_id).ref


def _no_common_dataset(
    ws: Workspace, cand_datasets: list[int | None], against_ref: str, against_id: int
) -> str:
    target = cand_datasets[0]
    label = _dataset_label(ws, target)
    theirs = store.evaluated_datasets(ws, against_id)
    how = f"'genloop eval {against_ref}" + (f" --dataset {label}'" if target is not None else "'")
    if not theirs:
        return f"{against_ref} has no stored evaluation to compare with; run {how} first"
    seen = ", ".join(_dataset_label(ws, d) for d in theirs)
    return (
        f"the candidate and {against_ref} were never evaluated on the same dataset version "
        f"(candidate: {label}; {against_ref}: {seen}); run {how} first"
    )

"""The release gate on evaluations stored directly in the catalog (no model is run).

Model versions are registered from a directory holding one file: the gate reads only the
catalog, so metadata is all it needs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from genloop.config import GateRule
from genloop.errors import ConfigError, NotFoundError
from genloop.evaluate.gate import check_rule, gate, load_rules
from genloop.evaluate.results import SuiteResult
from genloop.evaluate.store import save_evaluation
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.datasets import DatasetVersionInfo, register_dataset_version
from genloop.workspace.registry import ModelVersionInfo

pytestmark = pytest.mark.usefixtures("no_report_plots")

PPL_2PCT = GateRule(metric="perplexity", op="max_increase_pct", value=2)


_names = itertools.count()


def new_version(ws: Workspace, name: str) -> ModelVersionInfo:
    src = ws.root / f"src-{next(_names)}"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return registry.register_model(ws, name, "causal_lm", src)


def new_dataset(ws: Workspace, name: str, content: str = "a") -> DatasetVersionInfo:
    return register_dataset_version(
        ws, name, content * 64, lambda d: (d / "stats.json").write_text("{}")
    )


def store(
    ws: Workspace, model: ModelVersionInfo, dataset: DatasetVersionInfo | None, **metrics: float
) -> None:
    """One stored evaluation with these metrics (a 'perplexity' suite, say)."""
    result = SuiteResult(suite="perplexity", metrics=dict(metrics))
    save_evaluation(ws, model.id, dataset.id if dataset else None, [result])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """One workspace for the module (creating one per test would dominate its time);
    each test has its own model and dataset names."""
    ws = init_workspace(tmp_path_factory.mktemp("gate") / "ws")
    yield ws
    ws.close()


@dataclass
class Pair:
    prod: ModelVersionInfo  # NAME@1, promoted to production
    cand: ModelVersionInfo  # NAME@2
    ds: DatasetVersionInfo  # D@1
    name: str

    @property
    def production(self) -> str:
        return f"{self.name}@production"

    def __iter__(self) -> Iterator[Any]:
        return iter((self.prod, self.cand, self.ds))


@pytest.fixture
def pair(workspace: Workspace) -> Pair:
    name = f"m{next(_names)}"
    prod = new_version(workspace, name)
    cand = new_version(workspace, name)
    registry.promote(workspace, prod.ref)
    return Pair(prod, cand, new_dataset(workspace, f"d{name}"), name)


def test_planted_regression_fails_and_names_the_rule(workspace: Workspace, pair: Pair) -> None:
    prod, cand, ds = pair
    store(workspace, prod, ds, perplexity=10.0)
    store(workspace, cand, ds, perplexity=10.5)  # +5 %
    result = gate(workspace, cand.ref, pair.production, [PPL_2PCT])
    assert not result.passed
    (check,) = result.failed
    assert check.rule == PPL_2PCT and (check.candidate, check.against) == (10.5, 10.0)
    assert "+5.00%" in check.message and "limit +2%" in check.message
    assert check.description == "perplexity may rise at most 2%"
    assert result.candidate == f"{pair.name}@2"
    assert result.against == f"{pair.production} ({pair.name}@1)"
    assert result.dataset == pair.ds.ref
    # the default rules hold the same 2 % limit
    assert not gate(workspace, cand.ref, pair.production).passed


@pytest.mark.parametrize("ppl", [9.0, 10.0, 10.1, 10.2])
def test_within_the_limit_passes(workspace: Workspace, pair: Pair, ppl: float) -> None:
    prod, cand, ds = pair
    store(workspace, prod, ds, perplexity=10.0)
    store(workspace, cand, ds, perplexity=ppl)
    result = gate(workspace, cand.ref, pair.production, [PPL_2PCT])
    assert result.passed and not result.failed
    assert gate(workspace, cand.ref, pair.production).passed


def test_newest_evaluation_counts(workspace: Workspace, pair: Pair) -> None:
    prod, cand, ds = pair
    store(workspace, prod, ds, perplexity=10.0)
    store(workspace, cand, ds, perplexity=12.0)
    store(workspace, cand, ds, perplexity=10.0)  # re-evaluated: the newest value counts
    assert gate(workspace, cand.ref, pair.production, [PPL_2PCT]).passed


def test_metrics_of_separate_evaluations_combine(workspace: Workspace, pair: Pair) -> None:
    """`eval --suite perplexity` then `eval --suite code`: the gate sees both."""
    prod, cand, ds = pair
    store(workspace, prod, ds, perplexity=10.0, **{"pass@1": 0.5})
    store(workspace, cand, ds, perplexity=10.0)
    save_evaluation(workspace, cand.id, ds.id, [SuiteResult("code", {"pass@1": 0.4})])
    result = gate(workspace, cand.ref, pair.production)
    assert [c.rule.metric for c in result.failed] == ["pass@1"]
    assert len(result.evaluations["candidate"]) == 2


def test_no_decrease_and_no_increase() -> None:
    up = GateRule(metric="pass@1", op="no_decrease")
    assert check_rule(up, 0.5, 0.5).passed  # equal is not a drop
    assert check_rule(up, 0.6, 0.5).passed
    assert not check_rule(up, 0.49, 0.5).passed
    down = GateRule(metric="perplexity", op="no_increase")
    assert check_rule(down, 10.0, 10.0).passed
    assert check_rule(down, 9.0, 10.0).passed
    assert not check_rule(down, 10.01, 10.0).passed


def test_max_decrease_pct() -> None:
    rule = GateRule(metric="bleu", op="max_decrease_pct", value=10)
    assert check_rule(rule, 18.0, 20.0).passed  # -10 %: at the limit
    assert not check_rule(rule, 17.9, 20.0).passed
    assert check_rule(rule, 25.0, 20.0).passed


def test_min_and_max_are_absolute() -> None:
    lo = GateRule(metric="pass@1", op="min", value=0.3)
    assert check_rule(lo, 0.3, None).passed and check_rule(lo, 0.9, 0.1).passed
    assert not check_rule(lo, 0.29, 0.9).passed
    hi = GateRule(metric="perplexity", op="max", value=20)
    assert check_rule(hi, 20.0, None).passed
    assert not check_rule(hi, 20.5, 1.0).passed
    assert "maximum 20" in check_rule(hi, 20.5, None).message


def test_a_missing_metric_fails_with_a_message() -> None:
    rule = GateRule(metric="pass@1", op="no_decrease")
    check = check_rule(rule, None, 0.5)
    assert not check.passed and "candidate's pass@1 is missing" in check.message
    check = check_rule(rule, 0.5, None, against_name="m@production")
    assert not check.passed and "m@production's pass@1 is missing" in check.message
    check = check_rule(rule, math.nan, 0.5)
    assert not check.passed and "not a finite number" in check.message


def test_missing_metric_in_the_catalog_fails(workspace: Workspace, pair: Pair) -> None:
    prod, cand, ds = pair
    store(workspace, prod, ds, perplexity=10.0, bleu=20.0)
    store(workspace, cand, ds, perplexity=float("nan"))  # stored as null: missing
    rules = [PPL_2PCT, GateRule(metric="bleu", op="no_decrease")]
    result = gate(workspace, cand.ref, pair.production, rules)
    assert [c.passed for c in result.checks] == [False, False]
    assert all("is missing" in c.message for c in result.checks)


def test_default_rules_only_for_present_metrics(workspace: Workspace, pair: Pair) -> None:
    prod, cand, ds = pair
    store(workspace, prod, ds, bleu=20.0)
    store(workspace, cand, ds, bleu=10.0)
    with pytest.raises(ConfigError, match="default gate rules"):
        gate(workspace, cand.ref, pair.production)
    store(workspace, prod, ds, perplexity=10.0)
    store(workspace, cand, ds, perplexity=10.0)
    result = gate(workspace, cand.ref, pair.production)
    assert [c.rule.metric for c in result.checks] == ["perplexity"]  # no pass@1 anywhere


def test_absolute_rules_need_no_baseline(workspace: Workspace, pair: Pair) -> None:
    _, cand, ds = pair
    store(workspace, cand, ds, perplexity=10.0)
    assert gate(workspace, cand.ref, None, [GateRule(metric="perplexity", op="max", value=11)])
    with pytest.raises(ConfigError, match="--against"):
        gate(workspace, cand.ref, None, [PPL_2PCT])


def test_candidate_without_evaluation_is_an_error(workspace: Workspace, pair: Pair) -> None:
    prod, cand, ds = pair
    store(workspace, prod, ds, perplexity=10.0)
    with pytest.raises(NotFoundError, match=f"no stored evaluation; run 'genloop eval {cand.ref}'"):
        gate(workspace, cand.ref, pair.production)


def test_evaluations_on_different_datasets_are_not_compared(
    workspace: Workspace, pair: Pair
) -> None:
    prod, cand, ds = pair
    other = new_dataset(workspace, pair.ds.name, content="b")  # D@2
    store(workspace, prod, ds, perplexity=10.0)
    store(workspace, cand, other, perplexity=10.0)
    with pytest.raises(NotFoundError, match="never evaluated on the same dataset") as info:
        gate(workspace, cand.ref, pair.production)
    assert f"genloop eval {pair.production} --dataset {other.ref}" in str(info.value)
    store(workspace, prod, other, perplexity=10.0)
    assert gate(workspace, cand.ref, pair.production).dataset == other.ref


def test_load_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {metric: perplexity, op: max_increase_pct, value: 2}\n"
        "  - {metric: pass@1, op: no_decrease}\n"
    )
    assert load_rules(rules) == [PPL_2PCT, GateRule(metric="pass@1", op="no_decrease")]
    full = tmp_path / "pipeline.yaml"
    full.write_text("gate:\n  rules:\n    - {metric: bleu, op: min, value: 1e1}\n")
    assert load_rules(full) == [GateRule(metric="bleu", op="min", value=10)]

    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("rule:\n  - {metric: x, op: min, value: 1}\n", "did you mean 'rules'"),
        ("rules:\n  - {metric: x, op: at_most, value: 1}\n", "rules"),
        ("rules:\n  - {metric: x, op: no_decrease, value: 1}\n", "takes no value"),
        ("rules: []\n", "holds no rules"),
        ("rules: [\n", "invalid YAML"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_rules(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_rules(tmp_path / "missing.yaml")

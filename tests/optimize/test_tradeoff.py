"""The trade-off report's parts: budgets, picking, lineage, perplexity, distillation loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.errors import ConfigError, GenloopError
from genloop.optimize.distill import distillation_loss
from genloop.optimize.tradeoff import (
    TradeoffReport,
    VariantResult,
    Workload,
    lineage,
    parse_budget,
    pick,
    runner_perplexity,
)
from genloop.workspace import Workspace, registry


@pytest.mark.parametrize(
    ("text", "metric", "delta", "relative", "higher"),
    [
        ("ppl+3%", "perplexity", 3.0, True, False),
        ("PPL + 0.5", "perplexity", 0.5, False, False),
        ("pass@1-1%", "pass@1", 1.0, True, True),
        ("pass@10-0.05", "pass@10", 0.05, False, True),
        ("fid+5%", "fid", 5.0, True, False),
        ("bleu-2%", "bleu", 2.0, True, True),
    ],
)
def test_budgets_parse(text: str, metric: str, delta: float, relative: bool, higher: bool) -> None:
    b = parse_budget(text)
    assert (b.metric, b.delta, b.relative, b.higher_is_better) == (metric, delta, relative, higher)


def test_budget_limits() -> None:
    ppl = parse_budget("ppl+3%")
    assert ppl.limit(10.0) == pytest.approx(10.3)
    assert ppl.allows(10.0, 10.3) and ppl.allows(10.0, 9.0) and not ppl.allows(10.0, 10.31)
    pass1 = parse_budget("pass@1-1%")
    assert pass1.allows(0.5, 0.495) and not pass1.allows(0.5, 0.49)
    assert parse_budget("ppl+0.5").allows(10.0, 10.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ppl-3%", "may rise: write ppl\\+3%"),
        ("pass@1+1%", "may fall: write pass@1-1%"),
        ("speed+3%", "unknown budget metric 'speed'"),
        ("ppl 3%", "cannot read the budget"),
        ("", "cannot read the budget"),
    ],
)
def test_bad_budgets_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_budget(text)


def _planted() -> TradeoffReport:
    """A parent and four variants with known speed and quality."""

    def v(ref: str, latency: float, ppl: float | None, **kw: Any) -> VariantResult:
        return VariantResult(
            ref=ref,
            transform="t",
            parent=None,
            latency_ms_p50=latency,
            file_mb=1.0,
            quality={"perplexity": ppl, "pass@1": kw.pop("pass1", None)},
            **kw,
        )

    return TradeoffReport(
        model="m@1",
        dataset=None,
        workload={},
        machine={},
        variants=[
            v("m@1", 10.0, 20.0, pass1=0.50),
            v("m@2", 4.0, 20.9, pass1=0.40),  # fastest, but ppl +4.5%
            v("m@3", 6.0, 20.5, pass1=0.50),  # +2.5%: the pick for ppl+3%
            v("m@4", 8.0, 19.0, pass1=0.50),  # better and slower than m@3
            v("m@5", 1.0, None, error="measuring failed"),  # never picked
        ],
    )


def test_budget_picks_the_fastest_variant_within_it() -> None:
    report = _planted()
    assert pick(report, parse_budget("ppl+3%")).ref == "m@3"
    assert [v.within_budget for v in report.variants] == [True, False, True, True, None]
    assert pick(_planted(), parse_budget("ppl+5%")).ref == "m@2"
    assert pick(_planted(), parse_budget("ppl+1%")).ref == "m@4"
    assert pick(_planted(), parse_budget("pass@1-1%")).ref == "m@3"
    # nothing but the parent fits: the parent is the answer
    report = _planted()
    report.variants[3].quality["perplexity"] = 30.0
    assert pick(report, parse_budget("ppl+0.1%")).ref == "m@1"


def test_a_budget_on_a_metric_the_parent_lacks_says_how_to_get_it() -> None:
    with pytest.raises(GenloopError, match=r"m@1 has no fid .* 'genloop eval'"):
        pick(_planted(), parse_budget("fid+5%"))


def test_lineage_follows_parents_across_names(workspace: Workspace, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    a1 = registry.register_model(workspace, "a", "causal_lm", src)
    registry.register_model(workspace, "other", "causal_lm", src)
    a2 = registry.register_model(workspace, "a", "causal_lm", src, parent=a1.ref)
    b1 = registry.register_model(workspace, "b", "causal_lm", src, parent=a1.ref)
    a3 = registry.register_model(workspace, "a", "causal_lm", src, parent=a2.ref)
    assert [i.ref for i in lineage(workspace, "a@1")] == [a1.ref, a2.ref, b1.ref, a3.ref]
    assert [i.ref for i in lineage(workspace, "a@2")] == [a2.ref, a3.ref]


def test_perplexity_of_the_report_is_the_evaluators(trained: tuple[Workspace, str]) -> None:
    from genloop.evaluate.text import perplexity
    from genloop.models.causal_lm import FAMILY
    from genloop.optimize.onnx import TorchCausalLM

    ws, ref = trained
    info = registry.resolve(ws, ref)
    model = FAMILY.load(ws.store.open_verified(info.artifact))
    ds_dir = ws.store.path(f"datasets/fx/{1}")
    tokens = ds_dir / "tokens"
    expected = perplexity(model, tokens, "test", 32, max_windows=6).metrics["perplexity"]
    got = runner_perplexity(TorchCausalLM(model), tokens, "test", 32, max_windows=6)
    assert got == pytest.approx(expected, rel=1e-5)


def test_workload_is_checked() -> None:
    with pytest.raises(GenloopError, match="repeats must be at least 1"):
        Workload(repeats=0)
    with pytest.raises(GenloopError, match="new_tokens must be at least 2"):
        Workload(new_tokens=1)


def test_distillation_loss_blends_kl_and_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen)
    teacher = torch.randn(2, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    ce = torch.nn.functional.cross_entropy(student.reshape(-1, 11), targets.reshape(-1))
    only_ce = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.0)
    assert torch.allclose(only_ce, ce)
    # a student equal to its teacher has no KL term left
    same = distillation_loss(teacher, teacher, targets, temperature=3.0, alpha=1.0)
    assert abs(float(same)) < 1e-5
    kl = distillation_loss(student, teacher, targets, temperature=2.0, alpha=1.0)
    mixed = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.3)
    assert math.isclose(float(mixed), 0.3 * float(kl) + 0.7 * float(ce), rel_tol=1e-5)
    with pytest.raises(GenloopError, match="temperature > 0"):
        distillation_loss(student, teacher, targets, temperature=0.0, alpha=0.5)

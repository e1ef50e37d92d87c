"""``optimize_model`` end to end on a tiny trained model: variants, lineage, loading, report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.config import EvalConfig, OptimizeConfig
from genloop.errors import ConfigError, GenloopError
from genloop.models.causal_lm import FAMILY
from genloop.models.quantized import is_quantized
from genloop.optimize.onnx import load_onnx_lm
from genloop.optimize.run import optimize_model
from genloop.optimize.tradeoff import Workload
from genloop.workspace import Workspace, registry

from ..conftest import run_genloop
from .conftest import WORKLOAD


def test_each_output_is_a_version_with_lineage_to_its_parent(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    ws, ref = trained
    parent = registry.resolve(ws, ref)
    pruned, int8, onnx, onnx_int8 = (
        optimized[k] for k in ("prune-0.3", "int8-dynamic", "onnx", "onnx-int8")
    )
    assert [v.ref for v in optimized["result"].variants] == [
        pruned.ref, int8.ref, onnx.ref, onnx_int8.ref
    ]  # fmt: skip
    assert all(v.name == parent.name for v in optimized["result"].variants)
    assert pruned.parent == parent.ref
    assert int8.parent == onnx.parent == pruned.ref  # quantize and export the pruned model
    assert onnx_int8.parent == onnx.ref
    # the variant keeps the dataset, so 'genloop eval' finds it
    assert {v.dataset_version_id for v in optimized["result"].variants} == {
        parent.dataset_version_id
    }
    assert pruned.config["optimize"]["recovery"]["steps"] == 3
    assert abs(pruned.metrics["sparsity"] - 0.3) < 1e-3  # still 30% after recovery
    assert int8.config["optimize"]["quantization"]["scheme"] == "int8-dynamic"
    assert onnx.metrics["onnx_max_abs_diff"] <= 1e-4
    # the artifact's genloop.json describes the transform too
    meta = json.loads((ws.store.open_verified(int8.artifact) / "genloop.json").read_text())
    assert meta["parent"] == pruned.ref
    assert meta["config"]["optimize"]["quantization"]["bits"] == "int8"


def test_every_variant_loads_and_generates(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    ws, _ = trained
    prompt = torch.tensor([[5, 9, 14, 3]])
    for key in ("prune-0.3", "int8-dynamic"):
        model = FAMILY.load(ws.store.open_verified(optimized[key].artifact))
        assert is_quantized(model) == (key == "int8-dynamic")
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert out.shape == (1, 10)
    for key in ("onnx", "onnx-int8"):
        runner = load_onnx_lm(ws.store.open_verified(optimized[key].artifact))
        logits, past = runner.forward(prompt)
        assert logits.shape == (1, 4, runner.vocab_size) and torch.isfinite(logits).all()
        mask = torch.ones(1, 5, dtype=torch.long)
        logits, past = runner.forward(logits[:, -1:].argmax(-1), mask, past=past)
        assert past[0][0].shape[2] == 5


def test_the_evaluator_loads_a_quantized_variant(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    from genloop.evaluate.run import evaluate_model

    ws, _ = trained
    record = evaluate_model(
        ws,
        optimized["int8-dynamic"].ref,
        suites=["perplexity"],
        cfg=EvalConfig(max_samples=2),
        device="cpu",
    )
    assert math.isfinite(record.metrics["perplexity"])


def test_report_lists_every_variant_against_the_parent(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    from genloop.optimize.tradeoff import tradeoff_report

    ws, ref = trained
    report = tradeoff_report(ws, ref, workload=Workload(**WORKLOAD), isolate=False)
    refs = [v.ref for v in report.variants]
    assert refs[0] == ref
    for variant in optimized["result"].variants:
        assert variant.ref in refs
    for v in report.variants:
        assert v.error is None, v.error
        for value in (v.file_mb, v.latency_ms_p50, v.latency_ms_p99, v.tokens_per_s, v.perplexity):
            assert value is not None and math.isfinite(value) and value > 0, v
        assert v.latency_ms_p99 >= v.latency_ms_p50
        assert v.peak_mem_mb is not None and v.peak_mem_mb >= 0
    by_ref = {v.ref: v for v in report.variants}
    assert by_ref[ref].delta_pct["perplexity"] == 0.0
    assert by_ref[optimized["int8-dynamic"].ref].format == "quantized"
    assert by_ref[optimized["onnx"].ref].format == "onnx"
    # int8 weights take less room than fp32; the ONNX graph computes the pruned model's ppl
    assert by_ref[optimized["int8-dynamic"].ref].file_mb < by_ref[ref].file_mb
    pruned_ppl = by_ref[optimized["prune-0.3"].ref].perplexity
    assert by_ref[optimized["onnx"].ref].perplexity == pytest.approx(pruned_ppl, rel=1e-4)
    columns, rows = report.rows()
    assert len(rows) == len(report.variants) and "p99 ms" in columns
    assert "| variant |" in report.to_markdown()


def test_budget_picks_the_fastest_within_it_and_promotes(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    ws, ref = trained
    cfg = OptimizeConfig(budget="ppl+50%", promote=True)
    result = optimize_model(ws, ref, cfg, workload=Workload(**WORKLOAD), isolate=False)
    assert result.report is not None and result.picked is not None
    fits = [v for v in result.report.variants if v.within_budget]
    assert result.picked == min(fits, key=lambda v: v.latency_ms_p50 or 0.0).ref
    assert registry.resolve(ws, f"{registry.resolve(ws, ref).name}@production").ref == (
        result.picked
    )
    assert result.promoted is not None and result.picked in result.promoted


def test_measuring_in_a_fresh_process(trained: tuple[Workspace, str]) -> None:
    from genloop.optimize.tradeoff import tradeoff_report

    ws, ref = trained
    parent = registry.resolve(ws, ref)
    report = tradeoff_report(
        ws, ref, variants=[parent], workload=Workload(**WORKLOAD), isolate=True
    )
    (v,) = report.variants
    assert v.error is None and v.peak_mem_mb is not None and v.peak_mem_mb > 0
    assert v.perplexity is not None and v.perplexity > 1


def test_distillation_trains_a_student_registered_under_the_teacher(
    trained: tuple[Workspace, str],
) -> None:
    ws, ref = trained
    cfg = OptimizeConfig(distill="tiny", distill_steps=3, distill_temperature=2.0)
    result = optimize_model(ws, ref, cfg)
    (student,) = result.variants
    assert student.parent == ref and student.tags["optimize"] == "distill-tiny"
    assert student.config["optimize"]["teacher"] == ref
    assert math.isfinite(student.metrics["distill_loss"])
    model = FAMILY.load(ws.store.open_verified(student.artifact))
    teacher = FAMILY.load(ws.store.open_verified(registry.resolve(ws, ref).artifact))
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 256  # tiny
    assert model.config.vocab_size == teacher.config.vocab_size
    assert model.config.eos_token_id == teacher.config.eos_token_id
    out = model.generate(torch.tensor([[5, 9]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 3


def test_mistakes_fail_before_any_work(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    ws, ref = trained
    with pytest.raises(GenloopError, match="nothing to do"):
        optimize_model(ws, ref, OptimizeConfig())
    with pytest.raises(GenloopError, match="--promote needs --budget"):
        optimize_model(ws, ref, OptimizeConfig(quantize="int8", promote=True))
    with pytest.raises(GenloopError, match="--recovery-steps"):
        optimize_model(ws, ref, OptimizeConfig(quantize="int8", recovery_steps=5))
    with pytest.raises(ConfigError, match="may rise"):
        optimize_model(ws, ref, OptimizeConfig(quantize="int8", budget="ppl-3%"))
    with pytest.raises(GenloopError, match="ONNX variant"):
        optimize_model(ws, optimized["onnx"].ref, OptimizeConfig(quantize="int8"))
    with pytest.raises(GenloopError, match="already quantized"):
        optimize_model(ws, optimized["int8-dynamic"].ref, OptimizeConfig(prune=0.2))


def test_cli_optimize_prints_json_and_writes_the_report(
    trained: tuple[Workspace, str], tmp_path: Path
) -> None:
    ws, ref = trained
    out = tmp_path / "report.md"
    ran = run_genloop(
        ws, "optimize", ref, "--quantize", "int8", "--quantize-mode", "weight_only",
        "--in-process", "--repeats", "2", "--threads", "1", "--out", out, "--json",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    data = json.loads(ran.stdout)
    (variant,) = data["variants"]
    assert variant["transform"] == "int8-weight_only" and variant["parent"] == ref
    assert [v["ref"] for v in data["report"]["variants"]] == [ref, variant["ref"]]
    assert out.read_text().startswith("# Trade-off report")

    bad = run_genloop(ws, "optimize", ref, "--quantize", "int3")
    assert bad.returncode == 2 and "int3" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_genloop(ws, "optimize", ref, "--budget", "speed+3%")
    assert bad.returncode != 0 and "unknown budget metric 'speed'" in bad.stderr

"""Evaluation runs and their storage: the row, the artifact, the reports, the registry.

Storage and reports are tested with suite results built by hand; the end-to-end tests
train a 2-layer, 32-wide model for a few steps on a fixture corpus and evaluate it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

import pytest
import torch

from genloop.config import EvalConfig
from genloop.errors import ConfigError, GenloopError, NotFoundError
from genloop.evaluate.results import SuiteResult
from genloop.evaluate.run import check_suites, evaluate_model
from genloop.evaluate.store import (
    get_evaluation,
    list_evaluations,
    load_results,
    merge_metrics,
    save_evaluation,
)
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.registry import ModelVersionInfo

from ..conftest import write_corpus


def dummy_version(ws: Workspace, name: str, family: str = "causal_lm") -> ModelVersionInfo:
    src = ws.root / f"src-{name}-{len(registry.list_models(ws))}"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return registry.register_model(ws, name, family, src, metrics={"val_loss": 2.0})


# ---------------------------------------------------------------------------------------
# storage and reports (no model)
# ---------------------------------------------------------------------------------------


def test_save_stores_row_artifact_and_model_metrics(workspace: Workspace) -> None:
    model = dummy_version(workspace, "m")
    gen = SuiteResult(
        "generation",
        {"bleu": 12.5, "rouge1": 0.4, "exact_match": 0.25},
        per_sample={"rouge1": [0.2, 0.6, 0.3, 0.5], "exact_match": [0.0, 1.0, 0.0, 0.0]},
        samples=[{"prompt": "the <b>cat</b>", "reference": "sat | on", "prediction": "ran\n"}],
        settings={"seed": 3, "temperature": 0.0},
    )
    ppl = SuiteResult("perplexity", {"perplexity": 12.0, "nll": math.log(12.0)})
    record = save_evaluation(workspace, model.id, None, [gen, ppl], settings={"seed": 3})

    assert record.suite == "generation+perplexity" and record.suites == ["generation", "perplexity"]
    assert record.metrics == {
        "bleu": 12.5,
        "rouge1": 0.4,
        "exact_match": 0.25,
        "perplexity": 12.0,
        "nll": math.log(12.0),
    }
    assert record.report == f"evaluations/{record.id}" and record.model == "m@1"
    assert list_evaluations(workspace, model.id) == [record]
    assert get_evaluation(workspace, record.id) == record

    files = workspace.store.open_verified(record.report)  # every file matches the manifest
    assert {p.name for p in files.iterdir()} >= {"results.json", "report.md", "report.html"}
    assert load_results(workspace, record)[0].per_sample == gen.per_sample
    saved = json.loads((files / "results.json").read_text())
    assert saved["evaluation"]["id"] == record.id and saved["suites"][0]["settings"]["seed"] == 3

    md = (files / "report.md").read_text()
    assert "| rouge1 | 0.4 |" in md and "&lt;b&gt;cat&lt;/b&gt;" in md and "sat \\| on" in md
    page = (files / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # score bars + per-sample histograms
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing loaded from outside
    assert "http://" not in page and "https://" not in page
    assert "&lt;b&gt;cat&lt;/b&gt;" in page

    # the registry shows the headline metrics next to the training ones
    info = registry.resolve(workspace, "m@1")
    assert info.metrics["perplexity"] == 12.0 and info.metrics["val_loss"] == 2.0


def test_non_finite_metrics_are_stored_as_null(workspace: Workspace) -> None:
    model = dummy_version(workspace, "nan")
    result = SuiteResult("perplexity", {"perplexity": math.inf}, per_sample={"nll": [math.nan]})
    record = save_evaluation(workspace, model.id, None, [result])
    assert record.metrics == {"perplexity": None}
    assert "perplexity" not in registry.resolve(workspace, model.ref).metrics
    assert load_results(workspace, record)[0].per_sample == {"nll": [None]}


def test_clashing_metric_names_keep_both() -> None:
    a = SuiteResult("generation", {"exact_match": 0.1, "bleu": 3.0})
    b = SuiteResult("code", {"exact_match": 0.2, "pass@1": 0.5})
    assert merge_metrics([a, b]) == {
        "generation/exact_match": 0.1,
        "bleu": 3.0,
        "code/exact_match": 0.2,
        "pass@1": 0.5,
    }


def test_save_checks_its_references(workspace: Workspace) -> None:
    with pytest.raises(NotFoundError, match="model version"):
        save_evaluation(workspace, 999, None, [SuiteResult("perplexity", {"perplexity": 1.0})])
    model = dummy_version(workspace, "refs")
    with pytest.raises(NotFoundError, match="dataset version"):
        save_evaluation(workspace, model.id, 999, [SuiteResult("bias", {"bias_ll_gap": 0.1})])
    assert list_evaluations(workspace, model.id) == []


def test_suites_are_checked() -> None:
    assert check_suites(["generation", "perplexity", "generation"]) == [
        "generation",
        "perplexity",
    ]
    assert check_suites(["image", "augment"]) == ["image", "augment"]  # for image models
    with pytest.raises(ConfigError, match="unknown suite 'perplexty'"):
        check_suites(["perplexty"])
    with pytest.raises(ConfigError, match="no suite"):
        check_suites([])


def test_errors_before_loading_a_model(workspace: Workspace) -> None:
    dummy_version(workspace, "nodata")
    with pytest.raises(GenloopError, match="--dataset"):
        evaluate_model(workspace, "nodata", suites=["perplexity"])
    dummy_version(workspace, "picture", family="vae")
    with pytest.raises(GenloopError, match="the image suite needs one: give --dataset"):
        evaluate_model(workspace, "picture")  # image models default to the image suite
    with pytest.raises(GenloopError, match="the bias suite needs a text model"):
        evaluate_model(workspace, "picture", suites=["bias"])
    with pytest.raises(
        GenloopError, match="the image suite is for the vae, gan, diffusion families"
    ):
        evaluate_model(workspace, "nodata", suites=["image"])
    with pytest.raises(NotFoundError, match="no model named"):
        evaluate_model(workspace, "absent")


# ---------------------------------------------------------------------------------------
# end to end on a tiny trained model
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, str]]:
    """A workspace with the fixture dataset and a tiny model trained on it for 10 steps."""
    from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    root = tmp_path_factory.mktemp("eval_run")
    ws = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "fx",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(ws, data, TokenizerConfig(vocab_size=320, seq_len=32))
    cfg = GenloopConfig.model_validate(
        {
            "name": "tiny",
            "tokenizer": {"vocab_size": 320, "seq_len": 32},
            "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2},
            "train": {
                "dataset": "fx",
                "lr": 3e-3,
                "max_steps": 10,
                "warmup_steps": 2,
                "batch_size": 8,
                "eval_every": 5,
                "eval_batches": 1,
                "checkpoint_every": 10,
                "device": "cpu",
            },
        }
    )
    result = train(ws, cfg)
    assert result.model is not None
    try:
        yield ws, result.model.ref
    finally:
        ws.close()
        torch.set_num_threads(threads)


def test_val_ppl_curve_is_logged(trained: tuple[Workspace, str]) -> None:
    """Training's periodic evaluation stores a validation perplexity curve."""
    from sqlalchemy import select

    from genloop.workspace.tables import RunMetric

    ws, ref = trained
    run_id = registry.resolve(ws, ref).run_id
    with ws.catalog.session() as s:
        points = s.execute(
            select(RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id, RunMetric.key == "val_ppl")
            .order_by(RunMetric.step)
        ).all()
    assert [step for step, _ in points] == [5, 10]
    assert all(math.isfinite(v) and v > 1 for _, v in points)


def test_evaluate_end_to_end_is_stored_and_reproducible(trained: tuple[Workspace, str]) -> None:
    ws, ref = trained
    cfg = EvalConfig(max_samples=3, max_new_tokens=8, num_samples=2, k=[1, 2])
    suites = ["perplexity", "generation", "code"]
    seen: list[tuple[str, int, int]] = []
    first = evaluate_model(
        ws, ref, suites=suites, cfg=cfg, device="cpu", progress=lambda *a: seen.append(a)
    )
    assert seen == [("perplexity", 1, 3), ("generation", 2, 3), ("code", 3, 3)]
    assert first.dataset == "fx@1" and first.suite == "perplexity+generation+code"
    names = ("perplexity", "nll", "bleu", "rouge1", "rouge2", "rougeL", "exact_match", "pass@1")
    for name in (*names, "pass@2"):
        value = first.metrics[name]
        assert value is not None and math.isfinite(value), name
    assert first.metrics["perplexity"] < 320  # it learned something in 10 steps
    assert first.settings["seed"] == 0 and first.settings["max_new_tokens"] == 8
    assert first.settings["suites"]["generation"]["decoding"] == "greedy"
    assert first.settings["suites"]["code"]["num_tasks"] == 3

    files = ws.store.open_verified(first.report or "")
    assert {"results.json", "report.md", "report.html"} <= {p.name for p in files.iterdir()}
    ppl, gen, code = load_results(ws, first)
    assert len(ppl.per_sample["nll"]) == ppl.settings["windows"] <= 3
    assert len(gen.per_sample["rouge1"]) == gen.settings["pairs"] <= 3
    assert len(code.per_sample["pass@1"]) == 3
    assert registry.resolve(ws, ref).metrics["perplexity"] == first.metrics["perplexity"]

    second = evaluate_model(ws, ref, suites=suites, cfg=cfg, device="cpu")
    assert second.id != first.id
    assert second.metrics == first.metrics  # same model, same seed: the same numbers
    assert load_results(ws, second)[1].samples == gen.samples

"""``genloop run``: every stage runs once, a re-run skips them all, a failure resumes.

A 40-document prose corpus, a 1-layer 32-wide model and 12 steps keep each pipeline run
to a few seconds; the commands run through genloop's entry point as a user types them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.tables import Run

pytestmark = pytest.mark.integration

PROSE = (
    "the cat sat on the mat and the dog ran to the park while birds sang in the tall green "
    "trees near a quiet river where children play every sunny day"
)
WORDS = PROSE.split()


def write_pipeline(tmp: Path, **overrides: Any) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(40):
        rng = random.Random(i)
        text = " ".join(" ".join(WORDS[k : k + 6]) for k in (rng.randrange(20) for _ in range(8)))
        (corpus / f"doc{i:02d}.txt").write_text(f"{text} doc {i}.\n", encoding="utf-8")
    spec: dict[str, Any] = {
        "name": "pipe",
        "data": {
            "name": "pipe-data",
            "sources": [{"type": "files", "paths": ["corpus"]}],  # relative to the file
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 300, "seq_len": 32},
        "model": {"family": "causal_lm", "n_layer": 1, "n_embd": 32, "n_head": 2},
        "train": {
            "max_steps": 12,
            "batch_size": 4,
            "warmup_steps": 2,
            "eval_every": 6,
            "eval_batches": 2,
            "checkpoint_every": 12,
            "device": "cpu",
            "precision": "fp32",
        },
        "eval": {"suites": ["perplexity"], "split": "test", "max_samples": 8},
        "gate": {"rules": [{"metric": "perplexity", "op": "max", "value": 1.0e6}]},
    }
    for key, value in overrides.items():
        section, field = key.split(".")
        spec[section][field] = value
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def run_cli(genloop_cli: Any) -> Any:
    def run(ws_root: Path, *args: str) -> tuple[int, Any]:
        result = genloop_cli(ws_root, "run", *args, "--json")
        if result.returncode == 0:
            return 0, json.loads(result.stdout)
        return result.returncode, result.output

    return run


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    workspace = init_workspace(tmp_path / "ws")
    yield workspace
    workspace.close()


def statuses(out: dict[str, Any]) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in out["stages"]}


def test_runs_every_stage_then_skips_them_all(ws: Workspace, tmp_path: Path, run_cli: Any) -> None:
    path = write_pipeline(tmp_path)
    code, first = run_cli(ws.root, str(path))
    assert code == 0, first
    assert statuses(first) == {
        "data": "ran",
        "train": "ran",
        "eval": "ran",
        "optimize": "skipped",  # no optimize section
        "register": "ran",
        "gate": "ran",
        "deploy": "ran",
    }
    assert registry.resolve(ws, "pipe@production").ref == first["model"] == "pipe@1"

    code, second = run_cli(ws.root, str(path))
    assert code == 0, second
    assert set(statuses(second).values()) <= {"cached", "skipped"}, second
    assert [m.ref for m in registry.list_models(ws, "pipe")] == ["pipe@1"]  # nothing retrained

    # a changed training setting reruns training and what follows, not the data stage
    code, third = run_cli(ws.root, str(path), "--set", "train.max_steps=14")
    assert code == 0, third
    assert statuses(third)["data"] == "cached"
    assert statuses(third)["train"] == "ran"
    assert registry.resolve(ws, "pipe@production").ref == "pipe@2"

    with ws.catalog.session() as s:  # each run is one lineage record with every stage
        runs = s.scalars(select(Run).where(Run.kind == "pipeline")).all()
        assert len(runs) == 3 and all(r.status == "completed" for r in runs)
        assert all(set(r.summary["stages"]) == set(statuses(first)) for r in runs)


def test_an_onnx_candidate_is_evaluated_gated_deployed_and_served(
    ws: Workspace, tmp_path: Path, run_cli: Any
) -> None:
    """optimize → ONNX export: register and gate evaluate the ONNX variant itself (in
    onnxruntime), deploy promotes it, and the serving engine loads it."""
    from genloop.config import ServeConfig
    from genloop.models.pretrained import variant_format
    from genloop.serve.engine.loader import load_engine

    path = write_pipeline(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["optimize"] = {"export": "onnx"}
    path.write_text(yaml.safe_dump(spec))
    code, out = run_cli(ws.root, str(path))
    assert code == 0, out
    assert statuses(out)["optimize"] == statuses(out)["gate"] == "ran"
    production = registry.resolve(ws, "pipe@production")
    assert production.ref == out["model"] == "pipe@2" and production.parent == "pipe@1"
    model_dir = ws.store.open_verified(production.artifact)
    assert variant_format(model_dir) == "onnx"
    assert production.metrics["perplexity"] == pytest.approx(
        registry.resolve(ws, "pipe@1").metrics["perplexity"], rel=1e-4
    )
    engine = load_engine(model_dir, model_name="pipe", model_version=2, cfg=ServeConfig())
    assert engine.runner.kind == "onnx"


def test_a_failed_stage_is_named_and_resumes_with_from(
    ws: Workspace, tmp_path: Path, run_cli: Any
) -> None:
    impossible = [{"metric": "perplexity", "op": "max", "value": 1.0}]  # no model is that good
    path = write_pipeline(tmp_path, **{"gate.rules": impossible})
    code, out = run_cli(ws.root, str(path))
    assert code == 1
    assert "stage 'gate' failed" in out and "--from gate" in out
    with pytest.raises(Exception, match="production"):
        registry.resolve(ws, "pipe@production")  # the gate kept it out
    with ws.catalog.session() as s:
        run = s.scalars(select(Run).where(Run.kind == "pipeline")).one()
        assert run.status == "failed" and run.summary["failed_stage"] == "gate"

    path = write_pipeline(tmp_path)  # a sane rule
    code, out = run_cli(ws.root, str(path), "--from", "gate")
    assert code == 0, out
    assert [s["stage"] for s in out["stages"]] == ["gate", "deploy"]
    assert statuses(out) == {"gate": "ran", "deploy": "ran"}
    assert registry.resolve(ws, "pipe@production").ref == "pipe@1"  # not retrained


def test_bad_stage_names_are_user_errors(ws: Workspace, tmp_path: Path, run_cli: Any) -> None:
    path = write_pipeline(tmp_path)
    code, out = run_cli(ws.root, str(path), "--from", "bake")
    assert code == 2 and "not a stage" in out
    code, out = run_cli(ws.root, str(path), "--from", "deploy")  # nothing to resume from
    assert code == 1 and "run the pipeline from the start" in out

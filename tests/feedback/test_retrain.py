"""The retrain flow on a real tiny model: feedback → candidate → gate → promote (or not)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from genloop.errors import GenloopError
from genloop.evaluate.store import list_evaluations
from genloop.feedback.retrain import retrain
from genloop.feedback.store import submit_feedback
from genloop.security.crypto import Cipher
from genloop.workspace import Workspace, registry
from genloop.workspace.datasets import get_dataset_version
from genloop.workspace.leases import LeaseBusy, acquire
from genloop.workspace.tables import Alert, Feedback, Lock, Run, utcnow

CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi"]


def sky(city: str) -> str:
    return f"Q: what colour is the sky over {city}? A:"


def corrections(ws: Workspace, cipher: Cipher, log: Any, model: Any, n: int = 6) -> list[int]:
    """``n`` users each correct the sky's colour over a different city."""
    return [
        submit_feedback(
            ws,
            cipher,
            response_id=log(model, sky(city), " green."),
            rating=-1,
            correction=" blue.",
            user_id=f"user{i}",
        )
        for i, city in enumerate(CITIES[:n])
    ]


def production(ws: Workspace, name: str) -> registry.ModelVersionInfo:
    return registry.resolve(ws, f"{name}@production")


def run_row(ws: Workspace, run_id: str) -> Run:
    with ws.catalog.session() as s:
        run = s.get(Run, run_id)
        assert run is not None
        return run


def test_a_passing_candidate_is_promoted_with_its_lineage(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    ids = corrections(ws, cipher, log, model)
    stages: list[str] = []
    result = retrain(ws, cipher, f"{model.name}@production", config(), on_stage=stages.append)

    assert result.outcome == "promoted", result.reason
    now = production(ws, model.name)
    assert now.ref == result.promoted == result.candidate == f"{model.name}@2"
    assert now.parent == model.ref and now.tags["gate"] == "passed"
    assert now.tags["feedback_dataset"] == result.feedback_dataset
    mix = get_dataset_version(ws, now.dataset_version_id or -1)
    assert mix.ref == result.train_dataset and mix.kind == "sft"
    assert mix.lineage["feedback_dataset"] == result.feedback_dataset
    assert mix.lineage["replay_dataset"] == "qa@1" and mix.lineage["replay_rows"] == 6
    assert result.feedback_rows == 6 and mix.stats["rows"] == 12  # replay_ratio 0.5
    assert any(s.startswith("fine-tuning") for s in stages)

    # both evaluated on the original dataset, and the gate compared them there
    assert result.eval_dataset == "qa@1" and result.gate is not None and result.gate["passed"]
    for version in (model, now):
        (record,) = list_evaluations(ws, version.id)
        assert record.dataset == "qa@1" and record.metrics["perplexity"] is not None

    # the catalog records the run, its fine-tune and the rows it used
    run = run_row(ws, result.run_id)
    assert run.kind == "retrain" and run.status == "completed"
    assert run.summary["outcome"] == "promoted" and run.summary["feedback_max_id"] == max(ids)
    with ws.catalog.session() as s:
        child = s.scalars(select(Run).where(Run.parent_run_id == result.run_id)).one()
        assert child.kind == "train" and child.status == "completed"
        exported = set(s.scalars(select(Feedback.exported_to).where(Feedback.id.in_(ids))))
    feedback = get_dataset_version(ws, now.tags["feedback_dataset_version_id"])
    assert exported == {feedback.id} and feedback.ref == result.feedback_dataset

    # the rows are used: nothing new to retrain on
    again = retrain(ws, cipher, f"{model.name}@production", config())
    assert again.outcome == "skipped" and "no new feedback" in again.reason
    assert production(ws, model.name).ref == now.ref

    # and `models rollback` steps back to the previous production version
    assert registry.rollback(ws, model.name).ref == model.ref


def test_a_failing_gate_leaves_production_untouched_and_says_why(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    ids = corrections(ws, cipher, log, model)
    strict = config(gate={"rules": [{"metric": "perplexity", "op": "max", "value": 1.0}]})
    result = retrain(ws, cipher, f"{model.name}@production", strict)

    assert result.outcome == "rejected" and result.promoted is None
    assert "gate failed: perplexity ≤ 1" in result.reason
    assert production(ws, model.name).ref == model.ref
    candidate = registry.resolve(ws, result.candidate or "")
    assert candidate.aliases == [] and candidate.tags["gate"] == "failed"
    run = run_row(ws, result.run_id)
    assert run.status == "completed" and run.summary["outcome"] == "rejected"
    assert run.summary["gate"]["passed"] is False
    with ws.catalog.session() as s:
        alert = s.scalars(select(Alert).where(Alert.source == f"{model.name}@production")).one()
    assert alert.kind == "retrain_gate" and "perplexity" in alert.message
    assert alert.details == {"run_id": result.run_id}

    # the feedback was not used by a promoted model: the next retrain takes it again
    passing = retrain(ws, cipher, f"{model.name}@production", config())
    assert passing.outcome == "promoted" and passing.feedback_rows == len(ids)
    assert registry.resolve(ws, passing.promoted or "").parent == model.ref


def test_a_failure_mid_retrain_leaves_production_untouched_and_the_next_one_recovers(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    corrections(ws, cipher, log, model)
    # the evaluation after training fails: that dataset holds pairs, not token shards
    with pytest.raises(GenloopError, match="no token shards"):
        retrain(
            ws, cipher, f"{model.name}@production", config(), eval_dataset=f"{model.name}-feedback"
        )
    assert production(ws, model.name).ref == model.ref
    with ws.catalog.session() as s:
        failed = s.scalars(select(Run).where(Run.kind == "retrain", Run.name == model.name)).one()
        assert failed.status == "failed" and "no token shards" in (failed.error or "")
        assert s.get(Lock, f"retrain:{model.name}") is None  # released

    result = retrain(ws, cipher, f"{model.name}@production", config())
    assert result.outcome == "promoted"
    assert registry.resolve(ws, result.promoted or "").parent == model.ref


def test_one_retrain_per_model_at_a_time_and_an_expired_lease_is_taken_over(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    corrections(ws, cipher, log, model, n=3)
    lock = f"retrain:{model.name}"
    acquire(ws, lock, "other-worker", lease_s=600)
    with pytest.raises(LeaseBusy, match="held by other-worker"):
        retrain(ws, cipher, f"{model.name}@production", config())

    # the other worker dies: its lease expires, and the run it left 'running' is closed
    with ws.catalog.session() as s:
        s.add(Run(id=f"dead-{model.name}", name=model.name, kind="retrain", status="running"))
        row = s.get(Lock, lock)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    result = retrain(ws, cipher, f"{model.name}@production", config())
    assert result.outcome == "promoted"
    dead = run_row(ws, f"dead-{model.name}")
    assert dead.status == "failed" and "abandoned" in (dead.error or "")


def test_retrain_needs_an_alias_to_promote_to(
    ws: Workspace, cipher: Cipher, new_model: Any, config: Any
) -> None:
    model = new_model()
    with pytest.raises(GenloopError, match="retrain needs NAME@ALIAS"):
        retrain(ws, cipher, model.ref, config())


def test_a_dpo_retrain_trains_on_preference_pairs_without_replay(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, config: Any
) -> None:
    model = new_model()
    corrections(ws, cipher, log, model, n=4)
    dpo = {"objective": "dpo", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    result = retrain(
        ws,
        cipher,
        f"{model.name}@production",
        config(feedback__retrain=dpo | {"lr": 1e-3, "max_steps": 4, "batch_size": 2}),
    )
    assert result.outcome == "promoted", result.reason
    mix = get_dataset_version(ws, production(ws, model.name).dataset_version_id or -1)
    assert mix.kind == "dpo" and result.replay_rows == 0  # plain text cannot be a preference
    assert result.feedback_rows == 4 and mix.stats["rows"] == 4

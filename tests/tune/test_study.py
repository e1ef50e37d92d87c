"""Tuning studies through the Python API, on a 1-layer, 32-wide model and a fixture corpus.

Parallel studies run 2 real worker processes on SQLite and on PostgreSQL; the others run
their single worker in this process. Trials train 20 steps and validate every 5, so a
pruned trial stops at step 5. ``enqueue`` fixes which values the first trials try, so
which trials are pruned or fail does not depend on the sampler. Ctrl-C and ``--resume``
through the real CLI are in ``test_tune_cmd.py``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable

import optuna
import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from safetensors.torch import load_file
from sqlalchemy import inspect, select

from genloop.config import GenloopConfig
from genloop.errors import ConfigError, ConflictError, NotFoundError
from genloop.train import checkpoint as ckpt
from genloop.tune import storage as storage_mod
from genloop.tune import tune
from genloop.tune.space import make_distributions
from genloop.tune.storage import open_storage
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.tables import Base, Run, RunMetric

GOOD, BAD, NAN = 8e-3, 1e-6, 1e4  # learning rates: learns, barely moves, diverges
LR_SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
Config = Callable[..., GenloopConfig]


def study_of(ws: Workspace, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(ws))


def runs_of(ws: Workspace, study: str) -> list[Run]:
    with ws.catalog.session() as s:
        return list(s.scalars(select(Run).where(Run.study == study).order_by(Run.started_at)))


def test_two_workers_share_the_budget_exactly(any_ws: Workspace, config: Config) -> None:
    """2 worker processes, 4 trials: trials 0-3 once each, each its own linked run; the best
    one's weights become the registered model; the report is stored; a rerun is refused
    and --resume with a larger budget adds exactly the difference."""
    ws = any_ws
    seen = []
    cfg = config("par", LR_SPACE, trials=4, pruner="none")
    result = tune(ws, cfg, workers=2, progress=seen.append)

    study = study_of(ws, "par")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(4))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(o.number for o in seen) == list(range(4))  # each reported once
    assert {o.worker for o in seen} == {0, 1}  # both workers took part
    assert result.counts["complete"] == 4 and result.finished
    assert result.steps == 4 * 20

    runs = runs_of(ws, "par")
    [study_run] = [r for r in runs if r.kind == "tune"]
    trial_runs = [r for r in runs if r.kind == "trial"]
    assert study_run.status == "completed" and study_run.id == result.run_id
    assert sorted(r.trial for r in trial_runs if r.trial is not None) == list(range(4))
    assert {r.parent_run_id for r in trial_runs} == {study_run.id}
    assert all(r.status == "completed" for r in trial_runs)
    by_number = {t.number: t for t in trials}
    for r in trial_runs:  # each run trained its own trial's value, on the pinned dataset
        assert r.trial is not None
        assert r.config["train"]["lr"] == pytest.approx(by_number[r.trial].params["train.lr"])
        assert r.config["train"]["dataset"] == "fx@1"

    best = study.best_trial
    assert result.best_trial == best.number and result.best_value == best.value
    assert result.model is not None and result.model.run_id == best.user_attrs["run_id"]
    assert result.model.metrics["val_loss"] == pytest.approx(best.value)
    saved = load_file(str(ws.store.path(best.user_attrs["checkpoint"]) / "model.safetensors"))
    model_dir = registry.artifact_path(ws, result.model.ref)
    registered = load_file(str(model_dir / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(registered[key], saved[key])  # the trial's weights, not retrained
    others = [t for t in trials if t.number != best.number]
    assert not any(ws.store.exists(t.user_attrs["checkpoint"]) for t in others)

    assert result.report is not None
    report = ws.store.open_verified(result.report)
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "train.lr" in page
    data = json.loads((report / "report.json").read_text())
    assert data["best"]["trial"] == best.number and len(data["trials"]) == 4
    assert set(data["importances"]) == {"train.lr"}

    with pytest.raises(ConflictError, match="already ran its 4 trials"):
        tune(ws, cfg)
    more = tune(ws, cfg, trials=5, resume=True)
    assert sorted(t.number for t in study_of(ws, "par").trials) == list(range(5))
    assert more.counts["complete"] == 5 and more.budget == 5

    # Optuna's tables live beside genloop's (their own PostgreSQL schema or SQLite file), so
    # the catalog's migrations never see them and `genloop init` still has nothing to do
    assert "trials" not in inspect(ws.catalog.engine).get_table_names()
    with ws.catalog.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    url = ws.catalog.url
    ws.close()
    again = init_workspace(ws.root, database_url=url)
    try:
        assert study_of(again, "par").best_trial.number == more.best_trial
    finally:
        again.close()


def test_poor_trials_are_pruned_at_their_first_validation(ws: Workspace, config: Config) -> None:
    """Median pruner, one trial to compare with: the barely-learning ones stop at step 5,
    their runs are marked pruned (not failed), their checkpoints are dropped."""
    result = tune(
        ws,
        config("prune", LR_SPACE, trials=4, pruner="median"),
        enqueue=[{"train.lr": GOOD}, {"train.lr": BAD}, {"train.lr": BAD}],
    )
    states = {t.number: t.state for t in study_of(ws, "prune").trials}
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert states[1] == states[2] == optuna.trial.TrialState.PRUNED
    assert result.counts["pruned"] >= 2 and result.best_trial in (0, 3)
    runs = {r.trial: r for r in runs_of(ws, "prune") if r.kind == "trial"}
    for number in (1, 2):
        run = runs[number]
        assert run.status == "pruned" and "pruned at step 5" in (run.error or "")
        assert run.summary["val_loss"] > runs[0].summary["val_loss"]
        assert not ckpt.list_checkpoints(ws.store, run.id)
        with ws.catalog.session() as s:
            steps = s.scalars(select(RunMetric.step).where(RunMetric.run_id == run.id)).all()
        assert max(steps) == 5  # trained 5 of 20 steps
    assert result.steps == 20 + 5 + 5 + study_of(ws, "prune").trials[3].user_attrs["steps"]


def test_failing_trials_do_not_stop_the_study(ws: Workspace, config: Config) -> None:
    """A diverging trial (NaN) and an impossible combination fail; the others go on."""
    space = {
        "train.lr": {"type": "categorical", "choices": [GOOD, NAN, 3e-3]},
        "model.n_head": {"type": "categorical", "choices": [2, 3]},
    }
    result = tune(
        ws,
        config("fail", space, trials=4, pruner="none", sampler="random"),
        enqueue=[
            {"train.lr": NAN, "model.n_head": 2},
            {"train.lr": 3e-3, "model.n_head": 3},  # 32 is not divisible by 3
            {"train.lr": GOOD, "model.n_head": 2},
        ],
    )
    trials = study_of(ws, "fail").trials
    assert trials[0].state == trials[1].state == optuna.trial.TrialState.FAIL
    assert "became nan" in trials[0].user_attrs["error"]
    assert "invalid combination" in trials[1].user_attrs["error"]
    assert "divisible" in trials[1].user_attrs["error"]
    assert trials[2].state == optuna.trial.TrialState.COMPLETE
    assert len(trials) == 4 and result.finished and result.counts["failed"] >= 2
    runs = {r.trial: r for r in runs_of(ws, "fail") if r.kind == "trial"}
    assert runs[0].status == "failed" and runs[1].status == "failed"
    assert result.model is not None


def test_user_mistakes_are_clear(ws: Workspace, config: Config) -> None:
    with pytest.raises(ConfigError, match="no tune section"):
        tune(ws, config("m1", LR_SPACE).model_copy(update={"tune": None}))
    with pytest.raises(ConfigError, match="prepared once"):
        tune(ws, config("m2", {"data.split.val": {"type": "float", "low": 0.1, "high": 0.2}}))
    with pytest.raises(ConfigError, match="needs a step"):
        tune(ws, config("m3", LR_SPACE, sampler="grid"))
    with pytest.raises(NotFoundError, match="no study named 'm4' to resume"):
        tune(ws, config("m4", LR_SPACE), resume=True)
    with pytest.raises(ConfigError, match=r"not in tune\.space"):
        tune(ws, config("m5", LR_SPACE), enqueue=[{"train.batch_size": 4}])
    with pytest.raises(ConfigError, match="is not among the runs' metrics"):
        tune(ws, config("m6", LR_SPACE, trials=2, metric="accuracy", pruner="none"))
    tune(ws, config("m7", LR_SPACE, trials=1, pruner="none"))
    changed = config("m7", {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, trials=2)
    with pytest.raises(ConfigError, match="different config"):
        tune(ws, changed, resume=True)


def test_grid_sampler_covers_the_grid_once(ws: Workspace, config: Config) -> None:
    """A grid of 3 points with a budget of 10: 3 trials, each point once."""
    space = {"train.lr": {"type": "float", "low": 2e-3, "high": 6e-3, "step": 2e-3}}
    result = tune(ws, config("grid", space, trials=10, sampler="grid", pruner="none"))
    values = sorted(t.params["train.lr"] for t in study_of(ws, "grid").trials)
    assert values == pytest.approx([2e-3, 4e-3, 6e-3])
    assert result.budget == 3 and result.finished


def test_a_trial_whose_worker_died_runs_again(
    ws: Workspace, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies mid-trial (SIGKILL, a lost machine) leaves its trial running, its
    heartbeat silent: the next claim fails it, marks its run failed and queues the same
    values again, so the budget is still met exactly."""
    monkeypatch.setattr(storage_mod, "HEARTBEAT_S", 1)
    monkeypatch.setattr(storage_mod, "GRACE_S", 2)
    cfg = config("stale", LR_SPACE, pruner="none")
    tune(ws, cfg, trials=1)
    storage = open_storage(ws, heartbeat=True)
    study = optuna.load_study(study_name="stale", storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats outside study.optimize
        dead = study.ask(make_distributions(cfg.tune.space if cfg.tune else {}))
    storage.record_heartbeat(dead._trial_id)  # as claim_trial does, then the worker is gone
    time.sleep(3.5)

    result = tune(ws, cfg, trials=2, resume=True)
    trials = study_of(ws, "stale").trials
    assert trials[dead.number].state == optuna.trial.TrialState.FAIL
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert retry.params == dead.params and retry.state == optuna.trial.TrialState.COMPLETE
    assert result.counts == {
        "complete": 2, "pruned": 0, "failed": 0, "interrupted": 1, "running": 0, "waiting": 0
    }  # fmt: skip
    assert result.finished

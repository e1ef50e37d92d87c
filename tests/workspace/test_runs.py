"""Run rows: one way to start a run, set its status, log its series and read them back."""

from __future__ import annotations

import math

import pytest

from genloop.errors import NotFoundError
from genloop.workspace import Workspace, runs


def test_a_run_starts_running_and_ends_with_its_status(workspace: Workspace) -> None:
    run_id = runs.start_run(workspace, name="m", kind="train", config={"lr": 1e-3})
    run = runs.get_run(workspace, run_id)
    assert (run.status, run.ended_at, run.config) == ("running", None, {"lr": 1e-3})
    assert run.heartbeat_at is not None

    assert runs.set_status(workspace, run_id, "failed", summary={"a": 1}, error="boom")
    runs.set_status(workspace, run_id, "completed", summary={"b": 2})
    run = runs.get_run(workspace, run_id)
    assert run.status == "completed" and run.error is None  # the error is cleared
    assert run.summary == {"a": 1, "b": 2} and run.ended_at is not None
    runs.set_status(workspace, run_id, "running")
    assert runs.get_run(workspace, run_id).ended_at is None


def test_a_run_that_could_not_start_is_failed_at_once(workspace: Workspace) -> None:
    run_id = runs.start_run(workspace, name="m", kind="trial", error="invalid combination")
    run = runs.get_run(workspace, run_id)
    assert run.status == "failed" and run.ended_at is not None


def test_only_if_guards_the_change(workspace: Workspace) -> None:
    run_id = runs.start_run(workspace, name="m", kind="trial")
    runs.set_status(workspace, run_id, "interrupted", error="by the user")
    changed = runs.set_status(
        workspace, run_id, "failed", error="stale", only_if=lambda st: st == "running"
    )
    assert not changed
    assert runs.get_run(workspace, run_id).error == "by the user"
    assert not runs.set_status(workspace, "nosuchrun", "failed")


def test_metrics_are_logged_reopened_and_thinned(workspace: Workspace) -> None:
    run_id = runs.start_run(workspace, name="m", kind="train")
    runs.log_metrics(workspace, run_id, [("loss", step, 10.0 - step) for step in range(1, 101)])
    runs.set_status(workspace, run_id, "interrupted")
    runs.reopen(workspace, run_id, after_step=50)
    details = runs.run_details(workspace, run_id, keys=["loss"], max_points=10)
    assert details["status"] == "running" and details["error"] is None
    points = details["metrics"]["loss"]
    assert len(points) == 10 and points[0] == [1, 9.0] and points[-1] == [50, -40.0]
    assert runs.run_details(workspace, run_id)["metrics"]["loss"][-1] == [50, -40.0]
    with pytest.raises(NotFoundError):
        runs.run_details(workspace, "nosuchrun")


def test_a_named_run_collects_a_series_by_check(workspace: Workspace) -> None:
    first = runs.named_run(workspace, kind="monitor", name="monitor:tiny")
    assert runs.named_run(workspace, kind="monitor", name="monitor:tiny") == first
    assert runs.log_next(workspace, first, {"psi": 0.1, "nan": math.nan}) == 1
    assert runs.log_next(workspace, first, {"psi": 0.3}) == 2
    found = runs.timed_series(workspace, kind="monitor", name="monitor:tiny")
    assert [v for _, v in found["psi"]] == [0.1, 0.3] and "nan" not in found
    assert runs.run_names(workspace, kind="monitor") == ["monitor:tiny"]


def test_list_runs_filters_and_pages(workspace: Workspace) -> None:
    ids = [runs.start_run(workspace, name=f"p{i % 2}", kind="pipeline") for i in range(5)]
    runs.start_run(workspace, name="p0", kind="train")
    assert {r.id for r in runs.list_runs(workspace, kind="pipeline", name="p0")} == {
        ids[0],
        ids[2],
        ids[4],
    }
    assert len(runs.list_runs(workspace, kind="pipeline", limit=2, offset=4)) == 1
    runs.update_summary(workspace, ids[0], lambda s: {"stages": {**s.get("stages", {}), "a": 1}})
    assert runs.get_run(workspace, ids[0]).summary == {"stages": {"a": 1}}

"""``genloop tune`` as a user runs it: output, errors, and Ctrl-C then ``--resume``.

Ctrl-C is a real SIGINT to the process group of a real ``genloop tune --workers 2`` (as a
terminal sends it), in the middle of the study; the other commands run ``genloop``'s entry
point in this process, which spares importing torch again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from sqlalchemy import select

from genloop.tune.storage import open_storage
from genloop.workspace import Workspace
from genloop.workspace.tables import Run

from ..conftest import run_genloop

pytestmark = pytest.mark.integration

LR_SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


Spec = Callable[..., dict[str, Any]]


@pytest.fixture
def write_config(ws: Workspace, make_spec: Spec) -> Callable[..., Path]:
    def write(name: str, **kwargs: Any) -> Path:
        path = ws.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(make_spec(name, LR_SPACE, **kwargs)), encoding="utf-8")
        return path

    return write


def trial_runs(ws: Workspace, study: str) -> list[Run]:
    with ws.catalog.session() as s:
        return list(s.scalars(select(Run).where(Run.study == study, Run.kind == "trial")))


def test_prints_trials_best_and_model(ws: Workspace, write_config: Callable[..., Path]) -> None:
    cfg = write_config("cli", trials=2, pruner="none")
    ran = run_genloop(ws, "tune", cfg, "--workers", "1")
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert sum(line.startswith("trial ") and "complete" in line for line in lines) == 2
    assert "train.lr=" in ran.stdout
    assert "study cli: 2 complete, 0 pruned, 0 failed of 2; 40 training steps" in ran.stdout
    assert "best: trial" in ran.stdout and "registered model cli@1" in ran.stdout
    report = Path(lines[-1].removeprefix("report: "))
    assert report.name == "report.html" and report.is_file()

    again = run_genloop(ws, "tune", cfg, "--resume", "--trials", "3", "--json")
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)  # --json: nothing but the JSON
    assert out["counts"]["complete"] == 3 and out["budget"] == 3 and out["finished"]
    assert out["report_html"].endswith("report.html")


def test_user_errors_are_one_line(
    ws: Workspace, write_config: Callable[..., Path], make_spec: Spec
) -> None:
    no_tune = ws.root / "plain.yaml"
    plain = make_spec("plain", LR_SPACE)
    del plain["tune"]
    no_tune.write_text(yaml.safe_dump(plain), encoding="utf-8")
    ran = run_genloop(ws, "tune", no_tune)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert ran.stderr.strip().startswith("error: the config has no tune section")

    ran = run_genloop(ws, "tune", write_config("typo"), "--set", "tune.space.train.lrr.type=float")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr

    ran = run_genloop(ws, "tune", write_config("nostudy"), "--resume")
    assert ran.returncode == 1
    assert "no study named 'nostudy' to resume" in ran.stderr


def test_ctrl_c_stops_cleanly_and_resume_continues(
    ws: Workspace, write_config: Callable[..., Path]
) -> None:
    """SIGINT mid-study to `genloop tune --workers 2`: exit 130, no trial left running, the
    interrupted ones marked; `--resume` runs them again (same values) and completes the
    budget exactly."""
    budget = 5
    cfg = write_config("ctrlc", trials=budget, pruner="none", train={"max_steps": 60})
    env = {k: v for k, v in os.environ.items() if k != "GENLOOP_DATABASE_URL"}
    env |= {"GENLOOP_HOME": str(ws.root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genloop", "tune", str(cfg), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job has
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # one done, one running
            statuses = [r.status for r in trial_runs(ws, "ctrlc")]
            if "completed" in statuses and "running" in statuses:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        # at once, no sleep first: a sleep was a window in which, on a busy machine, the
        # remaining trials could finish and the study exit 0 before the signal came
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "--resume" in stderr

    study = optuna.load_study(study_name="ctrlc", storage=open_storage(ws))
    trials = study.get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING], stderr
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert interrupted and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    done_before = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done_before
    runs = {r.trial: r for r in trial_runs(ws, "ctrlc")}
    assert "running" not in {r.status for r in runs.values()}
    # an interrupted trial has an interrupted run, or none if Ctrl-C came before it started
    assert all(runs[t.number].status == "interrupted" for t in interrupted if t.number in runs)
    with ws.catalog.session() as s:
        [study_run] = s.scalars(select(Run).where(Run.study == "ctrlc", Run.kind == "tune"))
        assert study_run.status == "interrupted"

    ran = run_genloop(ws, "tune", cfg, "--resume", "--workers", "1", "--json")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["finished"] and out["counts"]["complete"] == budget
    assert out["counts"]["interrupted"] == len(interrupted) and out["model"] == "ctrlc@1"

    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == budget  # none twice
    for t in interrupted:  # each ran again with the same values
        [retry] = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert retry.params == t.params and retry.state == optuna.trial.TrialState.COMPLETE
    with ws.catalog.session() as s:
        [study_run] = s.scalars(select(Run).where(Run.study == "ctrlc", Run.kind == "tune"))
        assert study_run.status == "completed"
    runs = {r.trial: r for r in trial_runs(ws, "ctrlc")}
    assert all(runs[t.number].status == "completed" for t in counted)  # a run per trial

"""Training telemetry: NaN and loss-spike alerts from the run tracker and the real loop."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest
from sqlalchemy import select

from genloop.config import GenloopConfig
from genloop.monitor.alerts import list_alerts
from genloop.train.tracking import RunTracker
from genloop.workspace import Workspace
from genloop.workspace.tables import Run, RunMetric


def curve(steps: int, seed: int = 0) -> list[float]:
    """A realistic loss curve: decaying from 6 to about 2, with 5 % batch noise."""
    rng = random.Random(seed)
    return [(2 + 4 * math.exp(-s / 40)) * (1 + rng.gauss(0, 0.05)) for s in range(steps)]


def tracker(ws: Workspace, webhook_url: str | None = None, kind: str = "train") -> RunTracker:
    return RunTracker.start(
        ws,
        name="watched",
        kind=kind,
        config={"monitor": {"webhook_url": webhook_url}},
    )


def test_a_normal_noisy_curve_raises_nothing(workspace: Workspace) -> None:
    t = tracker(workspace)
    for step, loss in enumerate(curve(400), 1):
        t.log(step, loss=loss, grad_norm=1.0, tokens_per_s=1000.0)
    t.set_status("completed")
    assert list_alerts(workspace) == []


def test_a_loss_spike_alerts_the_catalog_and_the_webhook(
    workspace: Workspace, receiver: Any
) -> None:
    t = tracker(workspace, receiver.url)
    losses = curve(120)
    for step, loss in enumerate(losses, 1):
        t.log(step, loss=loss)
    t.log(121, loss=losses[-1] * 4)  # the spike
    t.log(122, loss=losses[-1] * 4.5)  # still high: the same alert is cooling down
    [alert] = list_alerts(workspace)
    assert alert.kind == "loss_spike" and alert.source == t.run_id
    assert alert.details["step"] == 121 and alert.severity == "warning"
    [body] = receiver.wait(1)  # the webhook came from the run's stored config
    assert body["id"] == alert.id and body["kind"] == "loss_spike"


def test_nan_is_one_critical_alert_and_never_stored(workspace: Workspace) -> None:
    t = tracker(workspace)
    for step, loss in enumerate(curve(10), 1):
        t.log(step, loss=loss)
    t.log(11, loss=math.nan, grad_norm=math.inf)
    t.log(12, loss=math.nan)
    t.diverged("the loss became nan at step 11")  # what the loop reports when it stops
    [alert] = list_alerts(workspace)
    assert alert.kind == "nan" and alert.severity == "critical" and alert.source == t.run_id
    assert alert.details["step"] == 11 and alert.details["values"]["loss"] == "nan"
    t.set_status("failed")
    with workspace.catalog.session() as s:
        values = s.scalars(select(RunMetric.value).where(RunMetric.run_id == t.run_id)).all()
    assert len(values) == 10 and all(math.isfinite(v) for v in values)


def test_a_diverging_tuning_trial_is_only_an_info_alert(
    workspace: Workspace, receiver: Any
) -> None:
    t = tracker(workspace, receiver.url, kind="tune")
    t.log(1, loss=math.inf)
    [alert] = list_alerts(workspace)
    assert alert.kind == "nan" and alert.severity == "info"
    time.sleep(0.3)
    assert receiver.bodies == []


def test_the_training_loop_records_a_nan_alert_when_it_diverges(
    trained: tuple[Workspace, str],
) -> None:
    from genloop.train.loop import TrainingDiverged, train

    ws, _ = trained
    cfg = GenloopConfig.model_validate(
        {
            "name": "absurd",
            "tokenizer": {"vocab_size": 320, "seq_len": 32},
            "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2},
            "train": {
                "dataset": "fx",
                "lr": 1e6,
                "min_lr": 0,
                "grad_clip": None,
                "warmup_steps": 0,
                "max_steps": 30,
                "batch_size": 8,
                "eval_every": 10,
                "checkpoint_every": 10,
                "device": "cpu",
            },
        }
    )
    with pytest.raises(TrainingDiverged) as caught:
        train(ws, cfg)
    [alert] = list_alerts(ws, kind="nan")
    assert alert.severity == "critical" and str(caught.value) in alert.message
    with ws.catalog.session() as s:
        run = s.get(Run, alert.source)
        assert run is not None and run.name == "absurd" and run.status == "failed"

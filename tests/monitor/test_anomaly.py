"""Latency and error-rate anomalies: detectors, and alerts raised by the monitor thread."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from genloop.config import MonitorConfig
from genloop.monitor.alerts import list_alerts
from genloop.monitor.anomaly import ERROR_BATCH, AnomalyMonitor, EwmaDetector
from genloop.monitor.scheduler import MonitorWorker
from genloop.workspace import Workspace


def latencies(n: int, seed: int = 0, median_ms: float = 40.0) -> list[float]:
    """Realistic latencies: log-normal around ``median_ms`` with ~15 % spread."""
    rng = random.Random(seed)
    return [median_ms * math.exp(rng.gauss(0, 0.15)) for _ in range(n)]


def test_ewma_matches_the_closed_form() -> None:
    det = EwmaDetector(alpha=0.5, z_threshold=3, min_samples=5, var_alpha=0.25)
    for x in (1.0, 3.0, 2.0):
        assert det.update(x) is None
    # mean: 1 → 1 + .5·2 = 2 → 2 + .5·0 = 2
    # squared deviations 4 then 0: sq = .25·4 = 1 → .75·1 = .75; weight .25 → .4375
    assert det.mean == 2.0
    assert det.var == pytest.approx(0.75 / 0.4375)
    assert det.score(2.0 + 3 * math.sqrt(0.75 / 0.4375)) == pytest.approx(3.0)


def test_no_anomaly_in_normal_noise_and_none_before_min_samples() -> None:
    mon = AnomalyMonitor(ewma_alpha=0.1, z_threshold=4.0, min_samples=30)
    found = [a for x in latencies(2000) for a in mon.observe("tiny", x, failed=False)]
    assert found == []
    fresh = AnomalyMonitor(ewma_alpha=0.1, z_threshold=4.0, min_samples=30)
    early = [a for x in [40.0] * 10 + [4000.0] for a in fresh.observe("tiny", x, failed=False)]
    assert early == []  # 10 samples are too few to know what normal is


def test_a_latency_spike_is_an_anomaly_once() -> None:
    mon = AnomalyMonitor(ewma_alpha=0.1, z_threshold=4.0, min_samples=30)
    for x in latencies(200):
        assert mon.observe("tiny", x, failed=False) == []
    [spike] = mon.observe("tiny", 400.0, failed=False)
    assert spike.signal == "latency" and spike.value == 400.0
    assert 30 < spike.baseline < 55 and spike.z > 4
    # one spike does not move the baseline enough to hide the next normal requests' level
    assert mon.observe("tiny", 41.0, failed=False) == []
    assert mon.observe("big", 400.0, failed=False) == []  # per model


def test_an_error_burst_is_an_anomaly_but_a_stray_error_is_not() -> None:
    mon = AnomalyMonitor(ewma_alpha=0.1, z_threshold=4.0, min_samples=30)
    outcomes = [False] * (ERROR_BATCH * 10)
    outcomes[37] = True  # one error in a batch
    found = [a for failed in outcomes for a in mon.observe("tiny", 40.0, failed)]
    assert found == []
    burst = [i % 3 == 0 for i in range(ERROR_BATCH)]  # a third failing
    found = [a for failed in burst for a in mon.observe("tiny", 40.0, failed)]
    assert [a.signal for a in found] == ["error_rate"]
    assert found[0].value == pytest.approx(7 / ERROR_BATCH)


def test_monitor_thread_raises_a_latency_alert_to_the_webhook(
    workspace: Workspace, receiver: Any
) -> None:
    cfg = MonitorConfig(webhook_url=receiver.url, check_interval_s=3600)
    worker = MonitorWorker(workspace, cfg, models=[("tiny", 1)])
    worker.start()
    try:
        for x in latencies(100):
            worker.observe("tiny", 1, x, failed=False)
        time.sleep(1.5)  # processed in the background: no alert for normal traffic
        assert list_alerts(workspace) == []
        worker.observe("tiny", 1, 900.0, failed=False)  # the injected spike
        [body] = receiver.wait(1)
    finally:
        worker.stop()
    assert not worker.running
    assert body["kind"] == "latency" and body["source"] == "tiny"
    assert body["details"]["value"] == 900.0 and body["details"]["z"] > cfg.z_threshold
    [alert] = list_alerts(workspace, kind="latency")
    assert alert.id == body["id"] and "900 ms" in alert.message

"""Latency and error-rate anomalies: detectors, and alerts raised by the monitor thread."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from genloop.config import MonitorConfig
from genloop.monitor.alerts import list_alerts
from genloop.monitor.anomaly import (
    AUTH_BUCKETS,
    ERROR_BATCH,
    AnomalyMonitor,
    AuthFailureWatch,
    EwmaDetector,
)
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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auth_failure_watch_raises_once_and_resolves_when_it_stops() -> None:
    clock = FakeClock()
    watch = AuthFailureWatch(threshold=10, window_s=60.0, clock=clock)
    for i in range(10):  # at the threshold: nothing
        watch.observe(f"gl_{i:08d}")
        clock.now += 1.0
    assert watch.check() is None
    watch.observe("missing")
    episode = watch.check()
    assert episode is not None and episode.action == "raise" and episode.count == 11
    assert "guessing" in episode.message() and episode.details()["threshold"] == 10
    for _ in range(50):  # the guessing goes on: still one episode
        watch.observe("malformed")
        clock.now += 0.2
        assert watch.check() is None
    assert watch.count() == 61
    clock.now += 50.0  # most of the window has passed: 6 or fewer left is not enough
    assert watch.check() is None and watch.count() > 5
    clock.now += 20.0  # and now none
    end = watch.check()
    assert end is not None and end.action == "resolve" and end.count == 0
    assert watch.check() is None


def test_auth_failure_watch_memory_is_fixed_under_a_flood() -> None:
    clock = FakeClock()
    watch = AuthFailureWatch(threshold=100, window_s=60.0, clock=clock)
    for i in range(20_000):
        watch.observe(f"gl_{i:08d}")
        clock.now += 0.01
    assert len(watch._slices) <= AUTH_BUCKETS + 1
    episode = watch.check()
    assert episode is not None and len(episode.top) == 10
    assert len(watch._labels) <= 1001


def test_monitor_worker_alerts_key_guessing_once(workspace: Workspace) -> None:
    clock = FakeClock()
    cfg = MonitorConfig(auth_failures_per_min=30, auth_failure_window_s=60)
    worker = MonitorWorker(workspace, cfg, models=[], clock=clock)
    for i in range(31):
        worker.observe_auth_failure(f"gl_{i % 3:08d}")
    first = worker.check_auth_failures()
    assert first is not None and worker.check_auth_failures() is None
    (alert,) = [a for a in list_alerts(workspace) if a.kind == "auth_failures"]
    assert alert.id == first and alert.source == "auth" and alert.resolved_at is None
    top = {"gl_00000000": 11, "gl_00000001": 10, "gl_00000002": 10}
    assert alert.details["key_prefixes"] == top
    # /metrics shows it as open (from the worker's last count: a scrape does no IO)
    from genloop.monitor.metrics import ServingMetrics

    metrics = ServingMetrics()
    metrics.watch_alerts(worker.open_alerts)
    assert "genloop:alerts_open{" not in metrics.render()[0].decode()  # not counted yet
    worker.count_open_alerts()
    shown = 'genloop:alerts_open{kind="auth_failures",severity="warning"} 1.0'
    assert shown in metrics.render()[0].decode()
    clock.now += 61
    assert worker.check_auth_failures() is None
    (alert,) = [a for a in list_alerts(workspace) if a.kind == "auth_failures"]
    assert alert.resolved_at is not None
    worker.count_open_alerts()
    assert 'kind="auth_failures"' not in metrics.render()[0].decode()
    off = MonitorWorker(workspace, MonitorConfig(auth_failures_per_min=None), models=[])
    off.observe_auth_failure("missing")
    assert off.auth_watch is None and off.check_auth_failures() is None

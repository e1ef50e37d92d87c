"""The serving process's monitor: anomaly detection, periodic drift checks, bias probes.

A :class:`MonitorWorker` is one background thread that the server starts with its app
and stops at shutdown::

    worker = MonitorWorker(ws, cfg.monitor, models=lambda: [("tiny", 3)], evaluate=evaluate_model)
    worker.start()
    ...                                   # per finished request, from any thread:
    worker.observe("tiny", 3, latency_ms=41.0, failed=False)
    ...
    worker.stop()

- :meth:`observe` only appends to a queue (cheap, thread-safe); the thread feeds the
  queue to the latency and error-rate detectors (:mod:`genloop.monitor.anomaly`) about
  once a second and raises their alerts.
- :meth:`observe_auth_failure` counts a 401 (the server's HTTP layer calls it); each tick
  the key-guessing watch (:class:`~genloop.monitor.anomaly.AuthFailureWatch`, threshold
  ``monitor.auth_failures_per_min``) raises the ``auth_failures`` alert once when the
  401s in the last ``monitor.auth_failure_window_s`` pass it, and resolves it when they
  stop.
- every :data:`ALERTS_REFRESH_S` it counts the open alerts, which ``/metrics`` shows as
  ``genloop:alerts_open{kind,severity}`` (a scrape then never waits for the catalog).
- every ``monitor.check_interval_s`` it runs :meth:`DriftMonitor.check
  <genloop.monitor.drift.DriftMonitor.check>` for each served model.
- every ``monitor.purge_interval_s`` (the first time at start), when a retention period is
  given, it purges requests, feedback and request logs past it
  (:func:`genloop.security.privacy.purge_expired`, recorded in the audit log).
- every ``monitor.bias_interval_s`` (when set) it runs the bias probes
  (:mod:`genloop.evaluate.bias`) on each served causal LM, in a second thread so drift and
  anomaly checks go on meanwhile; each run is stored as an evaluation (suite ``bias``) and
  its headline numbers are appended to the model's monitor series, so they can be plotted
  over time (``genloop monitor report``). The evaluation itself is the caller's
  ``evaluate`` (``genloop.evaluate.run.evaluate_model``, passed in by ``genloop serve``):
  monitoring sits below evaluation and never imports it.

A failing check is logged and retried at the next interval; it never stops the thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from genloop.monitor.anomaly import AnomalyMonitor, AuthFailureWatch, alert_anomaly
from genloop.monitor.drift import DriftMonitor, DriftReport, record_series
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from genloop.config import EvalConfig, MonitorConfig

log = logging.getLogger(__name__)

ServedModel = tuple[str, int | None]  # (name, version)
ModelsFn = Callable[[], Sequence[ServedModel]]
BiasFn = Callable[[Workspace, str], dict[str, float]]  # (ws, "name@version") → metrics
TICK_S = 1.0
ALERTS_REFRESH_S = 15.0  # how often the open alerts are counted for /metrics
MAX_PENDING = 100_000  # observations kept when the thread falls behind (oldest dropped)
BIAS_SERIES = ("bias_ll_gap", "bias_negative_rate_gap")


class Evaluation(Protocol):
    """What the monitor reads of a stored evaluation."""

    @property
    def metrics(self) -> Mapping[str, float | None]: ...


class EvaluateFn(Protocol):
    """Run suites on a model version and store the evaluation
    (``genloop.evaluate.run.evaluate_model``)."""

    def __call__(
        self,
        ws: Workspace,
        ref: str,
        *,
        suites: Sequence[str] | None = None,
        cfg: EvalConfig | None = None,
        device: str = "auto",
    ) -> Evaluation: ...


def run_bias_probes(
    ws: Workspace,
    ref: str,
    evaluate: EvaluateFn,
    cfg: EvalConfig | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """The bias suite on model version ``ref`` (a causal LM; others: ``{}``), run by
    ``evaluate`` and stored as an evaluation; returns its metrics. ``cfg`` sets the probe
    file and generation settings."""
    from genloop.config import EvalConfig
    from genloop.workspace import registry

    info = registry.resolve(ws, ref)
    if info.family != "causal_lm":
        return {}
    record = evaluate(ws, ref, suites=["bias"], cfg=cfg or EvalConfig(), device=device)
    return {k: v for k, v in record.metrics.items() if v is not None}


def _bias_run(evaluate: EvaluateFn, cfg: EvalConfig | None) -> BiasFn:
    return lambda ws, ref: run_bias_probes(ws, ref, evaluate, cfg)


class MonitorWorker:
    """Background monitoring for one serving process (see the module docstring)."""

    def __init__(
        self,
        ws: Workspace,
        cfg: MonitorConfig,
        models: ModelsFn | Sequence[ServedModel],
        *,
        evaluate: EvaluateFn | None = None,
        bias_fn: BiasFn | None = None,
        bias_eval: EvalConfig | None = None,
        retention_days: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``models``: the served (name, version) pairs, or a function returning them (it is
        called at each check, so swaps are followed). ``evaluate`` runs the scheduled bias
        probes, with ``bias_eval`` (the probe file and generation settings); ``bias_fn``
        replaces the whole run; with neither, there are no bias probes.
        ``retention_days``: ``security.retention_days`` (None: never purge)."""
        self.ws = ws
        self.cfg = cfg
        self._models: ModelsFn = models if callable(models) else (lambda: list(models))
        if bias_fn is None and evaluate is not None:
            bias_fn = _bias_run(evaluate, bias_eval)
        self._bias_fn: BiasFn | None = bias_fn
        self._clock = clock
        self.retention_days = retention_days
        self.last_purge: dict[str, int] | None = None
        self.anomalies = AnomalyMonitor(
            ewma_alpha=cfg.ewma_alpha, z_threshold=cfg.z_threshold, min_samples=cfg.min_samples
        )
        self.auth_watch: AuthFailureWatch | None = None
        if cfg.auth_failures_per_min is not None:
            self.auth_watch = AuthFailureWatch(
                threshold=max(1, round(cfg.auth_failures_per_min * cfg.auth_failure_window_s / 60)),
                window_s=cfg.auth_failure_window_s,
                clock=clock,
            )
        self.auth_alert: int | None = None  # the open auth_failures alert
        self._open_alerts: dict[tuple[str, str], int] = {}
        self._next_alerts = 0.0
        self.drift = DriftMonitor()
        self.last_reports: dict[str, DriftReport] = {}
        self.last_bias: dict[str, dict[str, float]] = {}
        self._pending: collections.deque[tuple[str, float | None, bool]] = collections.deque(
            maxlen=MAX_PENDING
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bias_thread: threading.Thread | None = None
        self._next_drift = 0.0
        self._next_bias = 0.0
        self._next_purge = 0.0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        now = self._clock()
        self._next_drift = now + self.cfg.check_interval_s
        if self._bias_scheduled:
            assert self.cfg.bias_interval_s is not None
            self._next_bias = now + self.cfg.bias_interval_s
        elif self.cfg.bias_interval_s is not None:
            log.warning("monitor: bias_interval_s is set but no evaluation was given; no probes")
        self._next_purge = now  # a server restarted daily still purges
        self._thread = threading.Thread(target=self._run, name="genloop-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (after feeding it what is queued); a running bias probe is
        left to finish in the background (it is a daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ feeding

    def observe(
        self, model: str, version: int | None, latency_ms: float | None, failed: bool
    ) -> None:
        """One finished request (any thread; O(1)). ``failed``: a 5xx, or the engine
        finished it with ``error`` or ``timeout``; a client's mistake (4xx) is not."""
        self._pending.append((model, latency_ms, failed))

    def observe_auth_failure(self, key_label: str) -> None:
        """One request refused with 401 (any thread; O(1)); ``key_label``: the presented
        key's public prefix, or ``missing`` / ``malformed``."""
        if self.auth_watch is not None:
            self.auth_watch.observe(key_label)

    # ------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(TICK_S)
            self._guard("anomaly detection", self.process_observations)
            self._guard("auth failure watch", self.check_auth_failures)
            if stopping:
                return
            now = self._clock()
            if now >= self._next_alerts:
                self._next_alerts = now + ALERTS_REFRESH_S
                self._guard("open alert count", self.count_open_alerts)
            if now >= self._next_drift:
                self._next_drift = now + self.cfg.check_interval_s
                self._guard("drift check", self.check_drift)
            if self._bias_scheduled and now >= self._next_bias:
                assert self.cfg.bias_interval_s is not None
                self._next_bias = now + self.cfg.bias_interval_s
                self.start_bias_probes()
            if self._purging and now >= self._next_purge:
                assert self.cfg.purge_interval_s is not None
                self._next_purge = now + self.cfg.purge_interval_s
                self._guard("retention purge", self.purge)

    @property
    def _bias_scheduled(self) -> bool:
        return self.cfg.bias_interval_s is not None and self._bias_fn is not None

    @property
    def _purging(self) -> bool:
        return self.retention_days is not None and self.cfg.purge_interval_s is not None

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:
            log.exception("monitor: %s failed; retrying at the next interval", what)

    def process_observations(self) -> list[int]:
        """Feed the queued observations to the detectors; returns the alert ids raised."""
        raised: list[int] = []
        while self._pending:
            model, latency_ms, failed = self._pending.popleft()
            for anomaly in self.anomalies.observe(model, latency_ms, failed):
                alert = alert_anomaly(self.ws, model, anomaly, webhook_url=self.cfg.webhook_url)
                if alert is not None:
                    raised.append(alert)
        return raised

    def check_auth_failures(self) -> int | None:
        """Raise or resolve the ``auth_failures`` alert as the watch says; the id of an
        alert raised now."""
        from genloop.monitor.alerts import raise_alert, resolve_alert

        if self.auth_watch is None:
            return None
        episode = self.auth_watch.check()
        if episode is None:
            return None
        if episode.action == "resolve":
            if self.auth_alert is not None:
                resolve_alert(self.ws, self.auth_alert)
                log.info("monitor: auth failures back to %d per window", episode.count)
            self.auth_alert = None
            return None
        self.auth_alert = raise_alert(
            self.ws,
            "auth_failures",
            episode.message(),
            episode.details(),
            severity="warning",
            source="auth",
            webhook_url=self.cfg.webhook_url,
        )
        return self.auth_alert

    def count_open_alerts(self) -> dict[tuple[str, str], int]:
        """Count the unresolved alerts by (kind, severity) now (:meth:`open_alerts` then
        returns them)."""
        from genloop.monitor.alerts import open_alert_counts

        self._open_alerts = open_alert_counts(self.ws)
        return self._open_alerts

    def open_alerts(self) -> dict[tuple[str, str], int]:
        """The unresolved alerts by (kind, severity) as last counted (no IO: for scrapes)."""
        return dict(self._open_alerts)

    def purge(self) -> dict[str, int]:
        """Purge what is past the retention period, now; the counts (also logged)."""
        from genloop.security.privacy import purge_expired

        assert self.retention_days is not None
        counts = purge_expired(self.ws, self.retention_days, actor="monitor")
        self.last_purge = counts
        if any(counts.values()):
            log.info("monitor: retention purge (%d days): %s", self.retention_days, counts)
        return counts

    def check_drift(self) -> list[DriftReport]:
        """One drift check of every served model, now."""
        reports = []
        for name in sorted({name for name, _ in self._models()}):
            report = self.drift.check(self.ws, self.cfg, name)
            self.last_reports[name] = report
            reports.append(report)
        return reports

    def start_bias_probes(self) -> threading.Thread | None:
        """Run the bias probes on every served model in a background thread (unless a
        previous run is still going); returns the thread."""
        if self._bias_thread is not None and self._bias_thread.is_alive():
            log.info("monitor: the previous bias probe run is still going; skipped")
            return None
        self._bias_thread = threading.Thread(
            target=self._guard,
            args=("bias probes", self.run_bias_probes),
            name="genloop-monitor-bias",
            daemon=True,
        )
        self._bias_thread.start()
        return self._bias_thread

    def run_bias_probes(self) -> dict[str, dict[str, float]]:
        """The bias probes on every served model, now (in this thread)."""
        done: dict[str, dict[str, float]] = {}
        if self._bias_fn is None:
            return done
        for name, version in sorted(set(self._models()), key=lambda m: (m[0], m[1] or 0)):
            ref = f"{name}@{version}" if version is not None else name
            metrics = self._bias_fn(self.ws, ref)
            if not metrics:
                continue
            record_series(self.ws, name, {k: metrics[k] for k in BIAS_SERIES if k in metrics})
            self.last_bias[ref] = metrics
            done[ref] = metrics
        return done

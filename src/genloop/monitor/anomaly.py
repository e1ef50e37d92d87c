"""Latency and error-rate anomalies by EWMA and z-score.

An :class:`EwmaDetector` keeps an exponentially weighted mean of a signal
(``mean ← mean + α·(x − mean)``) and a slower one of its squared deviations, and scores
each new value against the state *before* it: ``z = (x − mean) / std``. Once ``min_samples``
values were seen, ``z > z_threshold`` is an anomaly. An anomalous value enters the state
clipped to ``mean + z_threshold·std``, so one spike does not inflate the baseline, while a
lasting shift is learned within a few dozen values (and alerts until then, one per
cool-down).

Two signals per served model:

- **latency**: ``log(latency_ms)`` per request; in log space a spike is a ratio, so
  one threshold suits a 20 ms and a 2 s model alike. Only high values count.
- **error rate**: the share of failed requests (HTTP 5xx, or the engine finishing with
  ``error``/``timeout``) in consecutive batches of ``ERROR_BATCH`` requests, scored with
  a binomial standard deviation floored at a 1 % rate (a model that never failed is not
  alarmed by one error in a batch, but is by several).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from genloop.workspace.workspace import Workspace

ERROR_BATCH = 20  # requests per error-rate observation
ERROR_RATE_FLOOR = 0.01  # the smallest baseline rate used for the standard deviation
_EPS = 1e-12


@dataclass
class Anomaly:
    signal: str  # "latency" | "error_rate"
    value: float  # the observed value (ms for latency, a rate for errors)
    baseline: float  # what the EWMA expected, same unit
    z: float
    samples: int

    def details(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "value": round(self.value, 6),
            "baseline": round(self.baseline, 6),
            "z": round(self.z, 3),
            "samples": self.samples,
        }


class EwmaDetector:
    """A stateful z-score detector over an EWMA mean and variance (not thread-safe).

    The mean follows the signal with ``alpha``; the variance (of the deviations from the
    mean) with ``var_alpha`` (default ``alpha / 10``), slower, because a variance
    estimated from a handful of values is often far too small and would make ordinary
    noise look anomalous. The variance is bias-corrected as in Adam (divided by
    ``1 − (1 − var_alpha)^k`` after ``k`` updates), so it is right from the start.
    """

    def __init__(
        self,
        *,
        alpha: float,
        z_threshold: float,
        min_samples: int,
        std_floor: float = 0.0,
        var_alpha: float | None = None,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], not {alpha}")
        self.alpha = alpha
        self.var_alpha = var_alpha if var_alpha is not None else alpha / 10
        self.z_threshold = z_threshold
        self.min_samples = min_samples
        self.std_floor = std_floor
        self.mean = 0.0
        self._sq = 0.0  # EWMA of squared deviations, not yet bias-corrected
        self._weight = 0.0  # 1 − (1 − var_alpha)^k
        self.n = 0

    @property
    def var(self) -> float:
        return self._sq / self._weight if self._weight > 0 else 0.0

    @property
    def std(self) -> float:
        return max(math.sqrt(self.var), self.std_floor)

    def score(self, x: float) -> float:
        """The z-score of ``x`` against the current state (0 before two values)."""
        if self.n == 0 or self.std <= 0:
            return 0.0
        return (x - self.mean) / self.std

    def update(self, x: float) -> float | None:
        """Add ``x``; returns its z-score when it is an anomaly, else None."""
        z = self.score(x)
        anomalous = self.n >= self.min_samples and z > self.z_threshold
        if anomalous:
            x = self.mean + self.z_threshold * self.std  # winsorized: one spike stays one
        if self.n == 0:
            self.mean = x
        else:
            diff = x - self.mean
            a = self.var_alpha
            self._sq = (1 - a) * self._sq + a * diff * diff
            self._weight = (1 - a) * self._weight + a
            self.mean += self.alpha * diff
        self.n += 1
        return z if anomalous else None


@dataclass
class _ModelState:
    latency: EwmaDetector
    errors: EwmaDetector
    batch: list[bool] = field(default_factory=list)
    requests: int = 0


class AnomalyMonitor:
    """Latency and error-rate detectors per model; feed it every finished request.

    Not thread-safe: one owner (the :class:`~genloop.monitor.scheduler.MonitorWorker`
    thread) calls :meth:`observe`.
    """

    def __init__(self, *, ewma_alpha: float, z_threshold: float, min_samples: int) -> None:
        self.ewma_alpha = ewma_alpha
        self.z_threshold = z_threshold
        self.min_samples = min_samples
        self._models: dict[str, _ModelState] = {}

    def _state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            state = _ModelState(
                latency=EwmaDetector(
                    alpha=self.ewma_alpha,
                    z_threshold=self.z_threshold,
                    min_samples=self.min_samples,
                    std_floor=0.05,  # ±5 % jitter in log space is never an anomaly
                ),
                errors=EwmaDetector(
                    alpha=self.ewma_alpha,
                    z_threshold=self.z_threshold,
                    # min_samples counts requests; this detector sees one value per batch
                    min_samples=max(1, math.ceil(self.min_samples / ERROR_BATCH)),
                ),
            )
            self._models[model] = state
        return state

    def observe(self, model: str, latency_ms: float | None, failed: bool) -> list[Anomaly]:
        """Add one finished request; returns the anomalies it revealed (usually none)."""
        state = self._state(model)
        state.requests += 1
        found: list[Anomaly] = []
        if latency_ms is not None and latency_ms > 0 and not failed:
            x = math.log(latency_ms)
            det = state.latency
            expected = math.exp(det.mean)
            z = det.update(x)
            if z is not None:
                found.append(Anomaly("latency", latency_ms, expected, z, det.n))
        state.batch.append(failed)
        if len(state.batch) >= ERROR_BATCH:
            rate = sum(state.batch) / len(state.batch)
            state.batch.clear()
            det = state.errors
            base = min(max(det.mean, ERROR_RATE_FLOOR), 1 - ERROR_RATE_FLOOR)
            det.std_floor = math.sqrt(base * (1 - base) / ERROR_BATCH)
            expected = det.mean
            z = det.update(rate)
            if z is not None and state.requests >= self.min_samples:
                found.append(Anomaly("error_rate", rate, expected, z, state.requests))
        return found


def alert_anomaly(
    ws: Workspace,
    model: str,
    anomaly: Anomaly,
    *,
    webhook_url: str | None = None,
    cooldown_s: float = 900.0,
) -> int | None:
    """Raise the alert for ``anomaly`` (kind ``latency`` or ``error_rate``)."""
    from genloop.monitor.alerts import raise_alert

    if anomaly.signal == "latency":
        message = (
            f"{model}: latency {anomaly.value:.0f} ms, expected about "
            f"{anomaly.baseline:.0f} ms (z = {anomaly.z:.1f})"
        )
    else:
        message = (
            f"{model}: {anomaly.value:.0%} of the last {ERROR_BATCH} requests failed, "
            f"expected about {anomaly.baseline:.1%} (z = {anomaly.z:.1f})"
        )
    return raise_alert(
        ws,
        anomaly.signal,
        message,
        anomaly.details(),
        severity="warning",
        source=model,
        webhook_url=webhook_url,
        cooldown_s=cooldown_s,
    )

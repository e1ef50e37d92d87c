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

And one for the whole server: **auth failures** (:class:`AuthFailureWatch`), the 401s in a
sliding window. Key guessing is not a shift from a baseline but a volume no honest client
produces, so it is a plain threshold (``monitor.auth_failures_per_min``): above it, one
``auth_failures`` alert naming the most frequent key prefixes; resolved once the window
holds at most half the threshold again.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

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


AUTH_BUCKETS = 60  # a window is counted in this many slices (memory: fixed, whatever the rate)
MAX_AUTH_LABELS = 1000  # distinct key prefixes remembered per episode (the rest: "other")


@dataclass
class AuthEpisode:
    """What :meth:`AuthFailureWatch.check` found: the alert to raise or to resolve."""

    action: Literal["raise", "resolve"]
    count: int  # 401s in the window
    window_s: float
    threshold: int
    top: dict[str, int] = field(default_factory=dict)  # key label → 401s, most first

    def message(self) -> str:
        top = ", ".join(f"{k} ({v})" for k, v in self.top.items())
        return (
            f"{self.count} requests refused with 401 in the last {self.window_s:g} s "
            f"(threshold {self.threshold}): someone may be guessing API keys"
            + (f"; key prefixes: {top}" if top else "")
        )

    def details(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "window_s": self.window_s,
            "threshold": self.threshold,
            "key_prefixes": self.top,
        }


class AuthFailureWatch:
    """401s in a sliding window of ``window_s`` seconds, against ``threshold``.

    :meth:`observe` (any thread, O(1)) adds one failure to the current slice of the window;
    :meth:`check` (the monitor thread) drops the slices that left the window and says when
    an episode starts (more than ``threshold`` in the window) and when it ends (at most
    half the threshold: a rate hovering at the threshold does not flap).
    """

    def __init__(self, *, threshold: int, window_s: float, clock: Callable[[], float]) -> None:
        if threshold < 1 or window_s <= 0:
            raise ValueError("the auth failure watch needs a threshold ≥ 1 and a window > 0")
        self.threshold = threshold
        self.window_s = window_s
        self._slice_s = window_s / AUTH_BUCKETS
        self._clock = clock
        self._slices: collections.deque[list[int]] = collections.deque()  # [index, count]
        self._labels: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.active = False

    def observe(self, key_label: str) -> None:
        index = int(self._clock() / self._slice_s)
        with self._lock:
            if self._slices and self._slices[-1][0] == index:
                self._slices[-1][1] += 1
            else:
                self._slices.append([index, 1])
                while self._slices[0][0] <= index - AUTH_BUCKETS:  # out of the window
                    self._slices.popleft()
            if key_label in self._labels or len(self._labels) < MAX_AUTH_LABELS:
                self._labels[key_label] += 1
            else:
                self._labels["other"] += 1

    def count(self) -> int:
        """401s in the window ending now."""
        oldest = int((self._clock() - self.window_s) / self._slice_s)
        with self._lock:
            while self._slices and self._slices[0][0] <= oldest:
                self._slices.popleft()
            return sum(n for _, n in self._slices)

    def check(self) -> AuthEpisode | None:
        """The start or the end of an episode, when one of them happened since last time."""
        count = self.count()
        if not self.active and count > self.threshold:
            self.active = True
            with self._lock:
                top = dict(self._labels.most_common(10))
            return AuthEpisode("raise", count, self.window_s, self.threshold, top)
        if self.active and count <= self.threshold // 2:
            self.active = False
            with self._lock:
                self._labels.clear()
            return AuthEpisode("resolve", count, self.window_s, self.threshold)
        if not self.active and count == 0:
            with self._lock:  # nothing in the window: forget the prefixes seen
                self._labels.clear()
        return None

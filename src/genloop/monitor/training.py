"""Training telemetry alerts: NaN/infinite metrics and loss spikes.

:class:`~genloop.train.tracking.RunTracker` already stores loss, gradient norm, throughput
and memory per step in the catalog; it hands every step's values to a
:class:`TrainingWatch`, which raises

- ``nan`` (critical) when a metric is NaN or infinite (the loop then stops with
  ``TrainingDiverged``, which raises the same alert; one alert per run);
- ``loss_spike`` (warning) when the loss jumps far above its recent level: an EWMA
  z-score above ``z_threshold`` *and* more than ``min_ratio`` times the EWMA, after
  ``min_steps`` steps (the early, steep part of the curve is not a spike).

The webhook, when any, is ``monitor.webhook_url`` of the run's stored config. Runs of kind
``tune`` (trials of a study, where a diverging learning rate is an expected outcome) get
``info`` alerts and no webhook.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from genloop.monitor.anomaly import EwmaDetector
from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

SPIKE_ALPHA = 0.1
SPIKE_Z = 6.0
SPIKE_MIN_RATIO = 1.5
SPIKE_MIN_STEPS = 20
RUN_COOLDOWN_S = 3600.0


class TrainingWatch:
    """Per-run detectors; cheap per step (alerts touch the database only when raised)."""

    def __init__(
        self,
        ws: Workspace,
        run_id: str,
        *,
        z_threshold: float = SPIKE_Z,
        min_ratio: float = SPIKE_MIN_RATIO,
        min_steps: int = SPIKE_MIN_STEPS,
        alpha: float = SPIKE_ALPHA,
    ) -> None:
        self.ws = ws
        self.run_id = run_id
        self.min_ratio = min_ratio
        self.loss = EwmaDetector(alpha=alpha, z_threshold=z_threshold, min_samples=min_steps)
        self._nan_raised = False

    def observe(self, step: int, values: dict[str, float]) -> list[int]:
        """Check one step's values; returns the ids of the alerts raised."""
        raised: list[int] = []
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            key, value = next(iter(bad.items()))
            alert = self.nan(f"the {key} became {value} at step {step}", step=step, keys=bad)
            if alert is not None:
                raised.append(alert)
        loss = values.get("loss")
        if loss is not None and math.isfinite(loss):
            expected = self.loss.mean
            z = self.loss.update(loss)
            if z is not None and loss > self.min_ratio * expected:
                alert = self._raise(
                    "loss_spike",
                    f"run {self.run_id}: the loss jumped to {loss:.4g} at step {step} "
                    f"(recent level {expected:.4g}, z = {z:.1f})",
                    {"step": step, "loss": loss, "expected": expected, "z": round(z, 2)},
                    severity="warning",
                )
                if alert is not None:
                    raised.append(alert)
        return raised

    def nan(self, message: str, *, step: int | None = None, keys: Any = None) -> int | None:
        """A ``nan`` alert for this run (at most one per run)."""
        if self._nan_raised:
            return None
        self._nan_raised = True
        details: dict[str, Any] = {"step": step}
        if keys:
            details["values"] = {k: str(v) for k, v in dict(keys).items()}
        # the run fails with this message as its error: the alert need not print it again
        return self._raise(
            "nan", f"run {self.run_id}: {message}", details, severity="critical", quiet=True
        )

    def _raise(
        self,
        kind: str,
        message: str,
        details: dict[str, Any],
        severity: Any,
        *,
        quiet: bool = False,
    ) -> int | None:
        from genloop.monitor.alerts import raise_alert

        try:
            run_kind, webhook_url = _run_info(self.ws, self.run_id)
            if run_kind in ("tune", "trial"):  # a diverging tuning trial is no incident
                severity, webhook_url = "info", None
            return raise_alert(
                self.ws,
                kind,
                message,
                details,
                severity=severity,
                source=self.run_id,
                webhook_url=webhook_url,
                cooldown_s=RUN_COOLDOWN_S,
                quiet=quiet,
            )
        except Exception as exc:  # an alert must never stop training
            log.warning("could not record the %s alert of run %s: %s", kind, self.run_id, exc)
            return None


def _run_info(ws: Workspace, run_id: str) -> tuple[str | None, str | None]:
    """The run's kind and the ``monitor.webhook_url`` of its stored config."""
    from genloop.workspace.tables import Run

    with ws.catalog.session() as s:
        run = s.get(Run, run_id)
        kind, config = (run.kind, run.config) if run is not None else (None, None)
    url = ((config or {}).get("monitor") or {}).get("webhook_url")
    return kind, url if isinstance(url, str) and url else None

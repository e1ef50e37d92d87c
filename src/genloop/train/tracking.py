"""Runs and their metric series in the catalog (and TensorBoard or MLflow when asked).

Points are buffered and written in one transaction every few seconds, so logging costs
nothing measurable per step.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from genloop.workspace import runs
from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)


class RunTracker:
    """One run's metric series (:mod:`genloop.workspace.runs`), its sinks and its alerts."""

    def __init__(
        self, ws: Workspace, run_id: str, sinks: list[str] | None = None, flush_every_s: float = 5.0
    ) -> None:
        self.ws = ws
        self.run_id = run_id
        self._buffer: list[runs.Point] = []
        self._last_flush = time.monotonic()
        self._flush_every_s = flush_every_s
        self._sinks = [_open_sink(s, ws, run_id) for s in sinks or []]
        from genloop.monitor.training import TrainingWatch

        self.watch = TrainingWatch(ws, run_id)  # NaN and loss-spike alerts

    @classmethod
    def start(
        cls,
        ws: Workspace,
        *,
        name: str,
        kind: str,
        config: dict[str, Any],
        dataset_version_id: int | None = None,
        parent_model_version_id: int | None = None,
        sinks: list[str] | None = None,
        parent_run_id: str | None = None,
    ) -> RunTracker:
        run_id = runs.start_run(
            ws,
            name=name,
            kind=kind,
            config=config,
            dataset_version_id=dataset_version_id,
            parent_model_version_id=parent_model_version_id,
            parent_run_id=parent_run_id,
            git_commit=runs.git_commit(),
        )
        return cls(ws, run_id, sinks)

    def log(self, step: int, **values: float) -> None:
        finite = {k: float(v) for k, v in values.items() if math.isfinite(v)}
        for key in values.keys() - finite.keys():  # SQLite would store NULL, which is refused
            log.warning(
                "run %s: %s is %s at step %d; not recorded", self.run_id, key, values[key], step
            )
        self.watch.observe(step, values)
        self._buffer.extend((key, step, value) for key, value in finite.items())
        for sink in self._sinks:
            sink.log(step, finite)
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()

    def diverged(self, message: str) -> None:
        """Training stopped on a NaN/infinite value: record the ``nan`` alert."""
        self.watch.nan(message)

    def flush(self) -> None:
        runs.log_metrics(self.ws, self.run_id, self._buffer)
        self._buffer = []
        self._last_flush = time.monotonic()

    def reopen(self, *, after_step: int) -> None:
        """Mark a resumed run running again and drop the points it logged after
        ``after_step``, its checkpoint: those steps are trained and logged again."""
        self._buffer = [p for p in self._buffer if p[1] <= after_step]
        self.flush()
        runs.reopen(self.ws, self.run_id, after_step=after_step)

    def set_status(
        self, status: str, *, summary: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        self.flush()
        runs.set_status(self.ws, self.run_id, status, summary=summary, error=error)
        for sink in self._sinks:
            sink.close()


class _Sink:
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def _open_sink(kind: str, ws: Workspace, run_id: str) -> Any:
    from genloop.errors import GenloopError

    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GenloopError(
                "train.log_to has tensorboard, but the tensorboard package is not "
                "installed (pip install tensorboard)"
            ) from None

        class TB(_Sink):
            def __init__(self) -> None:
                self.w = SummaryWriter(str(ws.root / "tensorboard" / run_id))

            def log(self, step: int, values: dict[str, float]) -> None:
                for k, v in values.items():
                    self.w.add_scalar(k, v, step)

            def close(self) -> None:
                self.w.close()

        return TB()
    if kind == "mlflow":
        try:
            import mlflow
        except ImportError:
            raise GenloopError(
                "train.log_to has mlflow, but the mlflow package is not "
                "installed (pip install mlflow)"
            ) from None

        class MLflow(_Sink):
            def __init__(self) -> None:
                self.run = mlflow.start_run(run_name=run_id)

            def log(self, step: int, values: dict[str, float]) -> None:
                mlflow.log_metrics(values, step=step)

            def close(self) -> None:
                mlflow.end_run()

        return MLflow()
    raise GenloopError(f"unknown metric sink {kind!r} (known: tensorboard, mlflow)")

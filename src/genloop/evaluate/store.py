"""Stored evaluations: an ``evaluations`` row per call plus an artifact ``evaluations/<id>``.

The row holds what the registry, comparison and the gate read (the model and dataset
versions, the suites, the flat headline metrics, the settings that reproduce them, the
report's key); the artifact holds what is too big for the catalog:

    evaluations/<id>/results.json   every suite's metrics, per-sample values, examples, settings
    evaluations/<id>/report.md      the report, as markdown
    evaluations/<id>/report.html    the same with plots, self-contained (PNG data URIs)

Saving also merges the headline metrics into the model version's ``metrics``, so
``genloop models list`` and ``models diff`` show them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from genloop.errors import GenloopError, NotFoundError
from genloop.evaluate.record import EvaluationRecord
from genloop.evaluate.report import write_report
from genloop.evaluate.results import SuiteResult, figure_file
from genloop.workspace.tables import Dataset, DatasetVersion, Evaluation, ModelVersion
from genloop.workspace.workspace import Workspace

RESULTS_FILE = "results.json"


def artifact_key(evaluation_id: int) -> str:
    return f"evaluations/{evaluation_id}"


def merge_metrics(results: Sequence[SuiteResult]) -> dict[str, float | None]:
    """The suites' headline metrics as one flat dict.

    A name two suites both report is kept for each as ``suite/name`` rather than one
    silently hiding the other. Values that are not finite numbers become ``None`` (JSON
    has no NaN; the gate treats ``None`` as a missing metric and says so).
    """
    counts: dict[str, int] = {}
    for r in results:
        for name in r.metrics:
            counts[name] = counts.get(name, 0) + 1
    merged: dict[str, float | None] = {}
    for r in results:
        for name, value in r.metrics.items():
            key = name if counts[name] == 1 else f"{r.suite}/{name}"
            merged[key] = _finite(value)
    return merged


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` and paths as strings (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    return str(obj)


def save_evaluation(
    ws: Workspace,
    model_version_id: int,
    dataset_version_id: int | None,
    results: Sequence[SuiteResult],
    *,
    settings: dict[str, Any] | None = None,
    run_id: str | None = None,
    update_model_metrics: bool = True,
) -> EvaluationRecord:
    """Store one evaluation: its row, its artifact (results + reports), and the model
    version's merged ``metrics``.

    The row is inserted first (its id names the artifact); if writing the artifact fails
    the row is removed again, so a stored evaluation always has its report.
    """
    if not results:
        raise GenloopError("an evaluation needs at least one suite result")
    suites = [r.suite for r in results]
    metrics = merge_metrics(results)
    settings = _jsonable(settings or {})
    with ws.catalog.session() as s:
        if s.get(ModelVersion, model_version_id) is None:
            raise NotFoundError(f"no model version with id {model_version_id}")
        if dataset_version_id is not None and s.get(DatasetVersion, dataset_version_id) is None:
            raise NotFoundError(f"no dataset version with id {dataset_version_id}")
        row = Evaluation(
            model_version_id=model_version_id,
            dataset_version_id=dataset_version_id,
            run_id=run_id,
            suite="+".join(suites),
            metrics=metrics,
            settings=settings,
        )
        s.add(row)
        s.flush()
        evaluation_id = row.id
    key = artifact_key(evaluation_id)
    try:
        record = get_evaluation(ws, evaluation_id)
        payload = _jsonable(
            {
                "evaluation": record.to_dict() | {"report": key},
                "suites": [r.to_dict() for r in results],
            }
        )
        with ws.store.writer(key, overwrite=True) as staging:
            text = json.dumps(payload, indent=1, allow_nan=False, ensure_ascii=False)
            (staging / RESULTS_FILE).write_text(text + "\n", encoding="utf-8")
            for r in results:
                for i, png in enumerate(r.figures.values()):
                    path = staging / figure_file(r.suite, i)
                    path.parent.mkdir(exist_ok=True)
                    path.write_bytes(png)
            write_report(staging, record, results)
        with ws.catalog.session(write_lock=True) as s:
            stored = s.get(Evaluation, evaluation_id)
            assert stored is not None
            stored.report = key
            model = s.get(ModelVersion, model_version_id)
            if update_model_metrics and model is not None:
                headline = {k: v for k, v in metrics.items() if v is not None}
                model.metrics = {**(model.metrics or {}), **headline}  # a new dict: tracked
    except BaseException:
        ws.store.delete(key)
        with ws.catalog.session() as s:
            stale = s.get(Evaluation, evaluation_id)
            if stale is not None:
                s.delete(stale)
        raise
    return get_evaluation(ws, evaluation_id)


def _record(s: Any, row: Evaluation) -> EvaluationRecord:
    model = s.get(ModelVersion, row.model_version_id)
    dataset = None
    if row.dataset_version_id is not None:
        dv = s.get(DatasetVersion, row.dataset_version_id)
        if dv is not None:
            name = s.scalar(select(Dataset.name).where(Dataset.id == dv.dataset_id))
            dataset = f"{name}@{dv.version}"
    return EvaluationRecord(
        id=row.id,
        model_version_id=row.model_version_id,
        model=f"{model.name}@{model.version}" if model is not None else "?",
        dataset_version_id=row.dataset_version_id,
        dataset=dataset,
        suite=row.suite,
        metrics=dict(row.metrics or {}),
        settings=dict(row.settings or {}),
        report=row.report,
        created_at=row.created_at,
        run_id=row.run_id,
        suites=row.suite.split("+") if row.suite else [],
    )


def get_evaluation(ws: Workspace, evaluation_id: int) -> EvaluationRecord:
    with ws.catalog.session() as s:
        row = s.get(Evaluation, evaluation_id)
        if row is None:
            raise NotFoundError(f"no evaluation with id {evaluation_id}")
        return _record(s, row)


def list_evaluations(
    ws: Workspace,
    model_version_id: int | None = None,
    *,
    dataset_version_id: int | None = None,
    any_dataset: bool = True,
) -> list[EvaluationRecord]:
    """Evaluations, newest first; of one model version and/or on one dataset version.

    With ``any_dataset=False`` only those on exactly ``dataset_version_id`` (``None``
    meaning evaluations that used no dataset).
    """
    with ws.catalog.session() as s:
        query = select(Evaluation).order_by(Evaluation.id.desc())
        if model_version_id is not None:
            query = query.where(Evaluation.model_version_id == model_version_id)
        if not any_dataset or dataset_version_id is not None:
            if dataset_version_id is None:
                query = query.where(Evaluation.dataset_version_id.is_(None))
            else:
                query = query.where(Evaluation.dataset_version_id == dataset_version_id)
        # only complete evaluations (an interrupted save leaves a row without a report)
        query = query.where(Evaluation.report.is_not(None))
        return [_record(s, row) for row in s.scalars(query)]


def load_results(ws: Workspace, record: EvaluationRecord) -> list[SuiteResult]:
    """The suites' full results (per-sample values included), read from the verified
    artifact."""
    if record.report is None:
        raise NotFoundError(f"evaluation {record.id} has no stored results")
    path = ws.store.open_verified(record.report) / RESULTS_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        SuiteResult(
            suite=d["suite"],
            metrics=d.get("metrics", {}),
            per_sample=d.get("per_sample", {}),
            samples=d.get("samples", []),
            settings=d.get("settings", {}),
        )
        for d in data["suites"]
    ]


# ---------------------------------------------------------------------------------------
# the metrics comparison and the gate read: newest value of each, on one dataset version
# ---------------------------------------------------------------------------------------


@dataclass
class MetricView:
    """A model version's newest value of each metric among its evaluations on one dataset
    version (``genloop eval m --suite code`` after ``--suite perplexity`` gives both)."""

    model: str
    model_version_id: int
    dataset_version_id: int | None
    dataset: str | None
    metrics: dict[str, float | None]
    sources: dict[str, EvaluationRecord]  # the evaluation each metric came from

    @property
    def evaluation_ids(self) -> list[int]:
        return sorted({r.id for r in self.sources.values()}, reverse=True)


def latest_metrics(
    ws: Workspace, model_version_id: int, dataset_version_id: int | None
) -> MetricView | None:
    """The newest value of each metric of a model version on a dataset version (``None``
    when it has no evaluation there)."""
    records = list_evaluations(
        ws, model_version_id, dataset_version_id=dataset_version_id, any_dataset=False
    )
    if not records:
        return None
    metrics: dict[str, float | None] = {}
    sources: dict[str, EvaluationRecord] = {}
    for record in records:  # newest first: the first value seen of a metric wins
        for name, value in record.metrics.items():
            if name not in metrics:
                metrics[name] = value
                sources[name] = record
    newest = records[0]
    return MetricView(
        model=newest.model,
        model_version_id=model_version_id,
        dataset_version_id=dataset_version_id,
        dataset=newest.dataset,
        metrics=metrics,
        sources=sources,
    )


def evaluated_datasets(ws: Workspace, model_version_id: int) -> list[int | None]:
    """The dataset versions a model version was evaluated on, most recently used first
    (``None``: evaluations that used no dataset)."""
    seen: list[int | None] = []
    for record in list_evaluations(ws, model_version_id):
        if record.dataset_version_id not in seen:
            seen.append(record.dataset_version_id)
    return seen


def common_dataset(ws: Workspace, first_id: int, second_id: int) -> tuple[bool, int | None]:
    """The dataset version both model versions were evaluated on, preferring the one the
    first used most recently: ``(found, dataset_version_id)``."""
    second = set(evaluated_datasets(ws, second_id))
    for dataset_version_id in evaluated_datasets(ws, first_id):
        if dataset_version_id in second:
            return True, dataset_version_id
    return False, None

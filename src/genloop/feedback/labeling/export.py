"""Labeled items → a dataset version that ``genloop train`` reads.

    task kind       dataset kind            row
    classification  classification          {"text", "label"}
    spans           token_classification    {"tokens", "labels"}
    caption         sft                     {"prompt", "response"}  (the edited text)
    preference      dpo                     {"prompt", "chosen", "rejected"}

Each item's labels are settled by majority (``agreement.settle``); an item whose
annotators tie is left out, as is one with fewer than ``min_labels`` labels, and a
preference whose two candidates are the same text (it teaches nothing). Each is counted.
Rows keep the item's ``id`` as ``"<task>:<position>"`` (and the source row's id as
``source_id``). The version's lineage names the task, its source, the annotators, the
counts, the agreement (Cohen's kappa per pair) and the rule.

The rows are written with the tokenizer of the model they will train
(:func:`genloop.data.pairs.write_pairs_dataset`): the one named, else the tokenizer stored
with the task's source dataset, else the pre-label model's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from genloop.feedback.labeling.agreement import agreement, settle
from genloop.feedback.labeling.tasks import EXPORT_KINDS, LabelError, task_row
from genloop.workspace import audit
from genloop.workspace.datasets import DatasetVersionInfo
from genloop.workspace.tables import Label, LabelItem
from genloop.workspace.workspace import Workspace

RULE = "majority of annotators, one vote each (spans: per token); ties left out"
SMALL_SET = 20  # fewer rows than this: no validation split (it could take them all)


@dataclass
class ExportResult:
    dataset: DatasetVersionInfo
    kind: str
    rows: int
    counts: dict[str, int]
    lineage: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.ref,
            "dataset_version_id": self.dataset.id,
            "kind": self.kind,
            "rows": self.rows,
            "counts": self.counts,
            "agreement": self.lineage["agreement"],
        }


def _row(
    kind: str, task: str, position: int, payload: dict[str, Any], value: dict[str, Any]
) -> dict[str, Any] | None:
    """The training row of one settled item (None: a preference between equal texts)."""
    row: dict[str, Any]
    if kind == "classification":
        row = {"text": payload["text"], "label": value["label"]}
    elif kind == "spans":
        row = {"tokens": payload["tokens"], "labels": value["labels"]}
    elif kind == "caption":
        prompt = payload.get("prompt", "")
        row = {"prompt": prompt, "response": value["text"]}
        fmt = payload.get("format") or ("chat" if prompt.strip() else "completion")
        if fmt == "completion":
            row["format"] = "completion"
    else:
        chosen = payload[value["choice"]]
        rejected = payload["b" if value["choice"] == "a" else "a"]
        if chosen == rejected:
            return None
        row = {"prompt": payload["prompt"], "chosen": chosen, "rejected": rejected}
        if payload.get("format") == "completion":
            row["format"] = "completion"
    row["id"] = f"{task}:{position}"
    if "id" in payload:
        row["source_id"] = payload["id"]
    return row


def _tokenizer_dir(ws: Workspace, source: dict[str, Any], tokenizer: str | Path | None) -> Path:
    from genloop.workspace import registry
    from genloop.workspace.datasets import get_dataset_version

    if tokenizer is not None:
        local = Path(tokenizer).expanduser()
        if local.is_dir():
            return local
        return registry.artifact_path(ws, str(tokenizer))
    version_id = source.get("dataset_version_id")
    if isinstance(version_id, int):
        info = get_dataset_version(ws, version_id)
        directory = ws.store.open_verified(info.artifact) / "tokenizer"
        if (directory / "tokenizer.json").is_file():
            return directory
    if isinstance(source.get("model"), str):
        return registry.artifact_path(ws, source["model"])
    raise LabelError(
        "the rows need the tokenizer of the model they will train, and this task has none "
        "(no source dataset with a tokenizer, no pre-label model): give --tokenizer MODEL "
        "(a model ref or a tokenizer directory)"
    )


def export_task(
    ws: Workspace,
    task: str,
    *,
    name: str | None = None,
    tokenizer: str | Path | None = None,
    min_labels: int = 1,
    val_fraction: float | None = None,
    seed: int = 0,
    actor: str = "cli",
) -> ExportResult:
    """Publish the settled labels of ``task`` as the next version of dataset ``name``
    (default ``<task>-labels``), or find the identical one.

    ``val_fraction``: default 0.1, none below 20 rows. Nothing to export (no item settled)
    is a LabelError naming what was left out.
    """
    from genloop.data.pairs import write_pairs_dataset

    if min_labels < 1:
        raise LabelError(f"min_labels must be at least 1, not {min_labels}")
    with ws.catalog.session() as s:
        t = task_row(s, task)
        kind, source, task_name, task_id = t.kind, dict(t.source or {}), t.name, t.id
        prelabel_source = t.prelabel_source
        items = s.execute(
            select(LabelItem.id, LabelItem.position, LabelItem.payload)
            .where(LabelItem.task_id == t.id)
            .order_by(LabelItem.position)
        ).all()
        labels = s.execute(
            select(Label.item_id, Label.annotator, Label.value, Label.prelabel_accepted)
            .where(Label.task_id == t.id)
            .order_by(Label.id)
        ).all()
    values: dict[int, list[dict[str, Any]]] = defaultdict(list)
    by_annotator: dict[str, dict[int, Any]] = defaultdict(dict)
    for lb in labels:
        values[lb.item_id].append(lb.value)
        by_annotator[lb.annotator][lb.item_id] = lb.value
    counts = dict.fromkeys(("exported", "unlabeled", "too_few_labels", "ties", "identical"), 0)
    rows = []
    for item_id, position, payload in items:
        given = values.get(item_id, [])
        if not given:
            counts["unlabeled"] += 1
            continue
        if len(given) < min_labels:
            counts["too_few_labels"] += 1
            continue
        settled = settle(kind, given)
        if settled is None:
            counts["ties"] += 1
            continue
        row = _row(kind, task_name, position, payload, settled)
        if row is None:
            counts["identical"] += 1
            continue
        rows.append(row)
    counts["exported"] = len(rows)
    if not rows:
        left = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no items"
        raise LabelError(f"nothing to export from task {task_name}: no item is settled ({left})")
    reviewed = [lb.prelabel_accepted for lb in labels if lb.prelabel_accepted is not None]
    lineage = {
        "source": "labeling",
        "task": task_name,
        "task_id": task_id,
        "task_kind": kind,
        "task_source": source,
        "annotators": sorted(by_annotator),
        "labels": len(labels),
        "items": len(items),
        "counts": counts,
        "rule": RULE,
        "min_labels": min_labels,
        "agreement": agreement(kind, by_annotator),
        "prelabels": {
            "source": prelabel_source,
            "reviewed": len(reviewed),
            "accuracy": sum(reviewed) / len(reviewed) if reviewed else None,
        },
    }
    if val_fraction is None:
        val_fraction = 0.1 if len(rows) >= SMALL_SET else 0.0
    dataset = write_pairs_dataset(
        ws,
        name or f"{task_name}-labels",
        EXPORT_KINDS[kind],
        rows,
        tokenizer_dir=_tokenizer_dir(ws, source, tokenizer),
        val_fraction=val_fraction,
        seed=seed,
        lineage=lineage,
    )
    with ws.catalog.session() as s:
        audit.record(
            s, actor, "label.export", f"label_task:{task_name}", dataset=dataset.ref, rows=len(rows)
        )
    return ExportResult(dataset, EXPORT_KINDS[kind], len(rows), counts, lineage)

"""Labeling tasks and their items, and what a label value must look like.

An item's ``payload`` is what the annotator sees; its ``prelabel`` (optional) is a value of
the task's kind that the annotator accepts or corrects::

    kind            payload                                   label value
    classification  {"text"}                                  {"label": one of the label set}
    spans           {"tokens": [...]}                         {"labels": [one per token]}
    caption         {"text"} and/or {"prompt"}                {"text": the edited text}
    preference      {"prompt", "a", "b"}                      {"choice": "a" | "b"}

Items come from the rows of a dataset version (``genloop data import``, a labeling or a
feedback export) or of a JSON Lines file, read with the same keys:

    classification  text, optional label (the pre-label)
    spans           tokens (or text, split on whitespace), optional labels (the pre-label)
    caption         prompt and/or text (or response, as in sft rows); the text is the
                    pre-label, the starting point of the edit
    preference      prompt and a + b (optional choice), or chosen + rejected (as in dpo rows:
                    shown as A and B in an order drawn per item, the chosen one the
                    pre-label), or the prompt alone with a model (``--model``) to generate
                    A and B

A row's ``id`` (a string or number) is kept in the payload, and sft/dpo rows' ``format``.
With a model, its predictions replace the rows' own pre-labels (``prelabel.py``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from genloop.data.pairs import PairsKind
from genloop.errors import ConflictError, GenloopError, NotFoundError
from genloop.workspace import audit
from genloop.workspace.refs import check_name
from genloop.workspace.tables import LabelItem, LabelTask
from genloop.workspace.workspace import Workspace

Kind = Literal["classification", "spans", "caption", "preference"]
KINDS: tuple[Kind, ...] = get_args(Kind)
OUTSIDE = "O"  # the spans label of a token outside every span; always allowed
CHOICES = ("a", "b")
# what an export makes of each kind (genloop.data.pairs)
EXPORT_KINDS: dict[str, PairsKind] = {
    "classification": "classification",
    "spans": "token_classification",
    "caption": "sft",
    "preference": "dpo",
}
# the dataset kinds each task kind reads items from
SOURCE_KINDS: dict[str, tuple[str, ...]] = {
    "classification": ("classification",),
    "spans": ("token_classification",),
    "caption": ("sft",),
    "preference": ("dpo", "sft"),
}
VALUE_KEYS: dict[str, str] = {
    "classification": "label",
    "spans": "labels",
    "caption": "text",
    "preference": "choice",
}

MAX_ITEMS = 100_000
MAX_TEXT_CHARS = 32_000
MAX_TOKENS = 2_000
MAX_TOKEN_CHARS = 200
MAX_LABELS = 200  # size of a label set
MAX_LABEL_CHARS = 64
MAX_OVERLAP = 10
MAX_ANNOTATOR_CHARS = 128


class LabelError(GenloopError):
    """A labeling task, item or label value is invalid (the server answers 422)."""

    http_status = 422


@dataclass
class TaskInfo:
    """A task as the CLI (``--json``), the API and the UI see it."""

    id: int
    name: str
    kind: str
    label_set: list[str]
    overlap: int
    source: dict[str, Any]
    prelabel_source: str | None
    created_by: str
    created_at: datetime
    items: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass
class ItemInfo:
    id: int
    task: str
    position: int
    payload: dict[str, Any]
    prelabel: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_info(row: LabelTask, items: int = 0) -> TaskInfo:
    return TaskInfo(
        id=row.id,
        name=row.name,
        kind=row.kind,
        label_set=list(row.label_set or []),
        overlap=row.overlap,
        source=dict(row.source or {}),
        prelabel_source=row.prelabel_source,
        created_by=row.created_by,
        created_at=row.created_at,
        items=items,
    )


def item_info(row: LabelItem, task: str) -> ItemInfo:
    return ItemInfo(
        id=row.id,
        task=task,
        position=row.position,
        payload=dict(row.payload),
        prelabel=dict(row.prelabel) if row.prelabel is not None else None,
    )


# ---------------------------------------------------------------------------- checks


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise LabelError(f"unknown task kind {kind!r} (kinds: {', '.join(KINDS)})")
    return kind


def check_annotator(name: object) -> str:
    """An annotator's name: 1 to 128 printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise LabelError("the annotator must be a non-empty name")
    name = name.strip()
    if len(name) > MAX_ANNOTATOR_CHARS or not name.isprintable():
        raise LabelError(
            f"annotator name {name[:40]!r} must be at most {MAX_ANNOTATOR_CHARS} printable "
            "characters"
        )
    return name


def check_label_set(kind: str, labels: Sequence[str]) -> list[str]:
    """A task's label set: needed by classification (two or more) and spans (one or more
    besides ``O``); caption and preference tasks take none."""
    if kind in ("caption", "preference"):
        if labels:
            raise LabelError(f"a {kind} task takes no label set (got {', '.join(labels)})")
        return []
    out: list[str] = []
    for label in labels:
        if not isinstance(label, str) or not label.strip() or label != label.strip():
            raise LabelError(f"label {label!r}: labels are non-empty names without outer spaces")
        if len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise LabelError(f"label {label[:40]!r} is longer than {MAX_LABEL_CHARS} characters")
        if label not in out and not (kind == "spans" and label == OUTSIDE):
            out.append(label)
    if len(out) > MAX_LABELS:
        raise LabelError(f"{len(out)} labels; a label set holds at most {MAX_LABELS}")
    least = 2 if kind == "classification" else 1
    if len(out) < least:
        what = "two labels" if kind == "classification" else f"one label besides {OUTSIDE!r}"
        raise LabelError(
            f"a {kind} task needs at least {what} (give them with --labels a,b,… or take "
            "them from the rows' labels or the model's)"
        )
    return out


def _text(value: object, field: str, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise LabelError(f"{where}: {field} must be a string, got {type(value).__name__}")
    if not empty and not value.strip():
        raise LabelError(f"{where}: {field} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise LabelError(
            f"{where}: {field} is too long ({len(value):,} characters; at most {MAX_TEXT_CHARS:,})"
        )
    if "\x00" in value:
        raise LabelError(f"{where}: {field} holds a NUL character")
    return value


def check_value(
    kind: str, label_set: Sequence[str], payload: Mapping[str, Any], value: object, where: str
) -> dict[str, Any]:
    """``value`` checked as a label of an item with ``payload`` (a copy; LabelError when it
    is not one, naming what is wrong)."""
    key = VALUE_KEYS[kind]
    if not isinstance(value, Mapping) or set(value) != {key}:
        shape = {
            "classification": '{"label": "<one of the label set>"}',
            "spans": '{"labels": ["<label or O>", … one per token]}',
            "caption": '{"text": "<the edited text>"}',
            "preference": '{"choice": "a" or "b"}',
        }[kind]
        raise LabelError(f"{where}: a {kind} label is {shape}, got {_brief(value)}")
    got = value[key]
    if kind == "classification":
        if got not in label_set:
            raise LabelError(
                f"{where}: label {_brief(got)} is not in the label set ({', '.join(label_set)})"
            )
        return {"label": got}
    if kind == "spans":
        tokens = payload["tokens"]
        allowed = {OUTSIDE, *label_set}
        if not isinstance(got, list) or len(got) != len(tokens):
            raise LabelError(
                f"{where}: labels must be a list of {len(tokens)} labels, one per token "
                f"(got {_brief(got)})"
            )
        bad = [x for x in got if not isinstance(x, str) or x not in allowed]
        if bad:
            raise LabelError(
                f"{where}: label {_brief(bad[0])} is not in the label set "
                f"({', '.join([OUTSIDE, *label_set])})"
            )
        return {"labels": list(got)}
    if kind == "caption":
        return {"text": _text(got, "text", where)}
    if got not in CHOICES:
        raise LabelError(f'{where}: choice must be "a" or "b", got {_brief(got)}')
    return {"choice": got}


def _brief(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def same_value(kind: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two label values say the same (a caption's outer whitespace aside)."""
    if kind == "caption":
        return " ".join(str(a["text"]).split()) == " ".join(str(b["text"]).split())
    return dict(a) == dict(b)


# ---------------------------------------------------------------------------- items


def _flip(seed_text: str) -> bool:
    """Whether chosen goes to B: drawn per item from its content, so the order is fixed."""
    return hashlib.sha256(seed_text.encode()).digest()[0] % 2 == 1


def item_from_row(
    kind: str, row: object, where: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(payload, pre-label or None) of one source row (module docstring)."""
    if not isinstance(row, Mapping):
        raise LabelError(f"{where}: expected a JSON object, got {type(row).__name__}")
    payload: dict[str, Any] = {}
    prelabel: dict[str, Any] | None = None
    if kind == "classification":
        if "text" not in row:
            raise LabelError(f"{where}: missing text (a classification item is {{text}})")
        payload["text"] = _text(row["text"], "text", where)
        if "label" in row:
            prelabel = {"label": row["label"]}
    elif kind == "spans":
        if "tokens" in row:
            tokens = row["tokens"]
        elif "text" in row:
            tokens = _text(row["text"], "text", where).split()
        else:
            raise LabelError(f"{where}: missing tokens (a spans item is {{tokens}} or {{text}})")
        if not (isinstance(tokens, list) and tokens and len(tokens) <= MAX_TOKENS):
            raise LabelError(f"{where}: tokens must be a list of 1 to {MAX_TOKENS} strings")
        for t in tokens:
            if not isinstance(t, str) or not t.strip() or len(t) > MAX_TOKEN_CHARS:
                raise LabelError(
                    f"{where}: each token must be a non-empty string of at most "
                    f"{MAX_TOKEN_CHARS} characters (got {_brief(t)})"
                )
        payload["tokens"] = list(tokens)
        if "labels" in row:
            prelabel = {"labels": row["labels"]}
    elif kind == "caption":
        text = row.get("text", row.get("response"))
        if "prompt" in row:
            payload["prompt"] = _text(row["prompt"], "prompt", where, empty=True)
        if text is not None:
            payload["text"] = _text(text, "text", where, empty=True)
            if payload["text"].strip():
                prelabel = {"text": payload["text"]}
        if not (payload.get("prompt") or "").strip() and not (payload.get("text") or "").strip():
            raise LabelError(f"{where}: a caption item needs a text to edit, a prompt, or both")
    else:
        if "prompt" not in row:
            raise LabelError(f"{where}: missing prompt (a preference item is {{prompt, a, b}})")
        payload["prompt"] = _text(row["prompt"], "prompt", where, empty=True)
        if "a" in row or "b" in row:
            for side in CHOICES:
                if side not in row:
                    raise LabelError(f"{where}: has a or b but not both")
                payload[side] = _text(row[side], side, where, empty=True)
            if "choice" in row:
                prelabel = {"choice": row["choice"]}
        elif "chosen" in row or "rejected" in row:
            chosen = _text(row.get("chosen"), "chosen", where, empty=True)
            rejected = _text(row.get("rejected"), "rejected", where, empty=True)
            flip = _flip(json.dumps([payload["prompt"], chosen, rejected]))
            payload["a"], payload["b"] = (rejected, chosen) if flip else (chosen, rejected)
            prelabel = {"choice": "b" if flip else "a"}
    if kind in ("caption", "preference") and row.get("format") in ("chat", "completion"):
        payload["format"] = row["format"]
    if "id" in row and isinstance(row["id"], str | int) and not isinstance(row["id"], bool):
        payload["id"] = row["id"]
    return payload, prelabel


def rows_from_dataset(ws: Workspace, ref: str, kind: str) -> tuple[list[Any], dict[str, Any]]:
    """The rows of a row dataset version (both splits) and the task's ``source``."""
    from genloop.data.pairs import pairs_kind, read_pairs
    from genloop.workspace.datasets import resolve_dataset

    info = resolve_dataset(ws, ref)
    directory = ws.store.open_verified(info.artifact)
    dataset_kind = pairs_kind(directory)
    if dataset_kind not in SOURCE_KINDS[kind]:
        raise LabelError(
            f"dataset {info.ref} holds {dataset_kind} rows; a {kind} task reads "
            f"{' or '.join(SOURCE_KINDS[kind])} rows (or give a JSONL file)"
        )
    rows: list[Any] = []
    for split in ("train", "val"):
        rows.extend(read_pairs(directory, split, dataset_kind))
    if kind == "preference" and dataset_kind == "sft":  # prompts only: a model writes A and B
        rows = [{k: v for k, v in r.items() if k in ("prompt", "id")} for r in rows]
    for i, row in enumerate(rows):
        if "messages" in row:
            raise LabelError(
                f"dataset {info.ref} row {i} holds chat messages; a {kind} task reads "
                "prompt/response rows"
            )
    source = {"dataset": info.ref, "dataset_version_id": info.id, "dataset_kind": dataset_kind}
    return rows, source


def rows_from_file(path: Path) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """``(where, row)`` of each line of a JSON Lines file and the task's ``source``."""
    from genloop.data.jsonl import read_jsonl

    if not path.is_file():
        raise LabelError(f"{path}: no such file")
    rows = [(where, row) for _n, where, row in read_jsonl(path)]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return rows, {"file": path.name, "sha256": digest}


# ---------------------------------------------------------------------------- tasks


def create_task(
    ws: Workspace,
    name: str,
    kind: str,
    *,
    dataset: str | None = None,
    file: Path | None = None,
    labels: Sequence[str] | None = None,
    overlap: int = 1,
    model: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    device: str = "cpu",
    actor: str = "cli",
) -> TaskInfo:
    """Make task ``name`` from the rows of dataset version ``dataset`` or of JSON Lines
    ``file`` (one of them).

    ``labels`` is the label set (classification, spans); without it, the model's labels
    (``model``) or the labels the rows carry. ``overlap``: how many annotators should label
    each item (2 or more measures agreement on every item). ``model``: a model ref whose
    predictions become the pre-labels (``prelabel.py``; ``seed``, ``max_new_tokens`` and
    ``device`` are its generation settings).
    """
    check_name(name)
    kind = check_kind(kind)
    if isinstance(overlap, bool) or not 1 <= overlap <= MAX_OVERLAP:
        raise LabelError(f"overlap must be 1 to {MAX_OVERLAP} annotators per item, not {overlap}")
    if (dataset is None) == (file is None):
        raise LabelError("give the items as a dataset version or a JSONL file (one of them)")
    with ws.catalog.session() as s:
        if s.scalar(select(LabelTask.id).where(LabelTask.name == name)) is not None:
            raise ConflictError(f"a labeling task named {name!r} exists; choose another name")
    if dataset is not None:
        rows, source = rows_from_dataset(ws, dataset, kind)
        located = [(f"{source['dataset']} row {i}", r) for i, r in enumerate(rows)]
        prelabel_source: str | None = "dataset"
    else:
        assert file is not None
        located, source = rows_from_file(file)
        prelabel_source = "file"
    if not located:
        raise LabelError(f"{source.get('dataset') or file}: no rows to label")
    if len(located) > MAX_ITEMS:
        raise LabelError(f"{len(located):,} rows; a task holds at most {MAX_ITEMS:,} items")
    items = [item_from_row(kind, row, where) for where, row in located]
    payloads = [p for p, _ in items]
    prelabels = [pl for _, pl in items]
    label_set = list(labels or [])

    if model is not None:
        from genloop.feedback.labeling.prelabel import predict

        made = predict(
            ws, model, kind, payloads, seed=seed, max_new_tokens=max_new_tokens, device=device
        )
        prelabels = made.values
        payloads = made.payloads
        prelabel_source = f"model:{made.model}"
        source = source | {"model": made.model, "prelabel_settings": made.settings}
        if not label_set and made.labels:
            label_set = [x for x in made.labels if not (kind == "spans" and x == OUTSIDE)]
    elif kind == "preference" and any("a" not in p for p in payloads):
        where = located[next(i for i, p in enumerate(payloads) if "a" not in p)][0]
        raise LabelError(
            f"{where}: a preference item needs two candidates (a + b, or chosen + rejected); "
            "give --model to generate them from the prompt"
        )
    if not label_set and kind in ("classification", "spans"):
        label_set = _labels_in(kind, prelabels)
    label_set = check_label_set(kind, label_set)
    for (where, _row), payload, pre in zip(located, payloads, prelabels, strict=True):
        if pre is not None:
            check_value(kind, label_set, payload, pre, f"{where}: pre-label")
    if all(p is None for p in prelabels):
        prelabel_source = None
    try:
        with ws.catalog.session() as s:
            task = LabelTask(
                name=name,
                kind=kind,
                label_set=label_set,
                overlap=overlap,
                source=source,
                prelabel_source=prelabel_source,
                created_by=actor,
            )
            s.add(task)
            s.flush()
            s.execute(
                insert(LabelItem),
                [
                    {"task_id": task.id, "position": i, "payload": p, "prelabel": pre}
                    for i, (p, pre) in enumerate(zip(payloads, prelabels, strict=True))
                ],
            )
            audit.record(
                s, actor, "label.task.create", f"label_task:{name}", kind=kind, items=len(items)
            )
            return task_info(task, len(items))
    except DBIntegrityError:
        raise ConflictError(f"a labeling task named {name!r} exists; choose another name") from None


def _labels_in(kind: str, prelabels: Iterable[dict[str, Any] | None]) -> list[str]:
    """The labels the pre-labels use, sorted (spans: without ``O``)."""
    found: set[str] = set()
    for pre in prelabels:
        if pre is None:
            continue
        values = [pre.get("label")] if kind == "classification" else pre.get("labels") or []
        found.update(v for v in values if isinstance(v, str))
    found.discard(OUTSIDE if kind == "spans" else "")
    return sorted(found)


def task_row(s: Session, name: str) -> LabelTask:
    """The task named ``name``; NotFoundError naming the tasks there are."""
    row = s.scalars(select(LabelTask).where(LabelTask.name == name)).first()
    if row is None:
        known = s.scalars(select(LabelTask.name).order_by(LabelTask.name).limit(20)).all()
        raise NotFoundError(
            f"no labeling task named {name!r} (tasks: {', '.join(known) or 'none yet'})"
        )
    return row


def get_task(ws: Workspace, name: str) -> TaskInfo:
    with ws.catalog.session() as s:
        row = task_row(s, name)
        count = s.scalar(select(func.count()).where(LabelItem.task_id == row.id)) or 0
        return task_info(row, count)


def list_tasks(ws: Workspace) -> list[TaskInfo]:
    """Every task with its item count, newest first."""
    with ws.catalog.session() as s:
        counts = dict(
            s.execute(select(LabelItem.task_id, func.count()).group_by(LabelItem.task_id)).all()
        )
        rows = s.scalars(select(LabelTask).order_by(LabelTask.id.desc())).all()
        return [task_info(r, counts.get(r.id, 0)) for r in rows]


def get_item(ws: Workspace, task: str, item_id: int) -> ItemInfo:
    with ws.catalog.session() as s:
        t = task_row(s, task)
        row = s.get(LabelItem, item_id)
        if row is None or row.task_id != t.id:
            raise NotFoundError(f"task {task} has no item {item_id}")
        return item_info(row, t.name)

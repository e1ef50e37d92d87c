"""``genloop feedback export``: curated feedback → a dataset version.

    sft     corrections and upvoted responses as prompt → answer pairs
    dpo     for the same prompt, (corrected or upvoted answer, downvoted or corrected
            response) as (chosen, rejected) pairs
    jsonl   the curated rows themselves (redacted), for people and other tools

Feedback on ``/v1/completions`` becomes plain-text rows (``"format": "completion"``: the
model sees the prompt as it was served, with no chat template); feedback on chat requests
keeps its messages. sft and dpo sets carry the model's tokenizer, so ``genloop train``
reads them (``train.objective: sft`` or ``dpo``).

Each exported row's ``exported_to`` points at the version made, except rows a promoted
retrain already trained on: those keep the set they were trained with. The version's
lineage lists the feedback ids it considered and, for privacy erasure, the keyed
pseudonym (:meth:`genloop.security.crypto.Cipher.pseudonym`) of each user id whose
feedback it holds (``feedback_user_hashes``): a reader of the catalog cannot test it
against guessed ids without the workspace key.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select, update

from genloop.errors import GenloopError
from genloop.feedback.curate import (
    CurationReport,
    Item,
    curate,
    load_items,
    norm,
    prompt_key,
    usable_statuses,
)
from genloop.feedback.store import Cipher
from genloop.workspace.datasets import DatasetVersionInfo, register_dataset_version
from genloop.workspace.tables import AliasHistory, Feedback, ModelVersion
from genloop.workspace.workspace import Workspace

ExportFormat = Literal["sft", "dpo", "jsonl"]
FORMATS: tuple[ExportFormat, ...] = ("sft", "dpo", "jsonl")
JSONL_FORMAT = "genloop-feedback"
MAX_PAIRS_PER_PROMPT = 16
SMALL_SET = 20  # fewer rows than this: no validation split (it could take them all)
FEEDBACK_DATASET_TAG = "feedback_dataset_version_id"  # on a retrained model version


@dataclass
class ExportResult:
    """The dataset version made (``None`` when no row survived curation), its row count,
    what curation did, and the feedback ids considered."""

    format: str
    dataset: DatasetVersionInfo | None
    rows: int
    report: CurationReport
    considered: list[int]
    skipped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dataset": self.dataset.ref if self.dataset is not None else None,
            "dataset_version_id": self.dataset.id if self.dataset is not None else None,
            "rows": self.rows,
            "curation": self.report.to_dict(),
            "considered": len(self.considered),
            "skipped": self.skipped,
        }


# ---------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------


def sft_rows(items: Sequence[Item]) -> list[dict[str, Any]]:
    """One prompt → answer pair per row that vouches for an answer."""
    rows: list[dict[str, Any]] = []
    for it in items:
        answer = it.chosen
        if answer is None:
            continue
        if isinstance(it.prompt, str):
            rows.append({"prompt": it.prompt, "response": answer, "format": "completion"})
        else:
            rows.append({"messages": [*it.prompt, {"role": "assistant", "content": answer}]})
    return rows


def _dpo_prompt(it: Item) -> tuple[str, str] | None:
    """(prompt, format) of a DPO row, or None for chats a prompt string cannot hold."""
    if isinstance(it.prompt, str):
        return it.prompt, "completion"
    if len(it.prompt) == 1 and it.prompt[0]["role"] == "user":
        return it.prompt[0]["content"], "chat"
    return None


def dpo_rows(items: Sequence[Item]) -> tuple[list[dict[str, Any]], int]:
    """(chosen, rejected) pairs per prompt, and how many rows were left out because their
    conversation has more than one user turn (a DPO row holds a single prompt)."""
    groups: dict[str, list[Item]] = defaultdict(list)
    multi_turn = 0
    for it in items:
        if _dpo_prompt(it) is None:
            multi_turn += 1
            continue
        groups[prompt_key(it.prompt)].append(it)
    rows: list[dict[str, Any]] = []
    for group in groups.values():
        prompt, fmt = _dpo_prompt(group[0]) or ("", "chat")
        chosen = _unique(it.chosen for it in group)
        rejected = _unique(it.rejected for it in group)
        pairs = [(c, r) for c in chosen for r in rejected if norm(c) != norm(r)]
        for c, r in pairs[:MAX_PAIRS_PER_PROMPT]:
            row = {"prompt": prompt, "chosen": c, "rejected": r}
            rows.append(row | {"format": "completion"} if fmt == "completion" else row)
    return rows, multi_turn


def _unique(texts: Any) -> list[str]:
    seen: dict[str, str] = {}
    for t in texts:
        if t is not None and norm(t) not in seen:
            seen[norm(t)] = t
    return list(seen.values())


def jsonl_rows(items: Sequence[Item]) -> list[dict[str, Any]]:
    return [
        {
            "feedback_id": it.id,
            "model": it.model_name
            if it.model_version is None
            else f"{it.model_name}@{it.model_version}",
            "endpoint": it.endpoint,
            "prompt": it.prompt,
            "response": it.response,
            "rating": it.rating,
            "correction": it.correction,
            "comment": it.comment,
            "created_at": it.created_at.isoformat(),
        }
        for it in items
    ]


# ---------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------


def trained_feedback_sets(ws: Workspace, model: str | None = None) -> set[int]:
    """The feedback dataset versions that retrained model versions (of ``model``, a name)
    were trained on and that were promoted: the rows in them count as used."""
    with ws.catalog.session() as s:
        query = select(ModelVersion.tags).where(
            ModelVersion.id.in_(select(AliasHistory.model_version_id))
        )
        if model is not None:
            query = query.where(ModelVersion.name == model)
        out = set()
        for tags in s.scalars(query):
            value = (tags or {}).get(FEEDBACK_DATASET_TAG)
            if isinstance(value, int):
                out.add(value)
        return out


def export_items(
    ws: Workspace,
    items: Sequence[Item],
    fmt: str,
    *,
    cipher: Cipher,
    name: str,
    per_user_cap: int,
    tokenizer_dir: Path | None = None,
    redact_pii: bool = True,
    lineage: dict[str, Any] | None = None,
) -> ExportResult:
    """Curate ``items`` and publish what survives as the next version of dataset ``name``
    (or find the identical one); mark the rows exported."""
    from genloop.data.pairs import write_pairs_dataset

    if fmt not in FORMATS:
        raise GenloopError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    if fmt != "jsonl" and tokenizer_dir is None:
        raise GenloopError(f"a {fmt} export needs the model's tokenizer: name the model")
    kept, report = curate(items, per_user_cap=per_user_cap, redact_pii=redact_pii)
    considered = [it.id for it in items]
    skipped: dict[str, int] = {}
    if fmt == "sft":
        rows = sft_rows(kept)
        skipped["no_answer"] = len(kept) - len(rows)  # downvotes without a correction
    elif fmt == "dpo":
        rows, skipped["multi_turn"] = dpo_rows(kept)
    else:
        rows = jsonl_rows(kept)
    skipped = {k: v for k, v in skipped.items() if v}
    if not rows:
        return ExportResult(fmt, None, 0, report, considered, skipped)
    users = sorted({cipher.pseudonym(it.user_id) for it in kept if it.user_id is not None})
    meta = {
        "source": "feedback",
        "format": fmt,
        "feedback_ids": considered,
        "kept_ids": [it.id for it in kept],
        "feedback_user_hashes": users,
        "models": sorted({it.model_name for it in kept}),
        "curation": report.to_dict(),
        **(lineage or {}),
    }
    if fmt == "jsonl":
        dataset = _write_jsonl(ws, name, rows, meta)
    else:
        val = 0.1 if len(rows) >= SMALL_SET else 0.0
        assert tokenizer_dir is not None
        dataset = write_pairs_dataset(
            ws, name, fmt, rows, tokenizer_dir=tokenizer_dir, val_fraction=val, lineage=meta
        )
    mark_exported(ws, considered, dataset.id)
    return ExportResult(fmt, dataset, len(rows), report, considered, skipped)


def _write_jsonl(
    ws: Workspace, name: str, rows: list[dict[str, Any]], lineage: dict[str, Any]
) -> DatasetVersionInfo:
    config = {"format": JSONL_FORMAT, "format_version": 1}
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + b"\n")
    for line in lines:
        digest.update(line.encode() + b"\n")
    stats = {"rows": len(rows), "curation": lineage["curation"]}

    def write(d: Path) -> None:
        (d / "feedback.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (d / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    return register_dataset_version(
        ws,
        name,
        digest.hexdigest(),
        write,
        kind="feedback",
        config=config,
        stats=stats,
        lineage=lineage,
    )


def mark_exported(ws: Workspace, ids: Sequence[int], dataset_version_id: int) -> None:
    """Point the rows' ``exported_to`` at the version, except rows already trained on."""
    trained = trained_feedback_sets(ws)
    with ws.catalog.session() as s:
        for start in range(0, len(ids), 500):  # bounded IN lists
            chunk = list(ids[start : start + 500])
            query = update(Feedback).where(Feedback.id.in_(chunk))
            if trained:
                query = query.where(
                    Feedback.exported_to.is_(None) | Feedback.exported_to.not_in(sorted(trained))
                )
            s.execute(query.values(exported_to=dataset_version_id))


def model_tokenizer_dir(ws: Workspace, ref: str) -> Path:
    """The artifact directory of a model version (its tokenizer files are there)."""
    from genloop.workspace import registry

    return registry.artifact_path(ws, ref)


def default_model_ref(ws: Workspace, name: str) -> str:
    """``NAME@production`` when that alias exists, else ``NAME`` (the newest version)."""
    from genloop.errors import NotFoundError
    from genloop.workspace import registry

    try:
        registry.resolve(ws, f"{name}@production")
    except NotFoundError:
        return name
    return f"{name}@production"


def export_feedback(
    ws: Workspace,
    cipher: Cipher,
    fmt: str,
    *,
    name: str | None = None,
    model: str | None = None,
    per_user_cap: int = 20,
    review_required: bool = False,
    redact_pii: bool = True,
) -> ExportResult:
    """Export the usable feedback (of ``model``'s requests when given: a name or ref) as a
    dataset version named ``name`` (default ``NAME-feedback``, or ``feedback``).

    sft and dpo take the tokenizer of ``model`` (``NAME@production`` when only a name is
    given and that alias exists); without ``model`` the feedback must all be about one
    model, whose tokenizer is taken.
    """
    from genloop.workspace.refs import parse_ref

    if fmt not in FORMATS:
        raise GenloopError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
    model_name = parse_ref(model).name if model is not None else None
    items = load_items(ws, cipher, statuses=usable_statuses(review_required), model=model_name)
    if not items:
        which = f" about {model_name}" if model_name else ""
        status = "approved" if review_required else "pending or approved"
        raise GenloopError(f"no {status} feedback{which} to export")
    tokenizer_dir = None
    if fmt != "jsonl":
        if model is None:
            names = sorted({it.model_name for it in items})
            if len(names) > 1:
                raise GenloopError(
                    f"the feedback is about several models ({', '.join(names)}); choose one "
                    "with --model (its tokenizer encodes the pairs)"
                )
            model = names[0]
        ref = model if "@" in model else default_model_ref(ws, model)
        tokenizer_dir = model_tokenizer_dir(ws, ref)
    dataset_name = name or (f"{model_name}-feedback" if model_name else "feedback")
    return export_items(
        ws,
        items,
        fmt,
        cipher=cipher,
        name=dataset_name,
        per_user_cap=per_user_cap,
        tokenizer_dir=tokenizer_dir,
        redact_pii=redact_pii,
    )

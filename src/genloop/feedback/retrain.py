"""``genloop retrain NAME@production``: feedback → candidate → gate → promote, top to bottom.

    1. lease      one retrain of a model at a time (``locks``); runs a crashed worker
                  left behind are closed as failed
    2. feedback   the usable rows about NAME that no promoted retrain trained on yet
    3. export     curate them into an sft (or dpo) dataset version ``NAME-feedback``
    4. mix        add a replay sample of the model's original training data (the dataset
                  of the first ancestor that was not itself retrained) so the fine-tune
                  does not forget it: ``replay_ratio`` of the rows, continuations as short
                  as the feedback's answers (so of the tokens too); ``NAME-retrain``
    5. train      fine-tune the production version (LoRA or all weights, from
                  ``feedback.retrain``); the result is registered as a candidate: the next
                  version of NAME, with the production version as its parent, no alias
    6. evaluate   candidate and production on the same fixed dataset version (the
                  original training data, or ``eval_dataset``) with the ``eval`` suites
    7. gate       the ``gate`` rules (default: perplexity may rise at most 2 %)
    8. publish    pass: promote the candidate to the alias (servers polling aliases swap
                  it in without downtime); fail: production stays, the run, the
                  candidate's tags and an alert say why

Nothing before step 8 touches the alias, so a crash anywhere leaves production as it was;
the next retrain takes the expired lease over and starts again.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import false, or_, select

from genloop.errors import GenloopError
from genloop.feedback.curate import load_items, usable_statuses
from genloop.feedback.export import (
    FEEDBACK_DATASET_TAG,
    export_items,
    trained_feedback_sets,
)
from genloop.feedback.store import Cipher
from genloop.workspace import leases, registry, runs
from genloop.workspace.refs import RefError, parse_ref
from genloop.workspace.tables import Alert, ModelVersion, Run, utcnow
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from genloop.config import GenloopConfig
    from genloop.train.loop import ProgressFn
    from genloop.workspace.datasets import DatasetVersionInfo

log = logging.getLogger(__name__)

Outcome = Literal["promoted", "rejected", "skipped", "production_changed"]
StageFn = Callable[[str], None]
LEASE_S = 300.0  # a worker that stops renewing for this long is taken over


@dataclass
class RetrainResult:
    """What one retrain did. ``outcome``: promoted, rejected (the gate failed), skipped
    (no new feedback, or none survived curation) or production_changed (someone moved
    the alias while it trained: the candidate is kept, not promoted)."""

    run_id: str
    outcome: Outcome
    reason: str
    production: str  # the version retrained from, "name@version"
    alias: str
    candidate: str | None = None
    promoted: str | None = None
    feedback_dataset: str | None = None
    train_dataset: str | None = None
    eval_dataset: str | None = None
    gate: dict[str, Any] | None = None
    curation: dict[str, Any] | None = None
    feedback_rows: int = 0
    replay_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retrain(
    ws: Workspace,
    cipher: Cipher,
    ref: str,
    cfg: GenloopConfig,
    *,
    eval_dataset: str | None = None,
    lease_s: float = LEASE_S,
    owner: str | None = None,
    actor: str = "retrain",
    on_stage: StageFn | None = None,
    train_progress: ProgressFn | None = None,
) -> RetrainResult:
    """Retrain the version ``ref`` (``NAME@ALIAS``) names on its new feedback and, if the
    candidate passes the gate, point the alias at it. See the module docstring."""
    target = parse_ref(ref)
    if target.alias is None:
        raise RefError(
            f"retrain needs NAME@ALIAS (e.g. {target.name}@production), not {ref!r}: the "
            "alias is what a passing candidate is promoted to"
        )
    name, alias = target.name, target.alias
    stage = on_stage or (lambda _msg: None)

    # 1. the lease: one retrain of NAME at a time; runs a crashed worker left are closed
    with leases.hold(ws, leases.lease_name("retrain", name), lease_s=lease_s, owner=owner) as lease:
        abandoned = close_abandoned_runs(ws, name)
        if abandoned:
            log.warning("closed %d retrain run(s) of %s left by a stopped worker", abandoned, name)
        production = registry.resolve(ws, ref)
        tracker = _start_run(ws, name, production, cfg, eval_dataset)
        try:
            result = _retrain(
                ws,
                cipher,
                cfg,
                tracker.run_id,
                production,
                alias,
                eval_dataset,
                lease,
                actor,
                stage,
                train_progress,
            )
        except BaseException as exc:
            tracker.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        tracker.set_status("completed", summary=result.to_dict())
        return result


def _retrain(
    ws: Workspace,
    cipher: Cipher,
    cfg: GenloopConfig,
    run_id: str,
    production: registry.ModelVersionInfo,
    alias: str,
    eval_dataset: str | None,
    lease: leases.Lease,
    actor: str,
    stage: StageFn,
    train_progress: ProgressFn | None,
) -> RetrainResult:
    fb, name = cfg.feedback, production.name
    result = RetrainResult(run_id, "skipped", "", production.ref, alias)

    # 2. the feedback rows no promoted retrain has trained on
    stage("collecting feedback")
    items = load_items(
        ws,
        cipher,
        statuses=usable_statuses(fb.review_required),
        model=name,
        exclude_exported_to=trained_feedback_sets(ws, name),
    )
    if not items:
        result.reason = f"no new feedback about {name}"
        return result
    _update_summary(ws, run_id, feedback_max_id=max(it.id for it in items))

    # 3. curate and export: NAME-feedback
    stage(f"curating {len(items)} feedback rows")
    model_dir = ws.store.open_verified(production.artifact)
    exported = export_items(
        ws,
        items,
        fb.retrain.objective,
        cipher=cipher,
        name=f"{name}-feedback",
        per_user_cap=fb.per_user_cap,
        tokenizer_dir=model_dir,
        lineage={"model": production.ref, "retrain_run": run_id},
    )
    result.curation = exported.report.to_dict()
    if exported.dataset is None:
        result.reason = (
            f"none of the {len(items)} feedback rows made a {fb.retrain.objective} example "
            f"after curation (dropped: {exported.report.dropped or 'none'})"
        )
        return result
    feedback = exported.dataset
    result.feedback_dataset, result.feedback_rows = feedback.ref, exported.rows

    # 4. the training mix: feedback + a replay sample of the original training data
    original = original_dataset(ws, production)
    stage("mixing in replay data")
    mix, result.replay_rows = _training_mix(
        ws, name, feedback, original, fb.replay_ratio, cfg.train.seed, model_dir
    )
    result.train_dataset = mix.ref
    _update_summary(ws, run_id, train_dataset_version_id=mix.id)

    # 5. fine-tune the production version; the candidate is registered without an alias
    stage(f"fine-tuning {production.ref} on {mix.ref}")

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        lease.check()  # a worker that lost its lease stops at once
        if train_progress is not None:
            train_progress(step, total, metrics)

    from genloop.train.loop import train

    try:
        trained = train(ws, finetune_config(cfg, production, mix.ref), progress=progress)
    finally:
        _adopt_train_runs(ws, run_id, mix.id)
    assert trained.model is not None
    candidate = trained.model
    result.candidate = candidate.ref
    tags = {"retrain_run": run_id, "gate": "pending", "feedback_dataset": feedback.ref}
    _tag(ws, candidate.id, **tags, **{FEEDBACK_DATASET_TAG: feedback.id})
    lease.check()

    # 6. evaluate both on the same fixed dataset version
    from genloop.evaluate.run import evaluate_model

    evaluation_set = _eval_dataset_ref(ws, eval_dataset, original)
    result.eval_dataset = evaluation_set
    device = cfg.train.device
    for ref in (candidate.ref, production.ref):
        stage(f"evaluating {ref} on {evaluation_set}")
        evaluate_model(ws, ref, dataset=evaluation_set, cfg=cfg.eval, device=device)

    # 7. the gate
    from genloop.evaluate.gate import gate

    verdict = gate(ws, candidate.ref, production.ref, cfg.gate.rules or None)
    result.gate = verdict.to_dict()
    lease.check()

    # 8. publish: promote on a pass (unless the alias moved meanwhile); else say why
    if not verdict.passed:
        failed = "; ".join(f"{c.description}: {c.message}" for c in verdict.failed)
        result.outcome, result.reason = "rejected", f"gate failed: {failed}"
        _tag(ws, candidate.id, gate="failed")
        message = f"retrained {candidate.ref} kept out: {result.reason}"
        _alert(ws, f"{name}@{alias}", message, run_id)
        return result
    _tag(ws, candidate.id, gate="passed")
    now = registry.resolve(ws, f"{name}@{alias}")
    if now.id != production.id:
        result.outcome = "production_changed"
        result.reason = (
            f"{name}@{alias} moved from {production.ref} to {now.ref} while retraining; "
            f"{candidate.ref} passed the gate against {production.ref} but was not promoted"
        )
        return result
    stage(f"promoting {candidate.ref} to {name}@{alias}")
    registry.promote(
        ws, candidate.ref, alias, actor=actor, reason=f"retrain run {run_id}: gate passed"
    )
    result.outcome, result.promoted = "promoted", candidate.ref
    result.reason = f"gate passed on {verdict.dataset}"
    return result


# ---------------------------------------------------------------------------------------
# the steps' helpers
# ---------------------------------------------------------------------------------------


def original_dataset(ws: Workspace, model: registry.ModelVersionInfo) -> DatasetVersionInfo | None:
    """The training dataset of the first ancestor of ``model`` (itself included) that was
    not made by a retrain: what replay samples from and what evaluation holds fixed."""
    from genloop.workspace.datasets import get_dataset_version

    seen: set[int] = set()
    info: registry.ModelVersionInfo | None = model
    while info is not None and info.id not in seen:
        seen.add(info.id)
        if FEEDBACK_DATASET_TAG not in info.tags:
            if info.dataset_version_id is None:
                return None
            return get_dataset_version(ws, info.dataset_version_id)
        info = registry.resolve(ws, info.parent) if info.parent else None
    return None


def _eval_dataset_ref(
    ws: Workspace, explicit: str | None, original: DatasetVersionInfo | None
) -> str:
    if explicit is not None:
        from genloop.workspace.datasets import resolve_dataset

        return resolve_dataset(ws, explicit).ref  # pinned: NAME → NAME@VERSION
    if original is None:
        raise GenloopError(
            "the production model records no original training dataset to evaluate on; "
            "name one with --eval-dataset NAME[@VERSION]"
        )
    return original.ref


def replay_rows(
    ws: Workspace,
    dataset: DatasetVersionInfo,
    kind: str,
    n: int,
    seed: int,
    answer_chars: int = 32,
    prompt_chars: int = 200,
) -> list[dict[str, Any]]:
    """``n`` training rows sampled (seeded) from ``dataset``: its pairs rows when it is a
    pairs dataset of ``kind``, else (for sft) continuations cut from its training
    documents at random word boundaries: up to ``prompt_chars`` of the text before as the
    prompt, the next ``answer_chars`` or so as the response, in plain text.

    Continuations as short as the feedback's answers make ``replay_ratio`` the share of
    the trained-on tokens too (a whole replayed document would outweigh a short correction
    many times over in the loss, which averages over tokens).
    """
    from genloop.data.pairs import pairs_kind, read_pairs

    if n <= 0:
        return []
    data_dir = ws.store.open_verified(dataset.artifact)
    rng = random.Random(seed)  # noqa: S311 (a data sample, not a secret)
    if (data_dir / "pairs").is_dir():
        if pairs_kind(data_dir) != kind:
            return []
        rows = read_pairs(data_dir, "train", kind)
        return rng.sample(rows, min(n, len(rows)))
    docs = data_dir / "docs" / "train.jsonl"
    if kind != "sft" or not docs.is_file():
        return []
    texts = _sample_texts(docs, n, rng)
    if not texts:
        return []
    rows = []
    for i in range(n):  # several cuts of one document when it has fewer than n
        text = texts[i % len(texts)]
        prompt, response = _continuation(text, prompt_chars, answer_chars, rng)
        rows.append({"prompt": prompt, "response": response, "format": "completion"})
    return rows


def _sample_texts(path: Path, n: int, rng: random.Random) -> list[str]:
    """``n`` documents drawn uniformly (reservoir sampling: one pass, ``n`` kept)."""
    import json

    chosen: list[str] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            text = json.loads(line).get("text")
            if not isinstance(text, str) or not text.strip():
                continue
            if len(chosen) < n:
                chosen.append(text)
            else:
                j = rng.randrange(i + 1)
                if j < n:
                    chosen[j] = text
    return chosen


def _continuation(
    text: str, prompt_chars: int, answer_chars: int, rng: random.Random
) -> tuple[str, str]:
    """(prompt, response) cut from ``text`` before a random space: the response is the
    next ``answer_chars`` characters (to the end of a word), the prompt up to
    ``prompt_chars`` of what precedes it (from the start of a word)."""
    spaces = [i for i, ch in enumerate(text) if ch == " " and i > 0]
    if not spaces:
        return "", text[:answer_chars]
    cut = rng.choice(spaces)
    end = cut + answer_chars
    while end < len(text) and end < cut + answer_chars + 32 and not text[end].isspace():
        end += 1  # finish the word
    start = max(0, cut - prompt_chars)
    if start > 0:  # start at a word too
        space = text.find(" ", start, cut)
        start = space + 1 if space != -1 else start
    return text[start:cut], text[cut:end]


def _training_mix(
    ws: Workspace,
    name: str,
    feedback: DatasetVersionInfo,
    original: DatasetVersionInfo | None,
    replay_ratio: float,
    seed: int,
    tokenizer_dir: Path,
) -> tuple[DatasetVersionInfo, int]:
    """The feedback set plus ``replay_ratio`` of replayed rows, as ``NAME-retrain``."""
    from genloop.data.pairs import read_pairs, write_pairs_dataset

    data_dir = ws.store.open_verified(feedback.artifact)
    kind = feedback.kind
    rows = read_pairs(data_dir, "train", kind) + read_pairs(data_dir, "val", kind)
    n_replay = math.ceil(len(rows) * replay_ratio / (1 - replay_ratio)) if original else 0
    # replayed continuations as long as the feedback's prompts and answers (medians)
    answer_chars = _median([len(_answer(r)) for r in rows], 8, 400)
    prompt_chars = _median([len(str(r.get("prompt", ""))) for r in rows], 16, 2000)
    replay = (
        replay_rows(ws, original, kind, n_replay, seed, answer_chars, prompt_chars)
        if original
        else []
    )
    if n_replay and not replay:
        log.warning(
            "no replay: %s holds no %s rows or documents to replay",
            original.ref if original else "-",
            kind,
        )
    mixed = rows + replay
    mix = write_pairs_dataset(
        ws,
        f"{name}-retrain",
        "dpo" if kind == "dpo" else "sft",
        mixed,
        tokenizer_dir=tokenizer_dir,
        val_fraction=0.1 if len(mixed) >= 20 else 0.0,
        seed=seed,
        lineage={
            "feedback_dataset": feedback.ref,
            "feedback_dataset_version_id": feedback.id,
            "feedback_user_hashes": feedback.lineage.get("feedback_user_hashes", []),
            "replay_dataset": original.ref if original else None,
            "replay_rows": len(replay),
            "replay_ratio": replay_ratio,
        },
    )
    return mix, len(replay)


def _median(values: list[int], low: int, high: int) -> int:
    return min(high, max(low, sorted(values)[len(values) // 2])) if values else low


def _answer(row: dict[str, Any]) -> str:
    """The supervised text of a pairs row (the response, chosen answer or last turn)."""
    if "messages" in row:
        return str(row["messages"][-1]["content"])
    return str(row.get("response", row.get("chosen", "")))


def finetune_config(
    cfg: GenloopConfig, production: registry.ModelVersionInfo, dataset: str
) -> GenloopConfig:
    """The training config of the fine-tune: ``feedback.retrain`` on top of ``train``."""
    from genloop.config import GenloopConfig

    rc = cfg.feedback.retrain
    train = cfg.train.model_dump(mode="json")
    train.update(
        objective=rc.objective,
        dataset=dataset,
        lr=rc.lr,
        min_lr=min(cfg.train.min_lr, rc.lr / 10),
        max_steps=rc.max_steps,
        batch_size=rc.batch_size,
        warmup_steps=min(cfg.train.warmup_steps, rc.max_steps // 10),
        eval_every=rc.max_steps,
        checkpoint_every=rc.max_steps,
        early_stopping_patience=None,
        resume=False,
    )
    spec = {
        "name": production.name,
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "model": {
            "family": production.family,
            "base_model": production.ref,  # pinned: the alias may move meanwhile
            "lora": rc.lora.model_dump(mode="json") if rc.method == "lora" else None,
        },
        "train": train,
        "eval": cfg.eval.model_dump(mode="json"),
    }
    return GenloopConfig.model_validate(spec)


# ---------------------------------------------------------------------------------------
# the catalog records
# ---------------------------------------------------------------------------------------


def _start_run(
    ws: Workspace,
    name: str,
    production: registry.ModelVersionInfo,
    cfg: GenloopConfig,
    eval_dataset: str | None,
) -> Any:
    from genloop.train.tracking import RunTracker

    return RunTracker.start(
        ws,
        name=name,
        kind="retrain",
        config={
            "production": production.ref,
            "eval_dataset": eval_dataset,
            "feedback": cfg.feedback.model_dump(mode="json"),
            "eval": cfg.eval.model_dump(mode="json"),
            "gate": cfg.gate.model_dump(mode="json"),
        },
        parent_model_version_id=production.id,
    )


def _update_summary(ws: Workspace, run_id: str, **values: Any) -> None:
    runs.update_summary(ws, run_id, lambda _: values)


def _tag(ws: Workspace, model_version_id: int, **tags: Any) -> None:
    with ws.catalog.session() as s:
        row = s.get(ModelVersion, model_version_id)
        assert row is not None
        row.tags = {**(row.tags or {}), **tags}  # a new dict, so the change is tracked


def _alert(ws: Workspace, source: str, message: str, run_id: str) -> None:
    with ws.catalog.session() as s:
        s.add(
            Alert(
                kind="retrain_gate",
                severity="warning",
                source=source,
                message=message,
                details={"run_id": run_id},
            )
        )


def _adopt_train_runs(ws: Workspace, run_id: str, train_dataset_version_id: int) -> None:
    """Make the fine-tune's training run a child of the retrain run."""
    with ws.catalog.session() as s:
        for run in s.scalars(
            select(Run).where(
                Run.kind == "train",
                Run.dataset_version_id == train_dataset_version_id,
                Run.parent_run_id.is_(None),
            )
        ):
            run.parent_run_id = run_id


def close_abandoned_runs(ws: Workspace, name: str) -> int:
    """Mark failed the retrain runs of ``name`` still 'running' (and their training runs):
    called with the lease held, so no live worker owns them."""
    error = "abandoned: its worker stopped before finishing (the lease expired)"
    with ws.catalog.session() as s:
        abandoned = s.scalars(
            select(Run).where(Run.kind == "retrain", Run.name == name, Run.status == "running")
        ).all()
        for run in abandoned:
            run.status, run.error, run.ended_at = "failed", error, utcnow()
            mix = (run.summary or {}).get("train_dataset_version_id")
            same_mix = Run.dataset_version_id == mix if isinstance(mix, int) else false()
            children = select(Run).where(
                Run.kind == "train",
                Run.status == "running",
                or_(Run.parent_run_id == run.id, same_mix),
            )
            for child in s.scalars(children):
                child.status, child.error, child.ended_at = "failed", error, utcnow()
        return len(abandoned)

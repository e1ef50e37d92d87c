"""Curation: which feedback rows may teach a model, and in what form.

    load      the usable rows (approved; pending too unless review is required), each
              with its logged prompt and response, decrypted
    redact    personal data and credentials in every text (genloop.security.pii)
    filter    texts too long or empty, corrections that change nothing; then outliers
              against poisoning: on one (prompt, response) the minority's votes, and a
              correction that a clear majority of other users answered differently
    dedup     identical (prompt, answer, verdict) once, the earliest kept
    cap       at most ``per_user_cap`` rows per user (the newest), so no single user can
              dominate a training set however much they post

Users are told apart by the feedback's principal, which comes from the API key that sent
it (``genloop.feedback.store.principal_of``), never by the ``user`` label the client
sends: one key cannot pass as many users. Rows without one count as one user per API key
that made the request (or one anonymous user). Every drop is counted by
reason in the :class:`CurationReport` stored with the dataset version it feeds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select

from genloop.feedback.store import Cipher, parse_prompt
from genloop.security.pii import redact
from genloop.workspace.tables import Feedback, RequestLog
from genloop.workspace.workspace import Workspace

Prompt = str | list[dict[str, str]]  # completion text, or chat messages
MAX_CHARS = 16_000  # longer prompts, responses or corrections are left out
MAJORITY = 3  # a correction backed by ≥ 3 users outvotes one backed by a third as many


@dataclass(frozen=True)
class Item:
    """One feedback row with its request, decrypted (and, once curated, redacted)."""

    id: int
    user: str  # who counts for caps and majorities (see the module docstring)
    user_id: str | None
    rating: int
    status: str
    model_name: str
    model_version: int | None
    endpoint: str
    prompt: Prompt
    response: str
    correction: str | None
    comment: str | None
    created_at: datetime
    exported_to: int | None = None

    @property
    def chosen(self) -> str | None:
        """The answer this row vouches for: the correction, else an upvoted response."""
        if self.correction is not None:
            return self.correction
        return self.response if self.rating > 0 else None

    @property
    def rejected(self) -> str | None:
        """The answer this row speaks against: a downvoted or corrected response."""
        if self.rating < 0 or self.correction is not None:
            return self.response
        return None

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class CurationReport:
    """What curation did: rows in, rows kept, rows dropped by reason."""

    input: int = 0
    kept: int = 0
    users: int = 0
    redacted: int = 0  # rows in which at least one text had PII replaced
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def user_bucket(principal: str | None, api_key_id: int | None) -> str:
    """Who a row counts as: its principal, else the key that made the request."""
    if principal is not None:
        return principal
    return f"key:{api_key_id}" if api_key_id is not None else "anonymous"


def usable_statuses(review_required: bool) -> tuple[str, ...]:
    return ("approved",) if review_required else ("pending", "approved")


def load_items(
    ws: Workspace,
    cipher: Cipher,
    *,
    statuses: Sequence[str],
    model: str | None = None,
    exclude_exported_to: Iterable[int] = (),
    limit: int | None = None,
) -> list[Item]:
    """Feedback rows with these statuses (of requests served by model ``model``, a name),
    oldest first, decrypted. Rows whose ``exported_to`` is in ``exclude_exported_to`` are
    left out (the sets a promoted retrain already trained on)."""
    excluded = set(exclude_exported_to)
    query = (
        select(Feedback, RequestLog)
        .join(RequestLog, Feedback.request_id == RequestLog.id)
        .where(Feedback.status.in_(list(statuses)))
        .order_by(Feedback.id)
    )
    if model is not None:
        query = query.where(RequestLog.model_name == model)
    if excluded:
        query = query.where(
            Feedback.exported_to.is_(None) | Feedback.exported_to.not_in(sorted(excluded))
        )
    if limit is not None:
        query = query.limit(limit)
    items = []
    with ws.catalog.session() as s:
        for fb, req in s.execute(query):
            prompt = cipher.decrypt(req.prompt_enc) if req.prompt_enc is not None else ""
            items.append(
                Item(
                    id=fb.id,
                    user=user_bucket(fb.principal, req.api_key_id),
                    user_id=fb.user_id,
                    rating=fb.rating,
                    status=fb.status,
                    model_name=req.model_name,
                    model_version=req.model_version,
                    endpoint=req.endpoint,
                    prompt=parse_prompt(req.endpoint, prompt),
                    response=cipher.decrypt(req.response_enc) if req.response_enc else "",
                    correction=cipher.decrypt(fb.correction_enc) if fb.correction_enc else None,
                    comment=cipher.decrypt(fb.comment_enc) if fb.comment_enc else None,
                    created_at=fb.created_at,
                    exported_to=fb.exported_to,
                )
            )
    return items


# ---------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------


def norm(text: str) -> str:
    """The form two texts are compared in: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def prompt_key(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return norm(prompt)
    return json.dumps([[m["role"], norm(m["content"])] for m in prompt])


def _redacted(item: Item) -> tuple[Item, bool]:
    def r(text: str | None) -> str | None:
        return None if text is None else redact(text)

    if isinstance(item.prompt, str):
        prompt: Prompt = redact(item.prompt)
    else:
        prompt = [{"role": m["role"], "content": redact(m["content"])} for m in item.prompt]
    new = replace(
        item,
        prompt=prompt,
        response=redact(item.response),
        correction=r(item.correction),
        comment=r(item.comment),
    )
    return new, new != item


def _texts(item: Item) -> list[str]:
    prompts = [item.prompt] if isinstance(item.prompt, str) else [m["content"] for m in item.prompt]
    return [*prompts, item.response, item.correction or ""]


def _text_filter(item: Item, report: CurationReport) -> Item | None:
    if not item.prompt or not item.response:  # the server stored no text for the request
        report.drop("no_logged_text")
        return None
    if any(len(t) > MAX_CHARS for t in _texts(item)):
        report.drop("too_long")
        return None
    if item.correction is not None and norm(item.correction) == norm(item.response):
        if item.rating < 0:  # "wrong", and then the same answer: no signal
            report.drop("unchanged_correction")
            return None
        item = replace(item, correction=None)  # an upvote that re-typed the answer
    if not (item.chosen or "").strip() and not (item.rejected or "").strip():
        report.drop("empty")
        return None
    return item


def _vote_outliers(items: list[Item], report: CurationReport) -> list[Item]:
    """On each (prompt, response), the votes of the side fewer users took are dropped (both
    sides on a tie): the response is either good or not."""
    sides: dict[tuple[str, str], dict[int, set[str]]] = defaultdict(lambda: {1: set(), -1: set()})
    for it in items:
        verdict = 1 if it.rating > 0 and it.correction is None else -1
        sides[prompt_key(it.prompt), norm(it.response)][verdict].add(it.user)
    out = []
    for it in items:
        verdict = 1 if it.rating > 0 and it.correction is None else -1
        votes = sides[prompt_key(it.prompt), norm(it.response)]
        if len(votes[verdict]) < len(votes[-verdict]) or (
            votes[-verdict] and len(votes[verdict]) == len(votes[-verdict])
        ):
            report.drop("conflicting_votes")
            continue
        out.append(it)
    return out


def _correction_outliers(items: list[Item], report: CurationReport) -> list[Item]:
    """A correction is dropped when another correction of the same prompt is backed by at
    least ``MAJORITY`` users and three times as many as it is."""
    support: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for it in items:
        if it.correction is not None:
            support[prompt_key(it.prompt)][norm(it.correction)].add(it.user)
    out = []
    for it in items:
        if it.correction is not None:
            backers = support[prompt_key(it.prompt)]
            top = max(len(users) for users in backers.values())
            mine = len(backers[norm(it.correction)])
            if top >= MAJORITY and top >= 3 * mine:
                report.drop("minority_correction")
                continue
        out.append(it)
    return out


def _dedup(items: list[Item], report: CurationReport) -> list[Item]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for it in sorted(items, key=lambda i: i.id):
        key = (prompt_key(it.prompt), norm(it.chosen or ""), norm(it.rejected or ""))
        if key in seen:
            report.drop("duplicate")
            continue
        seen.add(key)
        out.append(it)
    return out


def _cap(items: list[Item], per_user_cap: int, report: CurationReport) -> list[Item]:
    by_user: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_user[it.user].append(it)
    kept: list[Item] = []
    for rows in by_user.values():
        rows.sort(key=lambda i: i.id, reverse=True)  # the newest first
        kept.extend(rows[:per_user_cap])
        report.drop("user_cap", len(rows) - per_user_cap if len(rows) > per_user_cap else 0)
    return sorted(kept, key=lambda i: i.id)


def curate(
    items: Sequence[Item], *, per_user_cap: int, redact_pii: bool = True
) -> tuple[list[Item], CurationReport]:
    """The rows fit to train on (redacted), in id order, and what was dropped and why."""
    if per_user_cap < 1:
        raise ValueError(f"per_user_cap must be at least 1, not {per_user_cap}")
    report = CurationReport(input=len(items))
    rows = list(items)
    if redact_pii:
        redacted = [_redacted(it) for it in rows]
        rows = [it for it, _ in redacted]
        report.redacted = sum(changed for _, changed in redacted)
    rows = [kept for it in rows if (kept := _text_filter(it, report)) is not None]
    rows = _vote_outliers(rows, report)
    rows = _correction_outliers(rows, report)
    rows = _dedup(rows, report)
    rows = _cap(rows, per_user_cap, report)
    report.kept = len(rows)
    report.users = len({it.user for it in rows})
    return rows, report

"""Feedback rows: submit (``POST /v1/feedback``), list, show, approve and reject.

A feedback row links to the logged request whose id is the response id, so it reaches the
prompt, the response and the model version that produced it. Its ``user_id`` is the one
the client names (the OpenAI-style ``user`` field), else the API key's: a label only. Who
gave it is its ``principal``, taken from the API key that sent it (:func:`principal_of`):
per-user caps, majority votes and erasure count principals, so one key cannot pass as
many users by varying ``user``. The correction and
the comment are encrypted with the workspace's cipher, like the request's prompt and
response (``genloop.security.crypto``); listing never decrypts, showing one row does.

Statuses: ``pending`` (new), ``approved`` and ``rejected`` (the review queue). Without
``feedback.review_required`` pending rows are used for retraining; with it, approved only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy import func, select

from genloop.errors import GenloopError, NotFoundError
from genloop.workspace import audit
from genloop.workspace.tables import Feedback, RequestLog
from genloop.workspace.workspace import Workspace

Status = Literal["pending", "approved", "rejected"]
STATUSES: tuple[Status, ...] = ("pending", "approved", "rejected")
MAX_CORRECTION_CHARS = 32_000
MAX_COMMENT_CHARS = 4_000
MAX_USER_CHARS = 128  # the column's size
MAX_RESPONSE_ID_CHARS = 64


class Cipher(Protocol):
    """Encrypts text for storage and decrypts it back (``genloop.security.crypto``)."""

    def encrypt(self, plaintext: str) -> bytes: ...

    def decrypt(self, token: bytes) -> str: ...

    def pseudonym(self, value: str) -> str: ...


class FeedbackError(GenloopError):
    """A feedback submission or review is invalid (the server answers 422)."""

    http_status = 422


@dataclass
class FeedbackInfo:
    """One feedback row as the API, the CLI (``--json``) and the UI see it.

    The texts (``prompt``, ``response``, ``correction``, ``comment``) are filled only by
    :func:`get_feedback`, which decrypts them.
    """

    id: int
    response_id: str
    user_id: str | None
    rating: int
    status: str
    model: str  # "name@version" (or "name" when the request logged no version)
    endpoint: str
    has_correction: bool
    has_comment: bool
    exported_to: int | None
    created_at: datetime
    prompt: str | None = None
    response: str | None = None
    correction: str | None = None
    comment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


def _check_rating(rating: object) -> int:
    if isinstance(rating, bool) or rating not in (1, -1):
        raise FeedbackError(f"rating must be +1 or -1, not {rating!r}")
    assert isinstance(rating, int)
    return rating


def _check_text(field: str, text: object, limit: int) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise FeedbackError(f"{field} must be a string")
    if not text.strip():
        return None  # an empty edit box is no correction
    if len(text) > limit:
        raise FeedbackError(f"{field} is too long ({len(text):,} characters; at most {limit:,})")
    if "\x00" in text:
        raise FeedbackError(f"{field} holds a NUL character")
    return text


def _check_user(user: object) -> str | None:
    if user is None:
        return None
    if not isinstance(user, str) or not user.strip():
        raise FeedbackError("user must be a non-empty string")
    if len(user) > MAX_USER_CHARS:
        raise FeedbackError(f"user is too long (at most {MAX_USER_CHARS} characters)")
    return user


def principal_of(key_id: int | None, key_user_id: str | None) -> str | None:
    """Who is behind an API key: ``user:<its user id>`` (several keys of one user are one
    principal), else ``key:<its id>``; None without a key."""
    if key_user_id is not None:
        return f"user:{key_user_id}"
    return f"key:{key_id}" if key_id is not None else None


def submit_feedback(
    ws: Workspace,
    cipher: Cipher,
    *,
    response_id: str,
    rating: int,
    correction: str | None = None,
    comment: str | None = None,
    user_id: str | None = None,
    key_id: int | None = None,
    key_user_id: str | None = None,
) -> int:
    """Store one rating (+1 / -1) of a served response, with an optional corrected answer
    and comment; returns the feedback id.

    ``user_id`` is the user the client names (a label), ``key_id`` and ``key_user_id`` the
    API key's that sent it: they make the row's principal. Without a key (a trusted local
    caller, such as an import) the label is the principal. An unknown response id is a
    :class:`NotFoundError` (404); a bad rating, text or user a :class:`FeedbackError` (422).
    """
    rating = _check_rating(rating)
    correction = _check_text("correction", correction, MAX_CORRECTION_CHARS)
    comment = _check_text("comment", comment, MAX_COMMENT_CHARS)
    user = _check_user(user_id) if user_id is not None else _check_user(key_user_id)
    principal = principal_of(key_id, _check_user(key_user_id))
    if principal is None and user is not None:
        principal = f"user:{user}"
    if not isinstance(response_id, str) or not response_id.strip():
        raise FeedbackError("response_id must be a non-empty string")
    if len(response_id) > MAX_RESPONSE_ID_CHARS:
        raise NotFoundError("no response with that id (too long to be one)")
    with ws.catalog.session() as s:
        if s.get(RequestLog, response_id) is None:
            raise NotFoundError(f"no response with id {response_id!r} (or it was not logged)")
        row = Feedback(
            request_id=response_id,
            user_id=user,
            principal=principal,
            rating=rating,
            correction_enc=cipher.encrypt(correction) if correction is not None else None,
            comment_enc=cipher.encrypt(comment) if comment is not None else None,
            status="pending",
        )
        s.add(row)
        s.flush()
        return row.id


def _model_label(request: RequestLog) -> str:
    if request.model_version is None:
        return request.model_name
    return f"{request.model_name}@{request.model_version}"


def _info(row: Feedback, request: RequestLog) -> FeedbackInfo:
    return FeedbackInfo(
        id=row.id,
        response_id=row.request_id,
        user_id=row.user_id,
        rating=row.rating,
        status=row.status,
        model=_model_label(request),
        endpoint=request.endpoint,
        has_correction=row.correction_enc is not None,
        has_comment=row.comment_enc is not None,
        exported_to=row.exported_to,
        created_at=row.created_at,
    )


def list_feedback(
    ws: Workspace,
    *,
    status: str | None = None,
    model: str | None = None,
    user_id: str | None = None,
    limit: int | None = 100,
) -> list[FeedbackInfo]:
    """Feedback rows, newest first (nothing decrypted); ``model`` is a model name."""
    if status is not None and status not in STATUSES:
        raise FeedbackError(f"unknown status {status!r} (statuses: {', '.join(STATUSES)})")
    if limit is not None and limit < 1:
        raise FeedbackError(f"limit must be at least 1, not {limit}")
    with ws.catalog.session() as s:
        query = (
            select(Feedback, RequestLog)
            .join(RequestLog, Feedback.request_id == RequestLog.id)
            .order_by(Feedback.id.desc())
        )
        if status is not None:
            query = query.where(Feedback.status == status)
        if model is not None:
            query = query.where(RequestLog.model_name == model)
        if user_id is not None:
            query = query.where(Feedback.user_id == user_id)
        if limit is not None:
            query = query.limit(limit)
        return [_info(f, r) for f, r in s.execute(query)]


def count_feedback(ws: Workspace) -> dict[str, int]:
    """How many rows have each status."""
    with ws.catalog.session() as s:
        rows = s.execute(select(Feedback.status, func.count()).group_by(Feedback.status))
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        counts.update({status: n for status, n in rows})
        return counts


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """A logged prompt as one string (chat messages one per line, ``role: content``)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def parse_prompt(endpoint: str, text: str) -> str | list[dict[str, str]]:
    """A logged prompt: chat messages when the request was a chat and they were logged as
    JSON (a list of ``{role, content}``, or ``{"messages": [...]}``), else the text."""
    if "chat" not in endpoint:
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        data = data.get("messages")
    if isinstance(data, list) and data and all(_is_message(m) for m in data):
        return [{"role": m["role"], "content": m["content"]} for m in data]
    return text


def _is_message(m: object) -> bool:
    return (
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    )


def _decrypt(cipher: Cipher, blob: bytes | None) -> str | None:
    return None if blob is None else cipher.decrypt(blob)


def get_feedback(ws: Workspace, cipher: Cipher, feedback_id: int) -> FeedbackInfo:
    """One feedback row with its prompt, response, correction and comment decrypted."""
    with ws.catalog.session() as s:
        row = s.get(Feedback, feedback_id)
        if row is None:
            raise NotFoundError(f"no feedback with id {feedback_id}")
        request = s.get(RequestLog, row.request_id)
        assert request is not None  # the foreign key guarantees it
        info = _info(row, request)
        prompt = _decrypt(cipher, request.prompt_enc)
        info.prompt = prompt_text(parse_prompt(request.endpoint, prompt)) if prompt else prompt
        info.response = _decrypt(cipher, request.response_enc)
        info.correction = _decrypt(cipher, row.correction_enc)
        info.comment = _decrypt(cipher, row.comment_enc)
        return info


def review(
    ws: Workspace,
    ids: Sequence[int],
    decision: Literal["approved", "rejected"],
    *,
    actor: str = "cli",
) -> list[int]:
    """Approve or reject feedback rows (all or none: an unknown id changes nothing).

    Returns the ids whose status changed. Rows a retrain already trained on keep their
    place in that training set; the decision counts for the sets made from now on.
    """
    if decision not in ("approved", "rejected"):
        raise FeedbackError(f"decision must be 'approved' or 'rejected', not {decision!r}")
    if not ids:
        raise FeedbackError("give at least one feedback id")
    wanted = sorted(set(ids))
    with ws.catalog.session(write_lock=True) as s:
        rows = s.scalars(select(Feedback).where(Feedback.id.in_(wanted)).with_for_update()).all()
        missing = sorted(set(wanted) - {r.id for r in rows})
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
            raise NotFoundError(f"no feedback with id {shown}")
        changed = [r.id for r in rows if r.status != decision]
        for r in rows:
            r.status = decision
        action = "feedback.approve" if decision == "approved" else "feedback.reject"
        audit.record(s, actor, action, "feedback", ids=changed, count=len(changed))
        return changed

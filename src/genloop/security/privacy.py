"""Right of access, right to erasure, and retention.

Every stored request and feedback row carries a user id: the one the client gives (the
OpenAI-style ``user`` field), else its API key's. A feedback row also carries its
principal, from the API key that sent it (``user:<the key's user id>``): a user's feedback
is what their keys sent, whatever label the client put on it, plus what names them. From
it:

* :func:`export_user` gathers what genloop holds about a user: requests with their
  prompts and responses decrypted, feedback with corrections and comments, the user's API
  keys (never the keys themselves) and their usage, the request-log lines, and the dataset
  versions built from their feedback.
* :func:`erase_user` removes it: the user's requests and feedback rows (and feedback
  others left on the user's requests, which quote them); the matching lines of every
  ``*.jsonl`` file under ``<workspace>/logs``; the files of every dataset version built
  from that feedback (a feedback export, and whatever lists one of those among its
  parents), whose catalog rows stay, marked ``excluded``, so they are never trained on
  again; model versions trained on one get the tag ``trained_on_excluded_data`` (a model
  cannot unlearn: retrain it); the user's API keys are revoked and unlinked. Other users'
  feedback in an excluded set goes back to the pool for the next export. On SQLite the
  deleted rows are overwritten (``secure_delete``) and the write-ahead log emptied; on
  PostgreSQL dead rows stay on disk until ``VACUUM`` (autovacuum) reclaims them.
* :func:`purge_expired` deletes requests, feedback and request-log files older than the
  retention period (``security.retention_days``).

Each of these is written to the audit log, which never holds content. It names the user
by a keyed pseudonym (:meth:`genloop.security.crypto.Cipher.pseudonym`), not the user id:
an operator holding the encryption key can check whether a given user was erased
(:func:`was_erased`); the audit log alone does not reveal who.

Not reached: copies outside the workspace (backups, log shippers fed from stderr, files
written with ``genloop privacy export --out``), and weights already trained on the data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from genloop.errors import ConfigError
from genloop.security.crypto import Cipher, DecryptionError, load_cipher
from genloop.workspace import audit
from genloop.workspace.tables import (
    ApiKey,
    AuditEvent,
    DatasetVersion,
    Feedback,
    ModelVersion,
    RequestLog,
    Usage,
)

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from genloop.workspace.workspace import Workspace

LOGS_DIR = "logs"
EXCLUDED = "excluded"
TRAINED_ON_EXCLUDED_TAG = "trained_on_excluded_data"
FEEDBACK_DATASET_TAG = "feedback_dataset_version_id"  # genloop.feedback.export sets it
MIN_TEXT_MATCH = 16  # a stored text this long or longer is searched for in the logs
_USER_FIELDS = ("user", "user_id")
_REQUEST_FIELDS = ("request_id", "response_id", "id")
_DAILY_LOG = re.compile(r"-(\d{4}-\d{2}-\d{2})\.jsonl$")


def _check_user(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id.strip() or len(user_id) > 128:
        raise ConfigError("give a user id of 1 to 128 characters")
    return user_id


def _feedback_of(user_id: str) -> ColumnElement[bool]:
    """The feedback rows about ``user_id``: given through the user's API keys (its
    principal, whatever ``user`` label the client sent), or labelled with the user."""
    return (Feedback.principal == f"user:{user_id}") | (Feedback.user_id == user_id)


def _pseudonyms(cipher: Cipher, user_id: str) -> set[str]:
    """Every name the request log and export lineages may give ``user_id``: its keyed
    pseudonym under each key of the ring (:meth:`Cipher.pseudonym`), and the unkeyed
    SHA-256 forms that versions before keyed pseudonyms wrote (full hex in lineages,
    ``u_`` + 16 hex in the request log), so that erasure still finds those."""
    import hashlib

    digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()
    return {*cipher.pseudonyms(user_id), digest, "u_" + digest[:16]}


def _iso(d: datetime | None) -> str | None:
    return d.isoformat() if d is not None else None


def _open(cipher: Cipher, blob: bytes | None, name: str, unreadable: list[str]) -> str | None:
    if blob is None:
        return None
    try:
        return cipher.decrypt(blob)
    except DecryptionError:
        unreadable.append(name)
        return None


# ---------------------------------------------------------------------------- access


def export_user(
    ws: Workspace, user_id: str, cipher: Cipher | None = None, *, actor: str = "local"
) -> dict[str, Any]:
    """Everything genloop holds about ``user_id``, texts decrypted (right of access)."""
    user_id = _check_user(user_id)
    cipher = cipher or load_cipher(ws)
    with ws.catalog.session() as s:
        requests = []
        for r in s.scalars(
            select(RequestLog).where(RequestLog.user_id == user_id).order_by(RequestLog.created_at)
        ):
            bad: list[str] = []
            requests.append(
                {
                    "id": r.id,
                    "created_at": _iso(r.created_at),
                    "endpoint": r.endpoint,
                    "model": r.model_name,
                    "model_version": r.model_version,
                    "api_key_id": r.api_key_id,
                    "prompt": _open(cipher, r.prompt_enc, "prompt", bad),
                    "response": _open(cipher, r.response_enc, "response", bad),
                    "params": r.params,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "latency_ms": r.latency_ms,
                    "status": r.status,
                    "flags": r.flags,
                    **({"unreadable": bad} if bad else {}),
                }
            )
        feedback = []
        fb_rows = list(
            s.scalars(select(Feedback).where(_feedback_of(user_id)).order_by(Feedback.id))
        )
        for f in fb_rows:
            bad = []
            feedback.append(
                {
                    "id": f.id,
                    "request_id": f.request_id,
                    "created_at": _iso(f.created_at),
                    "rating": f.rating,
                    "status": f.status,
                    "correction": _open(cipher, f.correction_enc, "correction", bad),
                    "comment": _open(cipher, f.comment_enc, "comment", bad),
                    "exported_to": f.exported_to,
                    **({"unreadable": bad} if bad else {}),
                }
            )
        key_rows = list(s.scalars(select(ApiKey).where(ApiKey.user_id == user_id)))
        key_ids = [k.id for k in key_rows]
        usage = [
            {
                "api_key_id": u.api_key_id,
                "model": u.model_name,
                "model_version": u.model_version,
                "hour": _iso(u.hour),
                "requests": u.requests,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
            }
            for u in s.scalars(
                select(Usage).where(Usage.api_key_id.in_(key_ids)).order_by(Usage.hour)
            )
        ]
        affected = _affected_versions(s, user_id, _pseudonyms(cipher, user_id))
        versions = [
            {"id": v.id, "ref": f"{v.dataset.name}@{v.version}", "status": v.status}
            for v in s.scalars(select(DatasetVersion).where(DatasetVersion.id.in_(affected)))
        ]
        from genloop.security.keys import _info

        keys = [_info(k).to_dict() for k in key_rows]
        request_ids = {str(r["id"]) for r in requests}
        audit.record(s, actor, "privacy.export", f"user:{cipher.pseudonym(user_id)}")
    matcher = _LineMatcher(user_id, _pseudonyms(cipher, user_id), request_ids, ())
    log_lines = [entry for _, entry in _matching_log_entries(ws.root / LOGS_DIR, matcher)]
    return {
        "user_id": user_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "requests": requests,
        "feedback": feedback,
        "api_keys": keys,
        "usage": usage,
        "dataset_versions": versions,
        "log_lines": log_lines,
    }


# ---------------------------------------------------------------------------- erasure


def _lineage_ids(value: Any) -> Iterator[int]:
    """Dataset version ids a lineage names as its inputs (parents, feedback sets)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("parents", "dataset_version_ids", "dataset_version_id", FEEDBACK_DATASET_TAG):
                if isinstance(v, int) and not isinstance(v, bool):
                    yield v
                elif isinstance(v, list):
                    yield from (x for x in v if isinstance(x, int) and not isinstance(x, bool))
            else:
                yield from _lineage_ids(v)
    elif isinstance(value, list):
        for v in value:
            yield from _lineage_ids(v)


def _affected_versions(s: Session, user_id: str, names: set[str]) -> set[int]:
    """Dataset versions holding the user's data: built from their feedback (or feedback
    on their requests, which quotes their prompts), and every version built from those.

    A feedback export's lineage says which rows it kept and whose they were; a version
    some of those rows point at (``exported_to``) without such a lineage counts too.
    ``names`` are the user's pseudonyms (:func:`_pseudonyms`).
    """
    user_requests = select(RequestLog.id).where(RequestLog.user_id == user_id)
    fb_filter = _feedback_of(user_id) | Feedback.request_id.in_(user_requests)
    fb_ids = set(s.scalars(select(Feedback.id).where(fb_filter)))
    pointed = {v for v in s.scalars(select(Feedback.exported_to).where(fb_filter)) if v}
    rows = [
        (vid, lineage or {})
        for vid, lineage in s.execute(select(DatasetVersion.id, DatasetVersion.lineage))
    ]
    found: set[int] = set()
    for vid, lineage in rows:
        hashes = lineage.get("feedback_user_hashes")
        if isinstance(hashes, list) and names.intersection(hashes):
            found.add(vid)
        elif lineage.get("source") == "feedback" and "kept_ids" in lineage:
            if fb_ids & set(lineage.get("kept_ids") or []):
                found.add(vid)
        elif vid in pointed:
            found.add(vid)
    # whatever was built from an affected version is affected too (to a fixed point)
    grew = True
    while grew:
        grew = False
        for vid, lineage in rows:
            if vid not in found and found & set(_lineage_ids(lineage)):
                found.add(vid)
                grew = True
    return found


def _user_texts(s: Session, cipher: Cipher, user_id: str) -> list[str]:
    """The user's stored texts, decrypted, long enough to search the logs for."""
    texts: set[str] = set()
    user_requests = select(RequestLog.id).where(RequestLog.user_id == user_id)
    for p, r in s.execute(
        select(RequestLog.prompt_enc, RequestLog.response_enc).where(RequestLog.user_id == user_id)
    ):
        texts.update(t for t in (_try(cipher, p), _try(cipher, r)) if t)
    for c, m in s.execute(
        select(Feedback.correction_enc, Feedback.comment_enc).where(
            _feedback_of(user_id) | Feedback.request_id.in_(user_requests)
        )
    ):
        texts.update(t for t in (_try(cipher, c), _try(cipher, m)) if t)
    out: set[str] = set()
    for text in texts:
        # logs may keep a text's lines apart, or quote what the user wrote in a chat
        for piece in [text, *text.splitlines(), *_user_turns(text)]:
            if len(piece.strip()) >= MIN_TEXT_MATCH:
                out.add(piece.strip())
    return sorted(out)


def _user_turns(text: str) -> list[str]:
    """What the user wrote in a chat logged as JSON messages (not the shared system
    prompt, which would match other users' lines)."""
    if not text.startswith(("[", "{")):
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list):
        return []
    return [
        m["content"]
        for m in data
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
    ]


def _try(cipher: Cipher, blob: bytes | None) -> str | None:
    if blob is None:
        return None
    try:
        return cipher.decrypt(blob)
    except DecryptionError:
        return None


def _rows(s: Session, statement: Any) -> int:
    """Rows a DELETE removed."""
    return int(getattr(s.execute(statement), "rowcount", 0) or 0)


def _sqlite_secure_delete(s: Session) -> None:
    if s.get_bind().dialect.name == "sqlite":
        s.connection().exec_driver_sql("PRAGMA secure_delete=ON")


def _checkpoint_sqlite(ws: Workspace) -> None:
    """Move the overwritten pages into the database file and empty the write-ahead log."""
    if ws.catalog.backend == "sqlite":
        with ws.catalog.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def erase_user(
    ws: Workspace, user_id: str, actor: str = "local", *, cipher: Cipher | None = None
) -> dict[str, int]:
    """Remove what genloop holds about ``user_id`` (right to erasure); counts per place.

    Safe to run again: a second run finds nothing more (and finishes a run that stopped).
    """
    from genloop.security import keys as keys_module

    user_id = _check_user(user_id)
    cipher = cipher or load_cipher(ws)
    with ws.catalog.session() as s:
        request_ids = set(s.scalars(select(RequestLog.id).where(RequestLog.user_id == user_id)))
        texts = _user_texts(s, cipher, user_id)
    names = _pseudonyms(cipher, user_id)
    matcher = _LineMatcher(user_id, names, request_ids, texts)
    counts = {"log_lines": 0, "log_files": 0}
    _add(counts, _scrub_logs(ws.root / LOGS_DIR, matcher))  # before: nothing is lost if we stop

    now = datetime.now(UTC)
    with ws.catalog.session(write_lock=True) as s:
        _sqlite_secure_delete(s)
        user_requests = select(RequestLog.id).where(RequestLog.user_id == user_id)
        affected = _affected_versions(s, user_id, names)
        counts["feedback"] = _rows(s, delete(Feedback).where(_feedback_of(user_id)))
        counts["feedback_on_user_requests"] = _rows(
            s, delete(Feedback).where(Feedback.request_id.in_(user_requests))
        )
        counts["requests"] = _rows(s, delete(RequestLog).where(RequestLog.user_id == user_id))
        versions = list(s.scalars(select(DatasetVersion).where(DatasetVersion.id.in_(affected))))
        artifacts = []
        for v in versions:
            lineage = dict(v.lineage or {})
            hashes = lineage.get("feedback_user_hashes")
            if isinstance(hashes, list) and names.intersection(hashes):
                lineage["feedback_user_hashes"] = [h for h in hashes if h not in names]
            if v.status != EXCLUDED:
                lineage["excluded"] = {"reason": "privacy erasure", "at": now.isoformat()}
                v.status = EXCLUDED
            v.lineage = lineage
            artifacts.append(v.artifact)
        counts["dataset_versions_excluded"] = len(versions)
        # other users' rows in an excluded set are free for the next export
        s.execute(
            update(Feedback).where(Feedback.exported_to.in_(affected)).values(exported_to=None)
        )
        flagged = 0
        for mv in s.scalars(select(ModelVersion)):
            tags = dict(mv.tags or {})
            if (
                mv.dataset_version_id in affected or tags.get(FEEDBACK_DATASET_TAG) in affected
            ) and (not tags.get(TRAINED_ON_EXCLUDED_TAG)):
                mv.tags = tags | {TRAINED_ON_EXCLUDED_TAG: True}
                flagged += 1
        counts["model_versions_flagged"] = flagged
        user_keys = list(s.scalars(select(ApiKey).where(ApiKey.user_id == user_id)))
        for k in user_keys:
            if k.revoked_at is None:
                k.revoked_at = now
            k.user_id = None
        counts["api_keys_revoked"] = len(user_keys)
        summary = {k: v for k, v in counts.items() if k not in ("log_lines", "log_files")}
        audit.record(s, actor, "privacy.erase", f"user:{cipher.pseudonym(user_id)}", **summary)
    keys_module.clear_cache()

    counts["artifacts_deleted"] = 0
    for key in artifacts:
        if ws.store.exists(key):
            ws.store.delete(key)
            counts["artifacts_deleted"] += 1
    _add(counts, _scrub_logs(ws.root / LOGS_DIR, matcher))  # lines written meanwhile
    _checkpoint_sqlite(ws)
    return counts


def was_erased(ws: Workspace, user_id: str, cipher: Cipher | None = None) -> list[datetime]:
    """When ``user_id`` was erased, from the audit log (needs the key that named them)."""
    cipher = cipher or load_cipher(ws)
    targets = [f"user:{p}" for p in cipher.pseudonyms(_check_user(user_id))]
    with ws.catalog.session() as s:
        return list(
            s.scalars(
                select(AuditEvent.at)
                .where(AuditEvent.action == "privacy.erase", AuditEvent.target.in_(targets))
                .order_by(AuditEvent.at)
            )
        )


def _add(counts: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        counts[k] = counts.get(k, 0) + v


# ---------------------------------------------------------------------------- retention


def purge_expired(
    ws: Workspace, retention_days: int, *, actor: str = "local", now: datetime | None = None
) -> dict[str, int]:
    """Delete requests, feedback and daily request-log files older than the retention
    period. Usage counters and the audit log hold no content and are kept."""
    if isinstance(retention_days, bool) or not isinstance(retention_days, int):
        raise ConfigError("retention_days must be a whole number of days")
    if retention_days < 1:
        raise ConfigError("retention_days must be at least 1")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    counts: dict[str, int] = {}
    with ws.catalog.session(write_lock=True) as s:
        _sqlite_secure_delete(s)
        old_requests = select(RequestLog.id).where(RequestLog.created_at < cutoff)
        counts["feedback"] = _rows(
            s,
            delete(Feedback).where(
                (Feedback.created_at < cutoff) | Feedback.request_id.in_(old_requests)
            ),
        )
        counts["requests"] = _rows(s, delete(RequestLog).where(RequestLog.created_at < cutoff))
    counts["log_files"] = 0
    logs = ws.root / LOGS_DIR
    if logs.is_dir():
        for path in sorted(logs.rglob("*.jsonl")):
            m = _DAILY_LOG.search(path.name)
            if m is None or path.is_symlink():
                continue
            try:
                day = datetime.strptime(m.group(1), "%Y-%m-%d").replace(tzinfo=UTC)
            except ValueError:
                continue
            if day + timedelta(days=1) <= cutoff:  # the whole day is past the cutoff
                path.unlink()
                counts["log_files"] += 1
    with ws.catalog.session() as s:
        audit.record(
            s, actor, "privacy.purge", f"before:{cutoff.isoformat()}", days=retention_days, **counts
        )
    _checkpoint_sqlite(ws)
    return counts


def count_user_rows(ws: Workspace, user_id: str) -> dict[str, int]:
    """How many requests and feedback rows hold ``user_id`` (for confirmations)."""
    with ws.catalog.session() as s:
        return {
            "requests": s.scalar(
                select(func.count()).select_from(RequestLog).where(RequestLog.user_id == user_id)
            )
            or 0,
            "feedback": s.scalar(
                select(func.count()).select_from(Feedback).where(_feedback_of(user_id))
            )
            or 0,
        }


# ---------------------------------------------------------------------------- log files


class _LineMatcher:
    """Whether a log line is about the user: their user id (or a pseudonym the request
    log gives it), one of their request ids, or one of their texts (raw or as JSON
    writes it)."""

    def __init__(
        self, user_id: str, names: set[str], request_ids: Iterable[str], texts: Iterable[str]
    ) -> None:
        self.user_id = user_id
        self.user_values = {user_id, *names}
        self.request_ids = set(request_ids)
        variants: set[str] = set()
        for t in texts:
            variants.add(t)
            variants.add(json.dumps(t, ensure_ascii=False)[1:-1])
            variants.add(json.dumps(t)[1:-1])
        self._texts = (
            re.compile("|".join(map(re.escape, sorted(variants, key=len, reverse=True))))
            if variants
            else None
        )

    def matches(self, line: str, entry: Any) -> bool:
        if self._texts is not None and self._texts.search(line):
            return True
        if entry is None:  # not JSON: the user id as a quoted string is enough
            return json.dumps(self.user_id) in line
        return self._about_user(entry)

    def _about_user(self, value: Any) -> bool:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in _USER_FIELDS and isinstance(v, str) and v in self.user_values:
                    return True
                if k in _REQUEST_FIELDS and isinstance(v, str) and v in self.request_ids:
                    return True
                if isinstance(v, dict | list) and self._about_user(v):
                    return True
        elif isinstance(value, list):
            return any(self._about_user(v) for v in value)
        return False


def _log_files(logs: Path) -> list[Path]:
    if not logs.is_dir():
        return []
    return sorted(p for p in logs.rglob("*.jsonl") if p.is_file() and not p.is_symlink())


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _matching_log_entries(logs: Path, matcher: _LineMatcher) -> Iterator[tuple[Path, Any]]:
    for path in _log_files(logs):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                entry = _parse(line)
                if matcher.matches(line, entry):
                    yield path, entry if entry is not None else line.rstrip("\n")


def _scrub_logs(logs: Path, matcher: _LineMatcher) -> dict[str, int]:
    """Rewrite each log file without the user's lines (atomically, mode kept)."""
    removed = files = 0
    for path in _log_files(logs):
        n = _scrub_file(path, matcher)
        if n:
            removed += n
            files += 1
    return {"log_lines": removed, "log_files": files}


def _scrub_file(path: Path, matcher: _LineMatcher) -> int:
    """Drop matching lines from ``path``; 0 (file untouched) when none match.

    The new file replaces the old by rename, so a writer that opens the file for each line
    (genloop's request log does) continues in the new one. Lines appended while this runs
    are carried over; a writer that takes ``flock(LOCK_SH)`` to append is excluded for the
    few milliseconds of the swap.
    """
    import fcntl

    with path.open("rb") as src:
        first = src.read()
    kept, removed = _filter(first, matcher)
    if not removed:
        return 0
    tmp = path.with_name(f".{path.name}.erase.tmp")
    mode = path.stat().st_mode & 0o777
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(kept)
            with path.open("rb") as src:
                fcntl.flock(src.fileno(), fcntl.LOCK_EX)
                try:
                    src.seek(len(first))
                    more, more_removed = _filter(src.read(), matcher)  # appended meanwhile
                    out.write(more)
                    out.flush()
                    os.fsync(out.fileno())
                    os.replace(tmp, path)
                finally:
                    fcntl.flock(src.fileno(), fcntl.LOCK_UN)
        return removed + more_removed
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _filter(data: bytes, matcher: _LineMatcher) -> tuple[bytes, int]:
    kept: list[bytes] = []
    removed = 0
    for raw in data.splitlines(keepends=True):
        line = raw.decode("utf-8", errors="replace")
        if matcher.matches(line, _parse(line)):
            removed += 1
        else:
            kept.append(raw)
    return b"".join(kept), removed

"""What each served request leaves behind: a catalog row, a usage count, a log line.

:func:`record_request` is called by the server once per API request, after the response
(off the event loop: it writes to the database and a file). It

1. computes the request's drift features (``genloop.monitor.drift``): numbers only, so
   monitoring never needs the text;
2. writes the ``requests`` row: prompt and response encrypted with the workspace key when
   text storage is on (``security.store_requests``), absent otherwise; the parameters with
   strings redacted and secrets dropped;
3. adds the request to its hourly ``usage`` bucket (per key, model and version), with an
   update-then-insert that is safe with concurrent writers on SQLite and PostgreSQL;
4. appends one JSON line to ``<workspace>/logs/requests-YYYY-MM-DD.jsonl`` and to the
   ``genloop.requests`` logger: ids, model, counts, latency, status, guardrail flags.
   Never the key (its id and public prefix only), never text, and the user id as a hash.

Requests refused before they reached a model (a bad key, an unknown route, a body too
large, a rate limit …) are recorded too, by the server's outermost layer
(:mod:`genloop.serve.http_metrics`), as *rejected* records: a ``requests`` row with the
route template as its endpoint, no model (``model_name`` ``""``), the status, the latency
and ``params`` holding only the method, a short reason word and the presented key's
public prefix, never a body, a header or a secret. They add no drift features and no
usage (usage is what models served).
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.exc import OperationalError

from genloop.errors import GenloopError
from genloop.workspace.tables import ApiKey, RequestLog, Usage, utcnow
from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

MAX_PARAM_STRING = 500
MAX_PARAM_ITEMS = 64
USAGE_GROUPS = ("key", "model", "version")
MAX_SINCE_DAYS = 36500
# Parameter names whose values are never stored, whatever they look like.
_SECRET_NAME = re.compile(r"(?i)(api[_-]?key|authorization|password|passwd|secret|token$)")


class Cipher(Protocol):
    def encrypt(self, text: str) -> bytes: ...

    def pseudonym(self, value: str) -> str: ...


@dataclass
class RequestRecord:
    """One finished API request, as the server hands it to :func:`record_request`."""

    request_id: str
    endpoint: str  # "chat.completions", "completions", "images.generations" …
    model_name: str
    model_version: int | None = None
    api_key_id: int | None = None
    key_prefix: str | None = None  # the key's public prefix; never the key
    user_id: str | None = None
    prompt: str = ""
    response: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # sampling settings
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float | None = None
    status: int = 200
    flags: list[str] = field(default_factory=list)  # guardrail flags
    mean_logprob: float | None = None  # mean log-probability per generated token
    finish_reason: str | None = None
    prompt_ids: Sequence[int] | None = None  # when known, spares tokenizing the prompt again
    output_ids: Sequence[int] | None = None
    created_at: datetime | None = None  # default: now
    # refused before reaching a model (the endpoint is then the route template)
    rejected: bool = False
    method: str | None = None  # rejected records: the HTTP method
    reason: str | None = None  # rejected records: a short stable word (unauthorized …)


def _redactor(guardrails: Any) -> Callable[[str], str]:
    """The guardrails' ``redact`` (which follows ``security.guardrails.redact_pii_in_logs``)
    when given, else every PII kind; credentials are removed either way."""
    from genloop.security.pii import redact

    custom = getattr(guardrails, "redact", None)
    if not callable(custom):
        return redact

    def both(text: str) -> str:
        out = custom(text)
        return redact(out if isinstance(out, str) else text, kinds=("secret",))

    return both


def sanitize(value: Any, redact: Callable[[str], str], depth: int = 0) -> Any:
    """``value`` made safe to store in the clear: strings redacted and cut, secrets
    dropped by name, containers bounded, non-finite numbers as None."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return redact(value[: MAX_PARAM_STRING * 2])[:MAX_PARAM_STRING]
    if depth >= 4:
        return None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in list(value.items())[:MAX_PARAM_ITEMS]:
            name = redact(str(k))[:64]
            out[name] = "<SECRET>" if _SECRET_NAME.search(name) else sanitize(v, redact, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [sanitize(v, redact, depth + 1) for v in value[:MAX_PARAM_ITEMS]]
    return redact(str(value))[:MAX_PARAM_STRING]


def user_hash(user_id: str | None, cipher: Cipher | None) -> str | None:
    """The request log's stand-in for a user id (the id itself may be an email): the
    workspace's keyed pseudonym (:meth:`Cipher.pseudonym`), which cannot be tested against
    a list of guessed ids without the key. None without a user id or without a key ring."""
    if not user_id or cipher is None:
        return None
    return cipher.pseudonym(user_id)


def record_request(
    ws: Workspace,
    cipher: Cipher | None,
    record: RequestRecord,
    *,
    store_text: bool,
    guardrails: Any = None,
) -> dict[str, Any]:
    """Store ``record`` (row, usage bucket, log line); returns the log line's fields."""
    return record_requests(ws, cipher, [record], store_text=store_text, guardrails=guardrails)[0]


def record_requests(
    ws: Workspace,
    cipher: Cipher | None,
    records: Sequence[RequestRecord],
    *,
    store_text: bool,
    guardrails: Any = None,
) -> list[dict[str, Any]]:
    """Store several records in one transaction (one commit, one fsync, each usage bucket
    bumped once); returns their log lines' fields. All or none are stored."""
    from genloop.monitor.logs import write_request_line

    if store_text and cipher is None:
        raise GenloopError("storing request text needs the workspace encryption key")
    if not records:
        return []
    redact = _redactor(guardrails)
    rows: list[RequestLog] = []
    entries: list[dict[str, Any]] = []
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for record in records:
        row, entry = _prepare(ws, cipher if store_text else None, record, redact)
        rows.append(row)
        entries.append(entry)
        if record.rejected:  # nothing was served: no usage
            continue
        hour = row.created_at.replace(minute=0, second=0, microsecond=0)
        key = (record.api_key_id, record.model_name, record.model_version, hour)
        counts = buckets.setdefault(key, [0, 0, 0])
        counts[0] += 1
        counts[1] += record.prompt_tokens
        counts[2] += record.completion_tokens

    with ws.catalog.session(write_lock=True) as s:
        s.add_all(rows)
        s.flush()
        # a fixed order, so concurrent writers lock buckets in the same order (no deadlock)
        for key in sorted(buckets, key=lambda k: (k[0] or 0, k[1], k[2] or 0, k[3])):
            _add_usage(s, ws.catalog.backend, key, buckets[key])
    for row, entry in zip(rows, entries, strict=True):
        write_request_line(ws.root, entry, row.created_at)
    return entries


def _prepare(
    ws: Workspace, cipher: Cipher | None, record: RequestRecord, redact: Callable[[str], str]
) -> tuple[RequestLog, dict[str, Any]]:
    """The ``requests`` row and the log line of one record."""
    from genloop.monitor.drift import featurizer_for, request_features

    at = record.created_at or utcnow()
    if record.rejected:
        return _prepare_rejected(record, at, redact)
    ok = record.status < 400
    features = request_features(
        featurizer_for(ws, record.model_name, record.model_version) if ok else None,
        prompt=record.prompt,
        response=record.response,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        prompt_ids=record.prompt_ids,
        output_ids=record.output_ids,
        mean_logprob=record.mean_logprob,
    )
    params: dict[str, Any] = sanitize(dict(record.params), redact)
    params["features"] = features
    if record.finish_reason is not None:
        params["finish_reason"] = record.finish_reason
    flags = [redact(str(f))[:64] for f in record.flags]
    row = RequestLog(
        id=record.request_id,
        api_key_id=record.api_key_id,
        user_id=record.user_id,
        endpoint=record.endpoint,
        model_name=record.model_name,
        model_version=record.model_version,
        prompt_enc=cipher.encrypt(record.prompt) if cipher is not None else None,
        response_enc=cipher.encrypt(record.response) if cipher is not None else None,
        params=params,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        latency_ms=record.latency_ms,
        status=record.status,
        flags=flags,
        created_at=at,
    )
    model = record.model_name + (f"@{record.model_version}" if record.model_version else "")
    entry = {
        "ts": at.isoformat(timespec="milliseconds"),
        "request_id": redact(record.request_id)[:64],
        "key_id": record.api_key_id,
        "key_prefix": record.key_prefix,
        "user": user_hash(record.user_id, cipher),
        "endpoint": record.endpoint,
        "model": model,
        "status": record.status,
        "finish_reason": record.finish_reason,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_ms": None if record.latency_ms is None else round(record.latency_ms, 2),
        "flags": flags,
    }
    return row, entry


def _prepare_rejected(
    record: RequestRecord, at: datetime, redact: Callable[[str], str]
) -> tuple[RequestLog, dict[str, Any]]:
    """The row and log line of a refused request: where, how, why, how long; nothing sent."""
    params = {
        "rejected": True,
        "method": (record.method or "")[:16],
        "reason": (record.reason or "")[:32],
        "key_prefix": record.key_prefix,
    }
    row = RequestLog(
        id=record.request_id,
        api_key_id=record.api_key_id,
        endpoint=record.endpoint[:64],
        model_name=record.model_name[:128],
        params=params,
        latency_ms=record.latency_ms,
        status=record.status,
        flags=[],
        created_at=at,
    )
    entry = {
        "ts": at.isoformat(timespec="milliseconds"),
        "request_id": redact(record.request_id)[:64],
        "key_id": record.api_key_id,
        "key_prefix": record.key_prefix,
        "endpoint": row.endpoint,
        "model": record.model_name,
        "method": params["method"],
        "status": record.status,
        "reason": params["reason"],
        "rejected": True,
        "latency_ms": None if record.latency_ms is None else round(record.latency_ms, 2),
    }
    return row, entry


def _add_usage(s: Any, backend: str, key: tuple[Any, ...], counts: list[int]) -> None:
    """Add ``counts`` (requests, prompt tokens, completion tokens) to an hourly bucket."""
    api_key_id, model_name, model_version, hour = key
    requests, prompt_tokens, completion_tokens = counts
    where = [
        Usage.model_name == model_name,
        Usage.hour == hour,
        Usage.api_key_id.is_(None) if api_key_id is None else Usage.api_key_id == api_key_id,
        Usage.model_version.is_(None)
        if model_version is None
        else Usage.model_version == model_version,
    ]
    bump = (
        update(Usage)
        .where(*where)
        .values(
            requests=Usage.requests + requests,
            prompt_tokens=Usage.prompt_tokens + prompt_tokens,
            completion_tokens=Usage.completion_tokens + completion_tokens,
        )
    )
    if s.execute(bump).rowcount:
        return
    row = Usage(
        api_key_id=api_key_id,
        model_name=model_name,
        model_version=model_version,
        hour=hour,
        requests=requests,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    if backend == "sqlite":  # the transaction holds the write lock: no one can race us
        s.add(row)
        s.flush()
        return
    try:
        with s.begin_nested():  # a savepoint: a lost race rolls back only the insert
            s.add(row)
    except DBIntegrityError:  # another replica created the bucket first
        s.execute(bump)


class RequestRecorder:
    """Records requests from a background thread, in batches.

    The server calls :meth:`submit` once per request (cheap, never touches the database
    or the tokenizer); the thread writes what is queued every ``flush_s`` seconds (or at
    ``max_batch`` records) with :func:`record_requests`: one transaction per batch instead
    of one per request, which on SQLite (one fsync per commit) is the difference between
    about 100 and several thousand requests a second. A batch that fails is retried one
    record at a time, so one bad record (a duplicate id) loses only itself. While the
    catalog cannot be reached (PostgreSQL restarting), records are held, up to
    ``max_queue``, and written first once it answers again. ``max_per_flush`` caps what
    the thread writes per ``flush_s`` (the records of refused requests: a flood of them
    must not keep the catalog busy); what cannot wait is dropped at ``max_queue``.
    """

    def __init__(
        self,
        ws: Workspace,
        cipher: Cipher | None,
        *,
        store_text: bool,
        guardrails: Any = None,
        flush_s: float = 0.5,
        max_batch: int = 500,
        max_queue: int = 50_000,
        max_per_flush: int | None = None,
        on_recorded: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        if store_text and cipher is None:
            raise GenloopError("storing request text needs the workspace encryption key")
        self.ws = ws
        self.cipher = cipher
        self.store_text = store_text
        self.guardrails = guardrails
        self.flush_s = flush_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_per_flush = max_per_flush
        self.on_recorded = on_recorded
        self._queue: queue.Queue[RequestRecord] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._held: list[RequestRecord] = []  # the catalog was unreachable: written first
        self._unreachable = False
        self.dropped = 0
        self.failed = 0
        self._full = False

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="genloop-request-recorder", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush()
        if self._held:
            self.dropped += len(self._held)
            log.error("catalog unreachable at stop: %d request(s) not recorded", len(self._held))
            self._held = []

    def submit(self, record: RequestRecord) -> bool:
        """Queue ``record`` (any thread); False when it was dropped: a full queue drops it
        with a logged error (the first of each run of drops) rather than block a response."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if not self._full:  # a flood must not become a flood of log lines
                log.error("request log queue full: request %s not recorded", record.request_id)
            self._full = True
            return False
        self._full = False
        return True

    def flush(self, limit: int | None = None) -> int:
        """Write everything queued now (in the calling thread), or about ``limit`` records
        at most; returns how many. When it returns (without a limit), every record
        submitted before the call is in the catalog (or failed, or is held because the
        catalog is unreachable)."""
        written = 0
        with self._flush_lock:  # also waits for a batch the thread is writing
            while limit is None or written < limit:
                batch, self._held = self._held[: self.max_batch], self._held[self.max_batch :]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:
                    return written
                done, held = self._write(batch)
                written += done
                if held:  # the catalog is down: try again at the next flush
                    self._hold(held)
                    return written
            return written

    async def aflush(self) -> int:
        """:meth:`flush` from async code (e.g. before feedback links to a request)."""
        import asyncio

        return await asyncio.to_thread(self.flush)

    def _write(self, batch: list[RequestRecord]) -> tuple[int, list[RequestRecord]]:
        """Write ``batch``: how many were written, and those to hold (catalog unreachable)."""
        kw = {"store_text": self.store_text, "guardrails": self.guardrails}
        held: list[RequestRecord] = []
        try:
            record_requests(self.ws, self.cipher, batch, **kw)
            done = batch
        except OperationalError:
            done, held = [], batch
        except Exception:
            done = []
            for i, record in enumerate(batch):  # find the bad one(s); keep the rest
                try:
                    record_requests(self.ws, self.cipher, [record], **kw)
                    done.append(record)
                except OperationalError:
                    held = batch[i:]
                    break
                except Exception as exc:
                    self.failed += 1
                    log.error("request %s not recorded: %s", record.request_id, type(exc).__name__)
        if done and self._unreachable:
            log.warning("catalog reachable again: writing held request records")
            self._unreachable = False
        if self.on_recorded is not None:
            for record in done:
                self.on_recorded(record)
        return len(done), held

    def _hold(self, records: list[RequestRecord]) -> None:
        if not self._unreachable:
            self._unreachable = True
            log.warning("catalog unreachable: holding request records until it answers")
        self._held = records + self._held
        excess = len(self._held) - self.max_queue
        if excess > 0:  # bounded: the oldest go first
            self.dropped += excess
            self._held = self._held[excess:]
            log.error("catalog unreachable: %d request(s) not recorded (hold full)", excess)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush(self.max_per_flush)
            except Exception:
                log.exception("request recorder: flush failed; retrying")


def usage_summary(
    ws: Workspace, since: timedelta, by: Sequence[str] = ("key", "model")
) -> list[dict[str, Any]]:
    """Requests and tokens since ``now - since`` (whole hours), grouped ``by`` any of
    ``key``, ``model``, ``version``; biggest first."""
    unknown = [b for b in by if b not in USAGE_GROUPS]
    if unknown or not by:
        raise GenloopError(
            f"usage can be grouped by {', '.join(USAGE_GROUPS)}; not {', '.join(unknown) or '—'}"
        )
    start = (utcnow() - since).replace(minute=0, second=0, microsecond=0)
    cols: list[Any] = []
    if "key" in by:
        cols += [Usage.api_key_id, ApiKey.name, ApiKey.prefix]
    if "model" in by:
        cols.append(Usage.model_name)
    if "version" in by:
        cols.append(Usage.model_version)
    requests = func.sum(Usage.requests)
    query = (
        select(
            *cols,
            requests,
            func.sum(Usage.prompt_tokens),
            func.sum(Usage.completion_tokens),
        )
        .where(Usage.hour >= start)
        .group_by(*cols)
        .order_by(requests.desc())
    )
    if "key" in by:
        query = query.outerjoin(ApiKey, ApiKey.id == Usage.api_key_id)
    out: list[dict[str, Any]] = []
    with ws.catalog.session() as s:
        for row in s.execute(query):
            values = list(row)
            item: dict[str, Any] = {}
            if "key" in by:
                item["key_id"], item["key_name"], item["key_prefix"] = values[:3]
                values = values[3:]
            if "model" in by:
                item["model"] = values.pop(0)
            if "version" in by:
                item["version"] = values.pop(0)
            req, prompt, completion = (int(v or 0) for v in values)
            item |= {
                "requests": req,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            out.append(item)
    return out


def hourly_usage(ws: Workspace, since: datetime, model: str | None = None) -> list[dict[str, Any]]:
    """The hourly usage buckets from the hour of ``since`` on (of one model, or all), by
    hour, model and version; each with its key's id and public prefix."""
    query = (
        select(Usage, ApiKey.prefix)
        .outerjoin(ApiKey, ApiKey.id == Usage.api_key_id)
        .where(Usage.hour >= since.replace(minute=0, second=0, microsecond=0))
        .order_by(Usage.hour, Usage.model_name, Usage.model_version)
    )
    if model is not None:
        query = query.where(Usage.model_name == model)
    with ws.catalog.session() as s:
        return [
            {
                "hour": row.hour.isoformat() if row.hour is not None else None,
                "model": row.model_name,
                "version": row.model_version,
                "api_key_id": row.api_key_id,
                "key_prefix": prefix,
                "requests": row.requests,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
            }
            for row, prefix in s.execute(query).all()
        ]


def parse_since(text: str) -> timedelta:
    """``30m``, ``24h``, ``7d``, ``2w`` → a timedelta (a clear error otherwise)."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*([smhdw])\s*", text)
    if not m or int(m.group(1)) == 0:
        raise GenloopError(
            f"invalid duration {text!r}: a positive number and a unit, e.g. 30m, 24h, 7d, 2w"
        )
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    if seconds > MAX_SINCE_DAYS * 86400:
        raise GenloopError(f"invalid duration {text!r}: at most {MAX_SINCE_DAYS} days")
    return timedelta(seconds=seconds)

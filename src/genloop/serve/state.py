"""What one server process holds: the workspace, its config, the loaded models and the
security and monitoring parts every route uses. ``app.state.server`` is a ServerState."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from genloop.serve.errors import ApiError

if TYPE_CHECKING:
    from genloop.config import GenloopConfig
    from genloop.monitor.metrics import ServingMetrics
    from genloop.monitor.usage import RequestRecord
    from genloop.security.crypto import Cipher
    from genloop.security.guardrails import Guardrails
    from genloop.security.keys import Principal
    from genloop.security.ratelimit import RateLimiter, Reservation
    from genloop.serve.models import ModelManager
    from genloop.serve.upstream import UpstreamRouter
    from genloop.workspace import Workspace

log = logging.getLogger(__name__)


REJECTED_PER_FLUSH = 1000  # refused requests written per flush (every 0.5 s)


class UsageRecorder:
    """Writes request records off the event loop, in batches (``monitor.usage.RequestRecorder``).

    One transaction per batch instead of one per request: besides the commits it saves,
    the ORM work holds the GIL, which the engine thread needs back after every tensor op,
    so writing each request on its own slows decoding itself under load.

    Feedback can follow a response within milliseconds, so the feedback route calls
    :meth:`flush` first: the ``requests`` row it links to is then written.

    Refused requests (:meth:`submit_rejected`) have a writer and a queue of their own,
    smaller (``max_rejected``), written at most ``REJECTED_PER_FLUSH`` per half second: a
    flood of 401s fills only that queue and costs the catalog a bounded number of writes;
    the overflow is dropped and counted, and the records of served requests get through.
    :meth:`flush` (which the feedback route awaits) leaves them to their writer.
    """

    def __init__(
        self,
        ws: Workspace,
        cipher: Cipher,
        *,
        store_text: bool,
        guardrails: Guardrails,
        max_rejected: int = 10_000,
    ) -> None:
        from genloop.monitor.usage import RequestRecorder

        self._recorder = RequestRecorder(ws, cipher, store_text=store_text, guardrails=guardrails)
        self._rejected = RequestRecorder(
            ws,
            None,
            store_text=False,
            max_queue=max_rejected,
            max_batch=REJECTED_PER_FLUSH,
            max_per_flush=REJECTED_PER_FLUSH,
        )
        self._recorder.start()
        self._rejected.start()

    def submit(self, record: RequestRecord) -> None:
        from genloop.serve.http_metrics import mark_recorded

        mark_recorded()  # the HTTP layer then leaves this request to us
        self._recorder.submit(record)

    def submit_rejected(self, record: RequestRecord) -> bool:
        """Queue a refused request's record; False when the queue was full (dropped)."""
        return self._rejected.submit(record)

    @property
    def rejected_dropped(self) -> int:
        return self._rejected.dropped

    async def flush(self) -> None:
        await self._recorder.aflush()

    def close(self) -> None:
        """Write what is queued, then stop the writer threads."""
        self._recorder.stop()
        self._rejected.stop()


@dataclass
class ServerState:
    ws: Workspace
    cfg: GenloopConfig
    models: ModelManager
    upstreams: UpstreamRouter
    metrics: ServingMetrics
    guardrails: Guardrails
    cipher: Cipher
    recorder: UsageRecorder
    limiter: RateLimiter | None = None
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    async def check_rate(
        self, principal: Principal, *, requests: int = 0, tokens: int = 0, strict: bool = True
    ) -> Reservation | None:
        """Take from the key's limits (serve.rate_limit, overridden by the key's own): 429
        with Retry-After naming the limit that refused; 503 when they cannot be checked
        (Redis down, fail_closed, ``strict``). The reservation is for :meth:`settle`."""
        if self.limiter is None or (requests == 0 and tokens == 0):
            return None
        from genloop.security.ratelimit import LimiterUnavailable

        limits = self.limiter.limits.overridden_by(principal.limits)
        try:
            decision = await self.limiter.check(
                f"key:{principal.key_id}",
                requests=requests,
                tokens=tokens,
                limits=limits,
                strict=strict,
            )
        except LimiterUnavailable as exc:
            raise ApiError(
                str(exc), status=503, code="rate_limits_unavailable", retry_after_s=1.0
            ) from None
        if not decision.allowed:
            quota = decision.limit in ("tokens per day", "tokens per month")
            raise ApiError(
                f"rate limit exceeded for key {principal.prefix}… — {decision.message}",
                status=429,
                code="insufficient_quota" if quota else "rate_limit_exceeded",
                retry_after_s=decision.retry_after_s,
            )
        return decision.reservation

    async def settle(self, reservation: Reservation | None, used_tokens: int) -> None:
        """Move a reservation's token windows to what the request really used."""
        if self.limiter is None or reservation is None:
            return
        try:
            await self.limiter.settle(reservation, used_tokens)
        except Exception:  # never fail a finished response over its bookkeeping
            log.exception("could not settle the token reservation of key %s", reservation.key)

    def check_input(self, text: str) -> list[str]:
        """Input guardrails: flags to log, or a 400 when the config says refuse."""
        verdict = self.guardrails.check_input(text)
        if verdict.refused:
            raise ApiError(
                verdict.message or "the request was refused by the input guardrails",
                status=400,
                code="content_refused",
            )
        return list(verdict.flags)


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state

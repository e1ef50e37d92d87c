"""What one server process holds: the workspace, its config, the loaded models and the
security and monitoring parts every route uses. ``app.state.server`` is a ServerState."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
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
    from genloop.security.ratelimit import RateLimiter
    from genloop.serve.models import ModelManager
    from genloop.serve.upstream import UpstreamRouter
    from genloop.workspace import Workspace

log = logging.getLogger(__name__)


class UsageRecorder:
    """Writes request records off the event loop, one at a time, in submission order.

    Feedback can follow a response within milliseconds, so the feedback route calls
    :meth:`flush` first: the ``requests`` row it links to is then written.
    """

    def __init__(
        self, ws: Workspace, cipher: Cipher, *, store_text: bool, guardrails: Guardrails
    ) -> None:
        self.ws = ws
        self.cipher = cipher
        self.store_text = store_text
        self.guardrails = guardrails
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genloop-usage")
        self._pending: set[Future[None]] = set()

    def submit(self, record: RequestRecord) -> None:
        future = self._pool.submit(self._write, record)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _write(self, record: RequestRecord) -> None:
        from genloop.monitor.usage import record_request

        try:
            record_request(
                self.ws,
                self.cipher,
                record,
                store_text=self.store_text,
                guardrails=self.guardrails,
            )
        except Exception:  # a lost usage row must not take the server down
            log.exception("could not record request %s", record.request_id)

    async def flush(self) -> None:
        pending = [asyncio.wrap_future(f) for f in list(self._pending)]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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

    async def check_rate(self, principal: Principal, *, requests: int = 0, tokens: int = 0) -> None:
        """Spend from the key's per-minute budgets; 429 with Retry-After when it is empty."""
        if self.limiter is None or (requests == 0 and tokens == 0):
            return
        decision = await self.limiter.check(
            f"key:{principal.key_id}", requests=requests, tokens=tokens
        )
        if not decision.allowed:
            what = "tokens" if tokens and not requests else "requests"
            raise ApiError(
                f"rate limit exceeded for key {principal.prefix}… ({what} per minute); "
                f"retry in {decision.retry_after_s:.1f}s",
                status=429,
                code="rate_limit_exceeded",
                retry_after_s=decision.retry_after_s,
            )

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

"""Per-key rate limits: token buckets for requests per minute and tokens per minute.

Each key has two buckets. The requests bucket holds up to ``requests_per_min`` and refills
at ``requests_per_min / 60`` per second; the tokens bucket the same with
``tokens_per_min``. :meth:`RateLimiter.check` takes one request (and the tokens known up
front: the prompt's) from both, or from neither, and then says how long to wait
(``retry_after_s``, for the ``Retry-After`` header, rounded up by the caller). Generated
tokens are known only at the end: :meth:`RateLimiter.charge` takes them then, and may
leave the bucket in debt (at most one minute's worth), which later checks wait out. A
request larger than a whole bucket passes when the bucket is full, and leaves it in debt.

:class:`InProcessRateLimiter` keeps the buckets in this process (one server).
:class:`RedisRateLimiter` keeps them in Redis, updated by one Lua script that reads the
Redis server's clock, so replicas share one budget per key and their clocks do not matter.
If Redis cannot be reached the request is let through and a warning is logged (at most
every 30 s): a rate limit protects capacity, it is not what authenticates a caller, and an
outage of Redis should not take the API down with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from genloop.errors import ConfigError

if TYPE_CHECKING:
    from genloop.config import RateLimitConfig

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "genloop:rl:"
MAX_KEYS = 100_000  # in-process buckets kept; idle ones (full again) are dropped first
_WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class RateDecision:
    """``allowed``, or how long to wait; what is left in each bucket (None: no limit)."""

    allowed: bool
    retry_after_s: float = 0.0
    remaining_requests: int | None = None
    remaining_tokens: int | None = None

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` takes whole seconds: rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiter(Protocol):
    async def check(self, key: str, *, requests: int = 1, tokens: int = 0) -> RateDecision: ...

    async def charge(self, key: str, tokens: int) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Limits:
    requests_per_min: int | None
    tokens_per_min: int | None

    @property
    def enabled(self) -> bool:
        return self.requests_per_min is not None or self.tokens_per_min is not None


def _check_amounts(requests: int, tokens: int) -> None:
    if requests < 0 or tokens < 0:
        raise ValueError("requests and tokens must be ≥ 0")


def _bucket_take(
    level: float, capacity: int | None, amount: int
) -> tuple[bool, float]:  # (enough, seconds to wait)
    if capacity is None:
        return True, 0.0
    need = min(amount, capacity)
    if level >= need:
        return True, 0.0
    return False, (need - level) * 60.0 / capacity


class InProcessRateLimiter:
    """Token buckets in this process's memory (thread-safe)."""

    def __init__(
        self,
        requests_per_min: int | None,
        tokens_per_min: int | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = _Limits(requests_per_min, tokens_per_min)
        self._clock = clock
        # key → [requests level, tokens level, last update (monotonic seconds)]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _refilled(self, key: str, now: float) -> list[float]:
        r_cap, t_cap = self.limits.requests_per_min, self.limits.tokens_per_min
        state = self._buckets.get(key)
        if state is None:
            state = [float(r_cap or 0), float(t_cap or 0), now]
            self._buckets[key] = state
            if len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)  # least recently used: full again by now
        else:
            elapsed = max(0.0, now - state[2])
            if r_cap is not None:
                state[0] = min(float(r_cap), state[0] + elapsed * r_cap / 60.0)
            if t_cap is not None:
                state[1] = min(float(t_cap), state[1] + elapsed * t_cap / 60.0)
            state[2] = now
            self._buckets.move_to_end(key)
        return state

    def check_sync(self, key: str, *, requests: int = 1, tokens: int = 0) -> RateDecision:
        _check_amounts(requests, tokens)
        if not self.limits.enabled:
            return RateDecision(True)
        r_cap, t_cap = self.limits.requests_per_min, self.limits.tokens_per_min
        with self._lock:
            state = self._refilled(key, self._clock())
            r_ok, r_wait = _bucket_take(state[0], r_cap, requests)
            t_ok, t_wait = _bucket_take(state[1], t_cap, tokens)
            allowed = r_ok and t_ok
            if allowed:
                state[0] -= requests if r_cap is not None else 0
                state[1] -= tokens if t_cap is not None else 0
            return RateDecision(
                allowed,
                0.0 if allowed else max(r_wait, t_wait),
                max(0, math.floor(state[0])) if r_cap is not None else None,
                max(0, math.floor(state[1])) if t_cap is not None else None,
            )

    def charge_sync(self, key: str, tokens: int) -> None:
        _check_amounts(0, tokens)
        t_cap = self.limits.tokens_per_min
        if t_cap is None or tokens == 0:
            return
        with self._lock:
            state = self._refilled(key, self._clock())
            state[1] = max(-float(t_cap), state[1] - tokens)

    async def check(self, key: str, *, requests: int = 1, tokens: int = 0) -> RateDecision:
        return self.check_sync(key, requests=requests, tokens=tokens)

    async def charge(self, key: str, tokens: int) -> None:
        self.charge_sync(key, tokens)

    async def aclose(self) -> None:
        return None


# One atomic step on a key's two buckets, on the Redis server's clock.
# KEYS[1]: the key's hash. ARGV: mode ("check" | "charge"), requests capacity, tokens
# capacity (-1: no limit), requests, tokens, expiry in ms. Returns
# {allowed, retry_after_ms, requests left, tokens left} as strings (Redis would truncate
# Lua numbers to integers).
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]
local caps = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local amounts = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local ttl = tonumber(ARGV[6])
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local levels = {tonumber(state[1]), tonumber(state[2])}
local last = tonumber(state[3]) or now
local elapsed = math.max(0, now - last)
for i = 1, 2 do
  if caps[i] >= 0 then
    if levels[i] == nil then
      levels[i] = caps[i]
    else
      levels[i] = math.min(caps[i], levels[i] + elapsed * caps[i] / 60000)
    end
  else
    levels[i] = 0
  end
end
local allowed = 1
local wait = 0
if mode == 'charge' then
  if caps[2] >= 0 then
    levels[2] = math.max(-caps[2], levels[2] - amounts[2])
  end
else
  for i = 1, 2 do
    if caps[i] >= 0 then
      local need = math.min(amounts[i], caps[i])
      if levels[i] < need then
        allowed = 0
        wait = math.max(wait, (need - levels[i]) * 60000 / caps[i])
      end
    end
  end
  if allowed == 1 then
    for i = 1, 2 do
      if caps[i] >= 0 then levels[i] = levels[i] - amounts[i] end
    end
  end
end
redis.call('HSET', KEYS[1], 'r', tostring(levels[1]), 't', tostring(levels[2]), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return {tostring(allowed), tostring(wait), tostring(levels[1]), tostring(levels[2])}
"""


class RedisRateLimiter:
    """Token buckets in Redis, shared by every process that uses the same URL and prefix."""

    def __init__(
        self,
        requests_per_min: int | None,
        tokens_per_min: int | None,
        redis_url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.limits = _Limits(requests_per_min, tokens_per_min)
        self.redis_url = redis_url
        self.prefix = prefix
        self._client: Any = None
        self._script: Any = None
        self._last_warning = -math.inf
        # an idle bucket is full again after a minute (two: it may be in debt)
        self._ttl_ms = 180_000

    def _connect(self) -> Any:
        if self._script is None:
            import redis.asyncio

            self._client = redis.asyncio.from_url(
                self.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0
            )
            self._script = self._client.register_script(_LUA)
        return self._script

    async def _run(self, key: str, mode: str, requests: int, tokens: int) -> list[float] | None:
        import redis.exceptions

        r_cap, t_cap = self.limits.requests_per_min, self.limits.tokens_per_min
        args = [
            mode,
            -1 if r_cap is None else r_cap,
            -1 if t_cap is None else t_cap,
            requests,
            tokens,
            self._ttl_ms,
        ]
        try:
            raw = await self._connect()(keys=[self.prefix + key], args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY_S:
                self._last_warning = now
                log.warning(
                    "rate limiter: Redis unreachable (%s); letting requests through",
                    type(exc).__name__,
                    extra={"redis": _redacted(self.redis_url)},
                )
            return None
        return [float(x) for x in raw]

    async def check(self, key: str, *, requests: int = 1, tokens: int = 0) -> RateDecision:
        _check_amounts(requests, tokens)
        if not self.limits.enabled:
            return RateDecision(True)
        out = await self._run(key, "check", requests, tokens)
        if out is None:
            return RateDecision(True)
        allowed, wait_ms, r_left, t_left = out
        return RateDecision(
            allowed == 1,
            wait_ms / 1000.0,
            max(0, math.floor(r_left)) if self.limits.requests_per_min is not None else None,
            max(0, math.floor(t_left)) if self.limits.tokens_per_min is not None else None,
        )

    async def charge(self, key: str, tokens: int) -> None:
        _check_amounts(0, tokens)
        if self.limits.tokens_per_min is None or tokens == 0:
            return
        await self._run(key, "charge", 0, tokens)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = self._script = None


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def make_rate_limiter(
    rate_cfg: RateLimitConfig, redis_url: str | None, *, prefix: str = DEFAULT_PREFIX
) -> InProcessRateLimiter | RedisRateLimiter:
    """Redis-backed when ``redis_url`` is set (replicas share it), else in process."""
    if redis_url:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"serve.redis_url must start with redis://, rediss:// or unix://, "
                f"not {_redacted(redis_url)!r}"
            )
        return RedisRateLimiter(
            rate_cfg.requests_per_min, rate_cfg.tokens_per_min, redis_url, prefix=prefix
        )
    return InProcessRateLimiter(rate_cfg.requests_per_min, rate_cfg.tokens_per_min)

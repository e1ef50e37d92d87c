"""Per-key rate limits and quotas: requests and tokens per minute, tokens per day and month.

Four windows per key, each optional (:class:`Limits`):

- **requests per minute** and **tokens per minute** are token buckets: a bucket holds up to
  its limit and refills at limit / 60 per second (a smooth sliding budget with a burst of
  one minute's worth);
- **tokens per day** and **tokens per month** are fixed windows on the UTC calendar (a day
  starts at 00:00 UTC, a month on its 1st at 00:00 UTC): a counter per key and window.

:meth:`RateLimiter.check` takes ``requests`` and ``tokens`` from every window of a key at
once, or from none (one atomic step), and says which limit refused and when it frees up.
Tokens are **reserved** up front: a generation reserves its prompt tokens plus
``max_tokens`` for each choice (what OpenAI's limits count too), so a quota cannot be
overrun by requests in flight; :meth:`RateLimiter.settle` then moves every token window to
the tokens really used (a refund, usually). A request larger than a whole per-minute
bucket passes when the bucket is full and leaves it in debt; a day or month quota is hard:
a request that does not fit in what is left is refused until the window resets.

:class:`InProcessRateLimiter` keeps the windows in this process (one server).
:class:`RedisRateLimiter` keeps them in Redis, updated by one Lua script per check (one
round trip), so replicas share one budget per key. The buckets refill on the Redis server's
clock; day and month windows are named by the replica's UTC clock (keep clocks in sync; a
skew moves the window edge by as much for that replica).

When Redis cannot be reached, ``on_redis_down`` says what happens: ``fail_closed`` refuses
(:class:`LimiterUnavailable`, a 503) and ``local`` falls back to per-process windows
(each replica then enforces the limits on its own, counting from zero). ``strict=False``
checks (admin and health routes: operators must be able to act during an outage) always
fall back. The outage is reported once (``on_outage``), Redis is probed again at most every
:data:`PROBE_EVERY_S`, and ``on_recovery`` runs when it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    from genloop.config import RateLimitConfig

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "genloop:rl:"
MAX_KEYS = 100_000  # in-process windows kept; the least recently used are dropped first
PROBE_EVERY_S = 1.0  # while Redis is down, how often a request tries it again
OnRedisDown = Literal["fail_closed", "local"]
LIMIT_NAMES = ("requests per minute", "tokens per minute", "tokens per day", "tokens per month")


class LimiterUnavailable(GenloopError):
    """The shared limits cannot be checked (Redis is down) and the policy is fail-closed."""

    http_status = 503


@dataclass(frozen=True)
class Limits:
    """A key's limits; None: no limit on that window.

    As a per-key override (``api_keys`` columns), None means "the server's default" and 0
    "no limit for this key": :meth:`overridden_by` applies one."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in self.as_tuple())

    @property
    def counts_tokens(self) -> bool:
        return any(v is not None for v in self.as_tuple()[1:])

    def as_tuple(self) -> tuple[int | None, int | None, int | None, int | None]:
        return (
            self.requests_per_min,
            self.tokens_per_min,
            self.tokens_per_day,
            self.tokens_per_month,
        )

    def overridden_by(self, override: Limits | None) -> Limits:
        """These defaults with ``override``'s set fields (0 there: no limit) taking over."""
        if override is None:
            return self
        merged = [
            d if o is None else (None if o == 0 else o)
            for d, o in zip(self.as_tuple(), override.as_tuple(), strict=True)
        ]
        return Limits(*merged)

    def to_dict(self) -> dict[str, int | None]:
        return {
            "requests_per_min": self.requests_per_min,
            "tokens_per_min": self.tokens_per_min,
            "tokens_per_day": self.tokens_per_day,
            "tokens_per_month": self.tokens_per_month,
        }


@dataclass(frozen=True)
class Windows:
    """The day and month windows at one instant: their names and seconds to their ends."""

    day: str
    month: str
    day_left_s: float
    month_left_s: float


def windows_at(epoch_s: float) -> Windows:
    """The UTC calendar day and month holding ``epoch_s``."""
    now = datetime.fromtimestamp(epoch_s, UTC)
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    next_month = month_start.replace(
        year=month_start.year + month_start.month // 12, month=month_start.month % 12 + 1
    )
    return Windows(
        day=day_start.strftime("%Y%m%d"),
        month=month_start.strftime("%Y%m"),
        day_left_s=day_start.timestamp() + 86400 - epoch_s,
        month_left_s=next_month.timestamp() - epoch_s,
    )


@dataclass(frozen=True)
class Reservation:
    """Tokens taken by an allowed check, to settle against what was used."""

    key: str
    tokens: int
    windows: Windows
    limits: Limits
    local: bool  # taken from this process's windows (Redis absent or down)


@dataclass(frozen=True)
class RateDecision:
    """``allowed``, or which limit refused (``limit``: one of :data:`LIMIT_NAMES`), how much
    of it is used, what the request needed and how long to wait; what is left (None: no
    limit). ``reservation``: the tokens taken, for :meth:`RateLimiter.settle`."""

    allowed: bool
    retry_after_s: float = 0.0
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    limit: str | None = None
    used: int = 0
    cap: int = 0
    needed: int = 0
    reservation: Reservation | None = None

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` takes whole seconds: rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))

    @property
    def message(self) -> str:
        """``tokens per day: 100000 used of 100000; resets in 3h12m``."""
        if self.allowed or self.limit is None:
            return ""
        text = f"{self.limit}: {self.used} used of {self.cap}"
        per_minute = "minute" in self.limit
        if not per_minute and self.needed > self.cap:
            text += f"; this request needs up to {self.needed}, more than the whole limit"
            text += " (lower max_tokens)"
        elif self.limit != LIMIT_NAMES[0]:  # a token window: the reservation matters
            text += f", this request needs up to {self.needed}"
        verb = "retry in" if per_minute else "resets in"
        return f"{text}; {verb} {format_wait(self.retry_after_s)}"


def format_wait(seconds: float) -> str:
    """``3h12m``, ``4m05s``, ``12s``, ``2d3h``: short, rounded up to the unit shown."""
    s = max(1, math.ceil(seconds))
    if s >= 86400:
        days, hours = divmod(math.ceil(s / 3600), 24)
        return f"{days}d{hours}h"
    if s >= 3600:
        hours, minutes = divmod(math.ceil(s / 60), 60)
        return f"{hours}h{minutes:02d}m"
    if s >= 60:
        minutes, secs = divmod(s, 60)
        return f"{minutes}m{secs:02d}s"
    return f"{s}s"


class RateLimiter(Protocol):
    limits: Limits  # the server-wide defaults

    async def check(
        self,
        key: str,
        *,
        requests: int = 1,
        tokens: int = 0,
        limits: Limits | None = None,
        strict: bool = True,
    ) -> RateDecision: ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None: ...

    async def aclose(self) -> None: ...


def _check_amounts(requests: int, tokens: int) -> None:
    if requests < 0 or tokens < 0:
        raise ValueError("requests and tokens must be ≥ 0")


def _decide(
    levels: tuple[float, float],
    used: tuple[int, int],
    limits: Limits,
    requests: int,
    tokens: int,
    windows: Windows,
) -> RateDecision:
    """The decision for levels (the two buckets) and used (day, month) before taking."""
    r_cap, t_cap, d_cap, m_cap = limits.as_tuple()
    worst: tuple[float, int, int, int, int] | None = None  # wait, index, used, cap, need
    for i, (cap, level, amount) in enumerate(
        ((r_cap, levels[0], requests), (t_cap, levels[1], tokens))
    ):
        need = min(amount, cap) if cap is not None else 0
        if cap is not None and level < need:
            wait = (need - level) * 60.0 / cap
            if worst is None or wait > worst[0]:
                worst = (wait, i, math.ceil(cap - level), cap, amount)
    for i, (cap, count, left) in enumerate(
        ((d_cap, used[0], windows.day_left_s), (m_cap, used[1], windows.month_left_s)), start=2
    ):
        over = cap is not None and tokens > 0 and count + tokens > cap
        if over and (worst is None or left > worst[0]):
            assert cap is not None
            worst = (left, i, count, cap, tokens)
    if worst is None:
        return RateDecision(True)
    wait, index, count, cap, need = worst
    return RateDecision(False, wait, limit=LIMIT_NAMES[index], used=count, cap=cap, needed=need)


class InProcessRateLimiter:
    """Every key's windows in this process's memory (thread-safe).

    ``clock``: Unix seconds (injectable, so tests can cross days and months)."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self._clock = clock
        # key → [requests level, tokens level, last update (s)]; (key, window) → tokens used
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self._counters: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def _refilled(self, key: str, limits: Limits, now: float) -> list[float]:
        r_cap, t_cap = limits.requests_per_min, limits.tokens_per_min
        state = self._buckets.get(key)
        if state is None:
            state = [float(r_cap or 0), float(t_cap or 0), now]
            self._buckets[key] = state
            if len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)  # least recently used: full again by now
        else:
            elapsed = max(0.0, now - state[2])
            for i, cap in enumerate((r_cap, t_cap)):
                if cap is not None:
                    state[i] = min(float(cap), state[i] + elapsed * cap / 60.0)
            state[2] = now
            self._buckets.move_to_end(key)
        return state

    def _add(self, name: str, amount: int) -> None:
        self._counters[name] = max(0, self._counters.get(name, 0) + amount)
        self._counters.move_to_end(name)
        if len(self._counters) > MAX_KEYS:
            self._counters.popitem(last=False)

    def check_sync(
        self, key: str, *, requests: int = 1, tokens: int = 0, limits: Limits | None = None
    ) -> RateDecision:
        _check_amounts(requests, tokens)
        limits = limits or self.limits
        now = self._clock()
        windows = windows_at(now)
        if not limits.enabled:
            return RateDecision(True, reservation=Reservation(key, 0, windows, limits, True))
        r_cap, t_cap, d_cap, m_cap = limits.as_tuple()
        day, month = f"{key}:d:{windows.day}", f"{key}:m:{windows.month}"
        with self._lock:
            state = self._refilled(key, limits, now)
            used = (self._counters.get(day, 0), self._counters.get(month, 0))
            decision = _decide((state[0], state[1]), used, limits, requests, tokens, windows)
            if decision.allowed:
                if r_cap is not None:
                    state[0] -= requests
                if t_cap is not None:
                    state[1] -= tokens
                if d_cap is not None and tokens:
                    self._add(day, tokens)
                if m_cap is not None and tokens:
                    self._add(month, tokens)
                decision = replace(
                    decision, reservation=Reservation(key, tokens, windows, limits, True)
                )
            return replace(
                decision,
                remaining_requests=max(0, math.floor(state[0])) if r_cap is not None else None,
                remaining_tokens=max(0, math.floor(state[1])) if t_cap is not None else None,
            )

    def settle_sync(self, reservation: Reservation, used_tokens: int) -> None:
        _check_amounts(0, used_tokens)
        delta = used_tokens - reservation.tokens
        limits, key, windows = reservation.limits, reservation.key, reservation.windows
        if delta == 0 or not limits.counts_tokens:
            return
        with self._lock:
            t_cap = limits.tokens_per_min
            if t_cap is not None:
                state = self._refilled(key, limits, self._clock())
                state[1] = min(float(t_cap), max(-float(t_cap), state[1] - delta))
            if limits.tokens_per_day is not None:
                self._add(f"{key}:d:{windows.day}", delta)
            if limits.tokens_per_month is not None:
                self._add(f"{key}:m:{windows.month}", delta)

    async def check(
        self,
        key: str,
        *,
        requests: int = 1,
        tokens: int = 0,
        limits: Limits | None = None,
        strict: bool = True,
    ) -> RateDecision:
        return self.check_sync(key, requests=requests, tokens=tokens, limits=limits)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.settle_sync(reservation, used_tokens)

    async def aclose(self) -> None:
        return None


# One atomic step on a key's four windows. KEYS: the buckets' hash, the day counter, the
# month counter. ARGV: mode ("check" | "settle"), the four caps (-1: no limit), requests,
# tokens (settle: the signed difference to apply), bucket expiry (ms), seconds left in the
# day and the month. The buckets refill on the Redis server's clock. Returns {allowed,
# wait_ms, index of the limit hit (0-3, -1 none), its use, requests left, tokens left} as
# strings (Redis would truncate Lua numbers to integers).
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]
local caps = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local requests, tokens = tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local left = {0, 0, tonumber(ARGV[9]) * 1000, tonumber(ARGV[10]) * 1000}
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
local used = {0, 0, tonumber(redis.call('GET', KEYS[2]) or '0'),
              tonumber(redis.call('GET', KEYS[3]) or '0')}
local allowed, wait, hit, hit_used = 1, 0, -1, 0
local amounts = {requests, tokens}
if mode == 'settle' then
  if caps[2] >= 0 then
    levels[2] = math.min(caps[2], math.max(-caps[2], levels[2] - tokens))
  end
else
  for i = 1, 2 do
    if caps[i] >= 0 then
      local need = math.min(amounts[i], caps[i])
      if levels[i] < need then
        allowed = 0
        local w = (need - levels[i]) * 60000 / caps[i]
        if hit < 0 or w > wait then
          wait, hit, hit_used = w, i - 1, math.ceil(caps[i] - levels[i])
        end
      end
    end
  end
  for i = 3, 4 do
    if caps[i] >= 0 and tokens > 0 and used[i] + tokens > caps[i] then
      allowed = 0
      if hit < 0 or left[i] > wait then wait, hit, hit_used = left[i], i - 1, used[i] end
    end
  end
  if allowed == 1 then
    for i = 1, 2 do
      if caps[i] >= 0 then levels[i] = levels[i] - amounts[i] end
    end
  end
end
if allowed == 1 and tokens ~= 0 then
  for i = 3, 4 do
    if caps[i] >= 0 then
      local after = redis.call('INCRBY', KEYS[i - 1], tokens)
      if after < 0 then redis.call('SET', KEYS[i - 1], 0) end
      redis.call('PEXPIRE', KEYS[i - 1], math.floor(left[i]) + 3600000)
    end
  end
end
redis.call('HSET', KEYS[1], 'r', tostring(levels[1]), 't', tostring(levels[2]), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return {tostring(allowed), tostring(wait), tostring(hit), tostring(hit_used),
        tostring(levels[1]), tostring(levels[2])}
"""


class RedisRateLimiter:
    """Every key's windows in Redis, shared by every process that uses the same URL and
    prefix; per-process windows (``local``) or a 503 (``fail_closed``) while it is down."""

    def __init__(
        self,
        limits: Limits,
        redis_url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        on_redis_down: OnRedisDown = "fail_closed",
        on_outage: Callable[[str], None] | None = None,
        on_recovery: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self.redis_url = redis_url
        self.prefix = prefix
        self.on_redis_down = on_redis_down
        self.on_outage = on_outage
        self.on_recovery = on_recovery
        self.local = InProcessRateLimiter(limits, clock=clock)
        self._clock = clock
        self._client: Any = None
        self._script: Any = None
        self._down = False
        self._next_probe = 0.0
        # an idle bucket is full again after a minute (two: it may be in debt)
        self._ttl_ms = 180_000

    @property
    def down(self) -> bool:
        """Whether the last attempt to reach Redis failed."""
        return self._down

    def _connect(self) -> Any:
        if self._script is None:
            import redis.asyncio

            self._client = redis.asyncio.from_url(
                self.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0
            )
            self._script = self._client.register_script(_LUA)
        return self._script

    async def _run(
        self, key: str, mode: str, limits: Limits, requests: int, tokens: int, windows: Windows
    ) -> list[float] | None:
        """The script's answer; None while Redis is down (reported once per outage)."""
        import redis.exceptions

        if self._down and time.monotonic() < self._next_probe:
            return None
        keys = [
            self.prefix + key,
            f"{self.prefix}{key}:d:{windows.day}",
            f"{self.prefix}{key}:m:{windows.month}",
        ]
        caps = [-1 if c is None else c for c in limits.as_tuple()]
        args = [
            mode,
            *caps,
            requests,
            tokens,
            self._ttl_ms,
            windows.day_left_s,
            windows.month_left_s,
        ]
        try:
            raw = await self._connect()(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            self._next_probe = time.monotonic() + PROBE_EVERY_S
            if not self._down:
                self._down = True
                reason = type(exc).__name__
                log.error(
                    "rate limiter: Redis unreachable (%s); %s",
                    reason,
                    "refusing requests (fail_closed)"
                    if self.on_redis_down == "fail_closed"
                    else "limiting each process on its own (local)",
                    extra={"redis": _redacted(self.redis_url)},
                )
                if self.on_outage is not None:
                    await _report(self.on_outage, reason)
            return None
        if self._down:
            self._down = False
            log.warning("rate limiter: Redis reachable again; limits are shared again")
            if self.on_recovery is not None:
                await _report(self.on_recovery)
        return [float(x) for x in raw]

    async def check(
        self,
        key: str,
        *,
        requests: int = 1,
        tokens: int = 0,
        limits: Limits | None = None,
        strict: bool = True,
    ) -> RateDecision:
        _check_amounts(requests, tokens)
        limits = limits or self.limits
        windows = windows_at(self._clock())
        if not limits.enabled:
            return RateDecision(True, reservation=Reservation(key, 0, windows, limits, False))
        out = await self._run(key, "check", limits, requests, tokens, windows)
        if out is None:
            if strict and self.on_redis_down == "fail_closed":
                raise LimiterUnavailable(
                    "rate limits cannot be checked: their shared store (Redis) is "
                    "unreachable, and requests are refused until it returns "
                    "(serve.rate_limit.on_redis_down: fail_closed)"
                )
            return self.local.check_sync(key, requests=requests, tokens=tokens, limits=limits)
        allowed, wait_ms, hit, hit_used, r_left, t_left = out
        index = int(hit)
        r_cap, t_cap = limits.requests_per_min, limits.tokens_per_min
        return RateDecision(
            allowed == 1,
            wait_ms / 1000.0,
            max(0, math.floor(r_left)) if r_cap is not None else None,
            max(0, math.floor(t_left)) if t_cap is not None else None,
            limit=LIMIT_NAMES[index] if index >= 0 else None,
            used=int(hit_used),
            cap=(limits.as_tuple()[index] or 0) if index >= 0 else 0,
            needed=(requests if index == 0 else tokens) if index >= 0 else 0,
            reservation=Reservation(key, tokens, windows, limits, False) if allowed == 1 else None,
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        _check_amounts(0, used_tokens)
        if reservation.local:
            self.local.settle_sync(reservation, used_tokens)
            return
        delta = used_tokens - reservation.tokens
        if delta == 0 or not reservation.limits.counts_tokens:
            return
        # down: the reservation stays counted (the safe side)
        await self._run(
            reservation.key, "settle", reservation.limits, 0, delta, reservation.windows
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = self._script = None


async def _report(callback: Callable[..., None], *args: str) -> None:
    """Run an outage callback (it writes an alert) off the event loop; a failure there (the
    catalog may be down too) is logged, never the request's error."""
    try:
        await asyncio.to_thread(callback, *args)
    except Exception:
        log.exception("rate limiter: could not report the Redis outage or its end")


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def config_limits(rate_cfg: RateLimitConfig) -> Limits:
    """The server-wide default limits of ``serve.rate_limit``."""
    return Limits(
        rate_cfg.requests_per_min,
        rate_cfg.tokens_per_min,
        rate_cfg.tokens_per_day,
        rate_cfg.tokens_per_month,
    )


def make_rate_limiter(
    rate_cfg: RateLimitConfig,
    redis_url: str | None,
    *,
    prefix: str | None = None,
    on_outage: Callable[[str], None] | None = None,
    on_recovery: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> InProcessRateLimiter | RedisRateLimiter:
    """Redis-backed when ``redis_url`` is set (replicas share it), else in process.
    ``prefix``: of the Redis keys (default: ``serve.rate_limit.redis_prefix``)."""
    limits = config_limits(rate_cfg)
    if redis_url:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"serve.redis_url must start with redis://, rediss:// or unix://, "
                f"not {_redacted(redis_url)!r}"
            )
        return RedisRateLimiter(
            limits,
            redis_url,
            prefix=prefix or rate_cfg.redis_prefix,
            on_redis_down=rate_cfg.on_redis_down,
            on_outage=on_outage,
            on_recovery=on_recovery,
            clock=clock,
        )
    return InProcessRateLimiter(limits, clock=clock)

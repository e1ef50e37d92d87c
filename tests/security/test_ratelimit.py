"""Rate limits: token buckets per key, in process and shared through Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from genloop.config import RateLimitConfig
from genloop.errors import ConfigError
from genloop.security.ratelimit import (
    PROBE_EVERY_S,
    InProcessRateLimiter,
    LimiterUnavailable,
    Limits,
    RateDecision,
    RateLimiter,
    RedisRateLimiter,
    format_wait,
    make_rate_limiter,
    windows_at,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _burst(limiter: InProcessRateLimiter, key: str, n: int) -> list[RateDecision]:
    return [limiter.check_sync(key) for _ in range(n)]


def test_requests_per_minute_allows_a_burst_then_says_when_to_retry() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(Limits(6), clock=clock)  # one request per 10 s
    decisions = _burst(limiter, "key:1", 7)
    assert [d.allowed for d in decisions] == [True] * 6 + [False]
    assert [d.remaining_requests for d in decisions[:6]] == [5, 4, 3, 2, 1, 0]
    assert decisions[-1].retry_after_s == pytest.approx(10.0)
    assert decisions[-1].retry_after_header == "10"
    assert decisions[-1].remaining_tokens is None
    assert decisions[-1].message == "requests per minute: 6 used of 6; retry in 10s"
    clock.now += 4.0
    denied = limiter.check_sync("key:1")
    assert not denied.allowed and denied.retry_after_s == pytest.approx(6.0)
    clock.now += 6.0
    assert limiter.check_sync("key:1").allowed
    assert not limiter.check_sync("key:1").allowed
    assert limiter.check_sync("key:2").allowed  # each key has its own bucket


def test_a_refused_request_takes_nothing() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(Limits(60, 100), clock=clock)
    assert limiter.check_sync("k", tokens=70).allowed
    refused = limiter.check_sync("k", tokens=70)  # 30 left: wait for 40 more at 100/min
    assert not refused.allowed and refused.retry_after_s == pytest.approx(24.0)
    assert refused.message == (
        "tokens per minute: 70 used of 100, this request needs up to 70; retry in 24s"
    )
    assert refused.remaining_requests == 59  # the refused request took no request either
    assert limiter.check_sync("k", tokens=30).allowed


def test_settling_more_than_reserved_puts_the_key_in_debt() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(Limits(None, 100), clock=clock)
    first = limiter.check_sync("k", tokens=50)
    assert first.allowed and first.reservation is not None
    limiter.settle_sync(first.reservation, 130)  # 80 more than reserved
    refused = limiter.check_sync("k")  # 30 tokens in debt: wait 18 s even for 0 tokens
    assert not refused.allowed and refused.retry_after_s == pytest.approx(18.0)
    limiter.settle_sync(first.reservation, 10_050)  # debt is capped at one minute's worth
    assert limiter.check_sync("k").retry_after_s == pytest.approx(60.0)
    clock.now += 60.0
    assert limiter.check_sync("k").allowed


def test_a_request_larger_than_the_bucket_passes_only_when_it_is_full() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(Limits(None, 100), clock=clock)
    assert limiter.check_sync("k", tokens=500).allowed
    assert not limiter.check_sync("k", tokens=500).allowed


def test_no_limits_allow_everything() -> None:
    limiter = make_rate_limiter(
        RateLimitConfig(requests_per_min=None, tokens_per_min=None), redis_url=None
    )
    assert isinstance(limiter, InProcessRateLimiter)
    decisions = [asyncio.run(limiter.check("k", tokens=10**9)) for _ in range(3)]
    assert all(d.allowed and d.remaining_requests is None for d in decisions)


def test_bad_amounts_and_redis_urls_are_refused() -> None:
    limiter = InProcessRateLimiter(Limits(10, 10))
    with pytest.raises(ValueError, match="≥ 0"):
        limiter.check_sync("k", tokens=-1)
    with pytest.raises(ConfigError, match="redis://"):
        make_rate_limiter(RateLimitConfig(), "http://user:pw@127.0.0.1:6379")


def test_windows_follow_the_utc_calendar() -> None:
    w = windows_at(_at("2026-12-31T20:47:00"))
    assert (w.day, w.month) == ("20261231", "202612")
    assert w.day_left_s == 3 * 3600 + 13 * 60
    assert w.month_left_s == w.day_left_s  # December ends with its last day
    feb = windows_at(_at("2028-02-28T00:00:00"))  # a leap year: two days left
    assert (feb.day, feb.month, feb.month_left_s) == ("20280228", "202802", 2 * 86400)
    assert format_wait(3 * 3600 + 12 * 60) == "3h12m"
    assert format_wait(3 * 3600 + 11 * 60 + 1) == "3h12m"  # rounded up
    assert (format_wait(0.2), format_wait(65), format_wait(90000)) == ("1s", "1m05s", "1d1h")


def test_per_key_overrides_beat_the_defaults() -> None:
    defaults = Limits(600, 100_000, 1_000_000, None)
    override = Limits(tokens_per_day=50, requests_per_min=0)  # 0: no limit for this key
    assert defaults.overridden_by(override) == Limits(None, 100_000, 50, None)
    assert defaults.overridden_by(None) == defaults
    limiter = InProcessRateLimiter(defaults, clock=Clock(_at("2026-12-07T12:00:00")))
    mine = defaults.overridden_by(override)
    assert limiter.check_sync("a", tokens=40, limits=mine).allowed
    refused = limiter.check_sync("a", tokens=40, limits=mine)
    assert refused.limit == "tokens per day" and (refused.used, refused.cap) == (40, 50)
    assert limiter.check_sync("b", tokens=40).allowed  # other keys: the defaults
    assert limiter.check_sync("b", tokens=40).allowed


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


# ----------------------------------------------- the same quota rules on both backends


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_limiter(request: pytest.FixtureRequest) -> Callable[..., RateLimiter]:
    """``make_limiter(limits, clock)``: in process, or in Redis (under a prefix of its own;
    the test closes it on its event loop)."""

    def make(limits: Limits, clock: Callable[[], float]) -> RateLimiter:
        if request.param == "memory":
            return InProcessRateLimiter(limits, clock=clock)
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        return RedisRateLimiter(limits, url, prefix=prefix, clock=clock)

    return make


def test_day_and_month_quotas_reset_on_the_calendar(make_limiter: Callable[..., Any]) -> None:
    clock = Clock(_at("2026-01-29T20:48:00"))
    limiter = make_limiter(Limits(tokens_per_day=100, tokens_per_month=250), clock)

    async def run() -> None:
        try:
            await steps()
        finally:
            await limiter.aclose()

    async def steps() -> None:
        assert (await limiter.check("k", tokens=60)).allowed
        day = await limiter.check("k", tokens=60)  # 60 + 60 > 100
        assert not day.allowed and day.limit == "tokens per day"
        assert day.retry_after_s == pytest.approx(3 * 3600 + 12 * 60)
        assert day.message == (
            "tokens per day: 60 used of 100, this request needs up to 60; resets in 3h12m"
        )
        assert day.retry_after_header == str(3 * 3600 + 12 * 60)
        assert (await limiter.check("k", tokens=40)).allowed  # exactly the rest of the day
        clock.now += 4 * 3600  # the 30th: a new day, the same month (100 of 250 used)
        assert (await limiter.check("k", tokens=100)).allowed
        clock.now += 86400  # the 31st: 200 of 250 used this month
        month = await limiter.check("k", tokens=60)
        assert not month.allowed and month.limit == "tokens per month"
        assert (month.used, month.cap) == (200, 250)
        assert month.retry_after_s == pytest.approx(23 * 3600 + 12 * 60)  # Feb 1st, 00:00
        huge = await limiter.check("k", tokens=400)
        assert "more than the whole limit (lower max_tokens)" in huge.message
        assert (await limiter.check("k", requests=1)).allowed  # no tokens: not a quota's
        assert (await limiter.check("k", tokens=50)).allowed
        clock.now += 86400  # February: both windows start again
        assert (await limiter.check("k", tokens=100)).allowed

    asyncio.run(run())


def test_settling_refunds_what_a_reservation_did_not_use(
    make_limiter: Callable[..., Any],
) -> None:
    limiter = make_limiter(Limits(None, 1000, 100, None), Clock(_at("2026-12-07T12:00:00")))

    async def run() -> None:
        try:
            await steps()
        finally:
            await limiter.aclose()

    async def steps() -> None:
        first = await limiter.check("k", tokens=90)  # prompt + max_tokens, reserved
        assert first.allowed and first.reservation is not None
        assert not (await limiter.check("k", tokens=20)).allowed
        await limiter.settle(first.reservation, 15)  # it used 15: 75 come back
        again = await limiter.check("k", tokens=85)
        assert again.allowed and again.remaining_tokens == 1000 - 15 - 85
        assert not (await limiter.check("k", tokens=1)).allowed  # 15 + 85 = the day's 100

    asyncio.run(run())


# ------------------------------------------------------------------------------- Redis


@pytest.mark.redis
def test_two_limiters_sharing_redis_share_one_budget(redis_url: str, redis_prefix: str) -> None:
    cfg = RateLimitConfig(requests_per_min=6, tokens_per_min=None)

    async def run() -> list[RateDecision]:
        a = make_rate_limiter(cfg, redis_url, prefix=redis_prefix)
        b = make_rate_limiter(cfg, redis_url, prefix=redis_prefix)
        assert isinstance(a, RedisRateLimiter) and isinstance(b, RedisRateLimiter)
        try:
            return [await (a if i % 2 else b).check("key:7") for i in range(8)]
        finally:
            await a.aclose()
            await b.aclose()

    decisions = asyncio.run(run())
    assert [d.allowed for d in decisions] == [True] * 6 + [False] * 2
    assert decisions[-1].retry_after_s == pytest.approx(10.0, abs=0.5)
    assert decisions[-1].retry_after_header in ("10", "11")


@pytest.mark.redis
def test_redis_tokens_and_settlements_are_shared(redis_url: str, redis_prefix: str) -> None:
    import redis

    async def run() -> tuple[RateDecision, RateDecision, RateDecision]:
        a = RedisRateLimiter(Limits(None, 100), redis_url, prefix=redis_prefix)
        b = RedisRateLimiter(Limits(None, 100), redis_url, prefix=redis_prefix)
        try:
            first = await a.check("k", tokens=60)
            assert first.reservation is not None
            await b.settle(first.reservation, 120)  # 40 - 60 more: 20 in debt
            after = await a.check("k", tokens=0)
            other = await b.check("other", tokens=100)
            return first, after, other
        finally:
            await a.aclose()
            await b.aclose()

    first, after, other = asyncio.run(run())
    assert first.allowed and first.remaining_tokens == 40
    assert not after.allowed and after.retry_after_s == pytest.approx(12.0, abs=0.5)
    assert other.allowed and other.remaining_tokens == 0
    client = redis.Redis.from_url(redis_url)
    try:  # idle buckets expire on their own
        assert 0 < client.pttl(redis_prefix + "k") <= 180_000
    finally:
        client.close()


_WORKER = """
import asyncio, json, sys
from genloop.security.ratelimit import Limits, RedisRateLimiter

async def main():
    limiter = RedisRateLimiter(Limits(int(sys.argv[3])), sys.argv[1], prefix=sys.argv[2])
    out = [(await limiter.check("shared")).allowed for _ in range(int(sys.argv[4]))]
    await limiter.aclose()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.redis
def test_two_processes_sharing_redis_get_429s_at_the_configured_rate(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    rate, attempts = 5, 8  # 5 per minute: a refill every 12 s, longer than this test runs
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), redis_url, redis_prefix, str(rate), str(attempts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    elapsed = time.monotonic() - start
    allowed = sum(sum(r) for r in results)
    refills = int(elapsed // (60 / rate))
    assert rate <= allowed <= rate + refills, (allowed, elapsed)
    assert sum(len(r) - sum(r) for r in results) == 2 * attempts - allowed  # the rest: 429


CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # nothing listens there


def test_an_unreachable_redis_fails_closed_and_alerts_once() -> None:
    outages: list[str] = []
    limiter = RedisRateLimiter(Limits(5), CLOSED_PORT_URL, on_outage=outages.append)

    async def run() -> list[RateDecision]:
        try:
            for _ in range(3):
                with pytest.raises(LimiterUnavailable, match="fail_closed") as exc:
                    await limiter.check("k")
                assert exc.value.http_status == 503
            # admin and health routes (strict=False) fall back to per-process limits
            return [await limiter.check("k", strict=False) for _ in range(6)]
        finally:
            await limiter.aclose()

    decisions = asyncio.run(run())
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert outages == ["ConnectionError"]  # once per outage, not once per request
    assert limiter.down


def test_a_failing_outage_report_does_not_fail_the_request() -> None:
    def broken(reason: str) -> None:
        raise OSError("the catalog is down too")

    limiter = RedisRateLimiter(Limits(5), CLOSED_PORT_URL, on_outage=broken)

    async def run() -> RateDecision:
        try:
            return await limiter.check("k", strict=False)
        finally:
            await limiter.aclose()

    assert asyncio.run(run()).allowed


def test_local_fallback_limits_each_process_on_its_own() -> None:
    outages: list[str] = []
    cfg = RateLimitConfig(requests_per_min=None, tokens_per_min=None, tokens_per_day=100)
    limiter = make_rate_limiter(
        cfg.model_copy(update={"on_redis_down": "local"}),
        CLOSED_PORT_URL,
        on_outage=outages.append,
    )

    async def run() -> list[bool]:
        try:
            return [(await limiter.check("k", tokens=40)).allowed for _ in range(3)]
        finally:
            await limiter.aclose()

    assert asyncio.run(run()) == [True, True, False]
    assert len(outages) == 1


@pytest.mark.redis
def test_recovery_when_redis_returns_shares_limits_again(redis_url: str, redis_prefix: str) -> None:
    """Redis behind a loopback TCP relay that the test stops and starts again."""
    from urllib.parse import urlsplit

    target = urlsplit(redis_url)
    events: list[str] = []

    async def run() -> None:
        relay = await _Relay.start(target.hostname or "127.0.0.1", target.port or 6379)
        limiter = RedisRateLimiter(
            Limits(6),  # a request back every 10 s: no refill while the test runs
            f"redis://127.0.0.1:{relay.port}/0",
            prefix=redis_prefix,
            on_outage=lambda reason: events.append("down"),
            on_recovery=lambda: events.append("up"),
        )
        try:
            assert (await limiter.check("k")).allowed
            await relay.stop()
            with pytest.raises(LimiterUnavailable):
                await limiter.check("k")
            with pytest.raises(LimiterUnavailable):  # within PROBE_EVERY_S: Redis not tried
                await limiter.check("k")
            relay = await _Relay.start(
                target.hostname or "127.0.0.1", target.port or 6379, relay.port
            )
            await asyncio.sleep(PROBE_EVERY_S)
            ok = await limiter.check("k")
            assert ok.allowed and ok.remaining_requests == 4  # the shared bucket again
            assert not limiter.down
        finally:
            await limiter.aclose()
            await relay.stop()

    asyncio.run(run())
    assert events == ["down", "up"]


class _Relay:
    """A TCP relay on loopback to Redis: stopping it is a Redis outage to its clients."""

    def __init__(self, server: asyncio.Server, port: int) -> None:
        self.server, self.port = server, port
        self.tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, host: str, port: int, listen: int = 0) -> _Relay:
        relay: _Relay

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection(host, port)
            for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
                relay.tasks.add(asyncio.ensure_future(task))

        server = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
        relay = cls(server, server.sockets[0].getsockname()[1])
        return relay

    async def stop(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

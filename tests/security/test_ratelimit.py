"""Rate limits: token buckets per key, in process and shared through Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genloop.config import RateLimitConfig
from genloop.errors import ConfigError
from genloop.security.ratelimit import (
    InProcessRateLimiter,
    RateDecision,
    RedisRateLimiter,
    make_rate_limiter,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _burst(limiter: InProcessRateLimiter, key: str, n: int) -> list[RateDecision]:
    return [limiter.check_sync(key) for _ in range(n)]


def test_requests_per_minute_allows_a_burst_then_says_when_to_retry() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(6, None, clock=clock)  # one request per 10 s
    decisions = _burst(limiter, "key:1", 7)
    assert [d.allowed for d in decisions] == [True] * 6 + [False]
    assert [d.remaining_requests for d in decisions[:6]] == [5, 4, 3, 2, 1, 0]
    assert decisions[-1].retry_after_s == pytest.approx(10.0)
    assert decisions[-1].retry_after_header == "10"
    assert decisions[-1].remaining_tokens is None
    clock.now += 4.0
    denied = limiter.check_sync("key:1")
    assert not denied.allowed and denied.retry_after_s == pytest.approx(6.0)
    clock.now += 6.0
    assert limiter.check_sync("key:1").allowed
    assert not limiter.check_sync("key:1").allowed
    assert limiter.check_sync("key:2").allowed  # each key has its own bucket


def test_a_refused_request_takes_nothing() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(60, 100, clock=clock)
    assert limiter.check_sync("k", tokens=70).allowed
    refused = limiter.check_sync("k", tokens=70)  # 30 left: wait for 40 more at 100/min
    assert not refused.allowed and refused.retry_after_s == pytest.approx(24.0)
    assert refused.remaining_requests == 59  # the refused request took no request either
    assert limiter.check_sync("k", tokens=30).allowed


def test_generated_tokens_charged_afterwards_put_the_key_in_debt() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(None, 100, clock=clock)
    assert limiter.check_sync("k", tokens=50).allowed
    limiter.charge_sync("k", 80)  # the completion was longer than the bucket held
    refused = limiter.check_sync("k")  # 30 tokens in debt: wait 18 s even for 0 tokens
    assert not refused.allowed and refused.retry_after_s == pytest.approx(18.0)
    limiter.charge_sync("k", 10_000)  # debt is capped at one minute's worth
    assert limiter.check_sync("k").retry_after_s == pytest.approx(60.0)
    clock.now += 60.0
    assert limiter.check_sync("k").allowed


def test_a_request_larger_than_the_bucket_passes_only_when_it_is_full() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(None, 100, clock=clock)
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
    limiter = InProcessRateLimiter(10, 10)
    with pytest.raises(ValueError, match="≥ 0"):
        limiter.check_sync("k", tokens=-1)
    with pytest.raises(ConfigError, match="redis://"):
        make_rate_limiter(RateLimitConfig(), "http://user:pw@127.0.0.1:6379")


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
def test_redis_tokens_and_charges_are_shared(redis_url: str, redis_prefix: str) -> None:
    import redis

    async def run() -> tuple[RateDecision, RateDecision, RateDecision]:
        a = RedisRateLimiter(None, 100, redis_url, prefix=redis_prefix)
        b = RedisRateLimiter(None, 100, redis_url, prefix=redis_prefix)
        try:
            first = await a.check("k", tokens=60)
            await b.charge("k", 60)  # 40 - 60: 20 in debt
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
from genloop.security.ratelimit import RedisRateLimiter

async def main():
    limiter = RedisRateLimiter(int(sys.argv[3]), None, sys.argv[1], prefix=sys.argv[2])
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


def test_an_unreachable_redis_lets_requests_through_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RedisRateLimiter(1, None, "redis://127.0.0.1:1/0")  # nothing listens there

    async def run() -> list[RateDecision]:
        try:
            return [await limiter.check("k") for _ in range(3)]
        finally:
            await limiter.aclose()

    logger = logging.getLogger("genloop")
    propagate = logger.propagate
    logger.propagate = True  # let caplog see it (the CLI's setup turns propagation off)
    try:
        with caplog.at_level(logging.WARNING, logger="genloop.security.ratelimit"):
            decisions = asyncio.run(run())
    finally:
        logger.propagate = propagate
    assert all(d.allowed for d in decisions)
    # distinct records: a handler another test left on the logger may show one twice
    warnings = {id(r) for r in caplog.records if "Redis unreachable" in r.getMessage()}
    assert len(warnings) == 1  # once per 30 s, not once per request

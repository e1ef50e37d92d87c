"""Fixtures for the security tests: the Redis server, and request/feedback rows."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """``$GENLOOP_TEST_REDIS_URL`` (default: the local server); skipped when unreachable,
    except under CI (``$CI`` set), where it fails."""
    import redis

    url = os.environ.get("GENLOOP_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        reason = f"Redis unreachable at {url}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so Redis tests must run)", pytrace=False)
        pytest.skip(reason)
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"genloop-test:{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()

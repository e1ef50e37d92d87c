"""API keys: created once, stored as a hash, checked in constant time.

A key reads ``gl_`` + 43 URL-safe characters (256 random bits). It is shown once, when it
is created; the catalog keeps only its SHA-256 (a slow hash buys nothing for 256 random
bits) and its first characters (``prefix``) to tell keys apart in lists and logs.

:func:`verify_key` finds the candidates by prefix and compares hashes with
:func:`hmac.compare_digest`. Unknown and revoked keys get the same message, so a caller
cannot tell which keys once existed. Successful checks are cached in the process for
:data:`CACHE_TTL_S` seconds, keyed by the hash (never the key): a revocation takes effect
at once in the process that revoked and within ``CACHE_TTL_S`` in every other replica.
Expiry is checked on every call, cached or not.

Scopes: ``generate`` (completions, chat, images), ``feedback`` (POST /v1/feedback),
``label`` (the labeling queue, /v1/label: an annotator's key), ``metrics`` (GET /metrics:
a Prometheus scraper's key) and ``admin`` (runs, models, keys, privacy…). ``admin``
implies the others: an operator's key works everywhere; give clients only what they need.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from genloop.errors import ConfigError, GenloopError, NotFoundError
from genloop.security.ratelimit import Limits
from genloop.workspace import audit
from genloop.workspace.db import Catalog
from genloop.workspace.tables import ApiKey

KEY_PREFIX = "gl_"
_RANDOM_CHARS = 43  # secrets.token_urlsafe(32): 256 bits
KEY_LENGTH = len(KEY_PREFIX) + _RANDOM_CHARS
PREFIX_LENGTH = 11  # "gl_" + 8 characters: shown in lists and logs, not enough to guess
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

SCOPES = ("generate", "feedback", "label", "metrics", "admin")
CACHE_TTL_S = 5.0
_CACHE_MAX = 10_000

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AuthError(GenloopError):
    """No key, or one that is not valid (now)."""

    http_status = 401


class ForbiddenError(GenloopError):
    """A valid key without the scope this action needs."""

    http_status = 403


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key that was presented, and what it may do."""

    key_id: int
    name: str
    prefix: str
    scopes: frozenset[str]
    user_id: str | None
    expires_at: datetime | None = None
    limits: Limits | None = None  # this key's overrides of serve.rate_limit (0: no limit)

    def has(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def require(self, scope: str) -> None:
        """Raise :class:`ForbiddenError` unless this key has ``scope`` (or ``admin``)."""
        if not self.has(scope):
            raise ForbiddenError(
                f"API key {self.prefix}… lacks the {scope!r} scope "
                f"(it has: {', '.join(sorted(self.scopes))})"
            )

    @property
    def actor(self) -> str:
        """How this caller is named in the audit log."""
        return f"key:{self.prefix}"


@dataclass(frozen=True)
class KeyInfo:
    """A key as lists show it: everything but the key."""

    id: int
    name: str
    prefix: str
    scopes: list[str]
    user_id: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    limits: Limits = field(default_factory=Limits)  # overrides: None → default, 0 → none

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        def iso(d: datetime | None) -> str | None:
            return d.isoformat() if d is not None else None

        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": list(self.scopes),
            "user_id": self.user_id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "limits": self.limits.to_dict(),
        }


@dataclass(frozen=True)
class CreatedKey:
    """A new key: ``plaintext`` exists only here; show it once and drop it."""

    plaintext: str
    info: KeyInfo

    def __repr__(self) -> str:  # never the key in a traceback or a debug print
        return f"CreatedKey(plaintext='{self.info.prefix}…', info={self.info!r})"


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``15m``, ``90s``, ``2w`` → a positive timedelta."""
    t = text.strip().lower()
    if len(t) >= 2 and t[-1] in _DURATION_UNITS and t[:-1].isdigit() and int(t[:-1]) > 0:
        return timedelta(seconds=int(t[:-1]) * _DURATION_UNITS[t[-1]])
    raise ConfigError(
        f"invalid duration {text!r}: use a positive number and a unit, e.g. 30d, 12h, 15m, "
        "90s or 2w"
    )


def parse_scopes(scopes: Iterable[str] | str) -> list[str]:
    """``"generate,feedback"`` or a list → the checked scopes, in canonical order."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    wanted = {s.strip() for s in items if s.strip()}
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ConfigError(f"unknown scope(s) {', '.join(unknown)}; valid: {', '.join(SCOPES)}")
    if not wanted:
        raise ConfigError(f"give at least one scope ({', '.join(SCOPES)})")
    return [s for s in SCOPES if s in wanted]


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_key(
    catalog: Catalog,
    *,
    name: str,
    scopes: list[str] | str,
    expires_in: timedelta | None = None,
    user_id: str | None = None,
    limits: Limits | None = None,
    actor: str = "local",
) -> CreatedKey:
    """Make a key; the catalog keeps its hash, the caller gets the key (once).

    ``limits``: this key's overrides of ``serve.rate_limit`` (None fields: the default)."""
    name = name.strip()
    if not name or len(name) > 128:
        raise ConfigError("a key needs a name of 1 to 128 characters")
    checked = parse_scopes(scopes)
    if expires_in is not None and expires_in <= timedelta(0):
        raise ConfigError("a key's lifetime must be positive")
    if user_id is not None and not (0 < len(user_id) <= 128):
        raise ConfigError("user id must be 1 to 128 characters")
    limits = _checked_limits(limits or Limits())
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    with catalog.session() as s:
        row = ApiKey(
            name=name,
            prefix=plaintext[:PREFIX_LENGTH],
            key_hash=hash_key(plaintext),
            scopes=",".join(checked),
            user_id=user_id,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
            **limits.to_dict(),
        )
        s.add(row)
        s.flush()
        audit.record(
            s,
            actor,
            "key.create",
            f"key:{row.id}",
            prefix=row.prefix,
            name=name,
            scopes=checked,
            expires_at=row.expires_at.isoformat() if row.expires_at else None,
            limits=limits.to_dict(),
        )
        return CreatedKey(plaintext, _info(row))


# ------------------------------------------------------------------------ verification

_cache: dict[tuple[str, str], tuple[float, Principal]] = {}
_cache_lock = threading.Lock()


def _cache_get(url: str, digest: str) -> Principal | None:
    with _cache_lock:
        hit = _cache.get((url, digest))
        if hit is None:
            return None
        if time.monotonic() - hit[0] > CACHE_TTL_S:
            del _cache[(url, digest)]
            return None
        return hit[1]


def _cache_put(url: str, digest: str, principal: Principal) -> None:
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            now = time.monotonic()
            for k in [k for k, (at, _) in _cache.items() if now - at > CACHE_TTL_S]:
                del _cache[k]
            if len(_cache) >= _CACHE_MAX:
                _cache.clear()
        _cache[(url, digest)] = (time.monotonic(), principal)


def clear_cache() -> None:
    """Forget every cached check (revocations in this process do it themselves)."""
    with _cache_lock:
        _cache.clear()


def verify_key(catalog: Catalog, plaintext: str | None) -> Principal:
    """The principal for ``plaintext``; :class:`AuthError` for a missing, malformed,
    unknown, revoked or expired key."""
    digest = _digest(plaintext)
    principal = _cache_get(catalog.url, digest)
    if principal is None:
        assert plaintext is not None  # _digest refused a missing key
        principal = _lookup(catalog, plaintext[:PREFIX_LENGTH], digest)
        _cache_put(catalog.url, digest, principal)
    return _unexpired(principal)


def verify_cached_key(catalog: Catalog, plaintext: str | None) -> Principal | None:
    """:func:`verify_key`'s answer when this process checked the key within
    :data:`CACHE_TTL_S`, without touching the catalog (cheap enough to run on an event
    loop); None when only the catalog can tell. The same errors as ``verify_key``."""
    principal = _cache_get(catalog.url, _digest(plaintext))
    return None if principal is None else _unexpired(principal)


def _digest(plaintext: str | None) -> str:
    if not plaintext:
        raise AuthError("missing API key: send 'Authorization: Bearer gl_…'")
    if (
        len(plaintext) != KEY_LENGTH
        or not plaintext.startswith(KEY_PREFIX)
        or not _KEY_CHARS.issuperset(plaintext[len(KEY_PREFIX) :])
    ):
        raise AuthError("malformed API key: genloop keys read gl_ and 43 more characters")
    return hash_key(plaintext)


def _unexpired(principal: Principal) -> Principal:
    if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
        raise AuthError(f"API key {principal.prefix}… has expired")
    return principal


def _lookup(catalog: Catalog, prefix: str, digest: str) -> Principal:
    with catalog.session() as s:
        rows = list(s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)))
        match = None
        for row in rows:  # compare every candidate: the time spent does not depend on which
            if hmac.compare_digest(row.key_hash.encode(), digest.encode()):
                match = row
        if match is None or match.revoked_at is not None:
            raise AuthError("invalid API key")
        # last use, at most once per CACHE_TTL_S per process (the cache holds it meanwhile)
        s.execute(
            update(ApiKey).where(ApiKey.id == match.id).values(last_used_at=datetime.now(UTC))
        )
        return Principal(
            key_id=match.id,
            name=match.name,
            prefix=match.prefix,
            scopes=frozenset(x for x in match.scopes.split(",") if x),
            user_id=match.user_id,
            expires_at=match.expires_at,
            limits=_limits(match),
        )


# ------------------------------------------------------------------------ management


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=[x for x in row.scopes.split(",") if x],
        user_id=row.user_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        limits=_limits(row),
    )


def _limits(row: ApiKey) -> Limits:
    return Limits(
        row.requests_per_min, row.tokens_per_min, row.tokens_per_day, row.tokens_per_month
    )


LIMIT_FIELDS = tuple(Limits().to_dict())


def parse_limit(text: str, what: str = "limit") -> int | None:
    """A limit as the CLI takes it: a positive number, ``unlimited`` (0: no limit for this
    key) or ``default`` (None: the server's default)."""
    t = text.strip().lower().replace("_", "")
    if t == "default":
        return None
    if t in ("unlimited", "0"):
        return 0
    if t.isdigit() and len(t) <= 15:
        return int(t)
    raise ConfigError(f"invalid {what} {text!r}: give a positive number, 'unlimited' or 'default'")


_LIMIT_MAX = {"requests_per_min": 2**31 - 1, "tokens_per_min": 2**31 - 1}


def _checked_limits(limits: Limits) -> Limits:
    for name, value in limits.to_dict().items():
        top = _LIMIT_MAX.get(name, 10**15 - 1)
        if value is not None and not (0 <= value <= top):
            raise ConfigError(f"{name} must be 0 (no limit for this key) to {top}, not {value}")
    return limits


def _find_with_name(catalog: Catalog, ref: int | str) -> int:
    """:func:`_find`, or else the one unrevoked key with that exact name."""
    try:
        return _find(catalog, ref)
    except (NotFoundError, ConfigError) as exc:
        with catalog.session() as s:
            ids = list(
                s.scalars(
                    select(ApiKey.id).where(ApiKey.name == str(ref), ApiKey.revoked_at.is_(None))
                )
            )
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise ConfigError(f"{len(ids)} keys are named {ref!r}; give the key's id") from None
        raise exc


def set_key_limits(
    catalog: Catalog,
    key_id_or_prefix: int | str,
    changes: dict[str, int | None],
    *,
    actor: str = "local",
) -> KeyInfo:
    """Change the limit overrides of a key (its id, prefix or name): ``{field: value}``
    for the fields named (value None: back to the server's default, 0: no limit for this
    key). Servers apply the change
    within :data:`CACHE_TTL_S` (at once in this process)."""
    unknown = sorted(set(changes) - set(LIMIT_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown limit(s) {', '.join(unknown)}; valid: {', '.join(LIMIT_FIELDS)}"
        )
    if not changes:
        raise ConfigError(
            "give at least one limit to set (--rpm, --tpm, --tokens-per-day, --tokens-per-month)"
        )
    _checked_limits(Limits(**{k: changes.get(k) for k in LIMIT_FIELDS}))
    key_id = _find_with_name(catalog, key_id_or_prefix)
    with catalog.session() as s:
        row = s.get(ApiKey, key_id)
        assert row is not None
        for name, value in changes.items():
            setattr(row, name, value)
        audit.record(s, actor, "key.limits", f"key:{row.id}", prefix=row.prefix, **changes)
        digest = row.key_hash
        info = _info(row)
    with _cache_lock:
        _cache.pop((catalog.url, digest), None)
    return info


def list_keys(catalog: Catalog, *, user_id: str | None = None) -> list[KeyInfo]:
    """Every key (or one user's), oldest first; never the keys themselves."""
    with catalog.session() as s:
        query = select(ApiKey).order_by(ApiKey.id)
        if user_id is not None:
            query = query.where(ApiKey.user_id == user_id)
        return [_info(row) for row in s.scalars(query)]


def _find(catalog: Catalog, key_id_or_prefix: int | str) -> int:
    ref = str(key_id_or_prefix).strip().rstrip("…")  # lists show prefixes as gl_AbCdEfGh…
    with catalog.session() as s:
        if ref.isdigit():
            found = s.scalar(select(ApiKey.id).where(ApiKey.id == int(ref)))
            if found is None:
                raise NotFoundError(f"no API key with id {ref}")
            return found
        if ref.startswith(KEY_PREFIX) and len(ref) > PREFIX_LENGTH:
            raise ConfigError(
                "give the key's id or prefix (first 11 characters, as 'genloop keys list' "
                "shows), not the whole key"
            )
        if len(ref) < 6:
            raise ConfigError(f"{ref!r} is too short to name a key: give its id or prefix")
        ids = list(
            s.scalars(select(ApiKey.id).where(ApiKey.prefix.startswith(ref, autoescape=True)))
        )
        if not ids:
            raise NotFoundError(f"no API key with prefix {ref!r}")
        if len(ids) > 1:
            raise ConfigError(f"prefix {ref!r} matches {len(ids)} keys; give the key's id")
        return ids[0]


def revoke_key(catalog: Catalog, key_id_or_prefix: int | str, *, actor: str = "local") -> KeyInfo:
    """Revoke a key by id or prefix (revoking a revoked key changes nothing)."""
    key_id = _find(catalog, key_id_or_prefix)
    with catalog.session() as s:
        row = s.get(ApiKey, key_id)
        assert row is not None
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
            audit.record(s, actor, "key.revoke", f"key:{row.id}", prefix=row.prefix)
        digest = row.key_hash
        info = _info(row)
    with _cache_lock:
        _cache.pop((catalog.url, digest), None)
    return info

"""API keys: shown once, stored as a hash, refused when unknown, revoked or expired."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from genloop.errors import ConfigError, NotFoundError
from genloop.security import keys
from genloop.security.keys import (
    AuthError,
    ForbiddenError,
    create_key,
    list_keys,
    parse_duration,
    revoke_key,
    verify_cached_key,
    verify_key,
)
from genloop.workspace import Workspace
from genloop.workspace.tables import ApiKey, AuditEvent


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    keys.clear_cache()


def test_a_key_is_stored_only_as_its_hash_and_verifies(catalog_workspace: Workspace) -> None:
    ws = catalog_workspace
    created = create_key(ws.catalog, name="ci", scopes=["generate", "feedback"], user_id="ann")
    key = created.plaintext
    assert key.startswith("gl_") and len(key) == keys.KEY_LENGTH
    assert key not in repr(created)
    with ws.catalog.session() as s:
        row = s.scalars(select(ApiKey)).one()
        stored = [str(getattr(row, c.name)) for c in ApiKey.__table__.columns]
        events = [str(e.details) + e.target for e in s.scalars(select(AuditEvent))]
    assert not any(key in v or key[3:] in v for v in stored + events)
    assert row.key_hash == keys.hash_key(key) and row.prefix == key[:11]

    principal = verify_key(ws.catalog, key)
    assert principal.key_id == created.info.id
    assert principal.scopes == {"generate", "feedback"}
    assert principal.user_id == "ann"
    assert principal.prefix == key[:11]
    with ws.catalog.session() as s:
        assert s.scalars(select(ApiKey.last_used_at)).one() is not None


def test_unknown_and_revoked_keys_get_the_same_answer(workspace: Workspace) -> None:
    key = create_key(workspace.catalog, name="a", scopes="generate").plaintext
    verify_key(workspace.catalog, key)  # cached now
    revoke_key(workspace.catalog, key[:11])
    with pytest.raises(AuthError) as revoked:
        verify_key(workspace.catalog, key)  # at once in the revoking process
    lookalike = key[:11] + ("A" if key[11] != "A" else "B") + key[12:]  # same prefix
    with pytest.raises(AuthError) as unknown:
        verify_key(workspace.catalog, lookalike)
    assert str(revoked.value) == str(unknown.value) == "invalid API key"
    assert revoked.value.http_status == 401


@pytest.mark.parametrize(
    ("presented", "message"),
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("gl_short", "malformed"),
        ("sk-" + "a" * 43, "malformed"),
        ("gl_" + "a" * 42 + "!", "malformed"),
    ],
)
def test_missing_and_malformed_keys_are_refused(
    workspace: Workspace, presented: str | None, message: str
) -> None:
    with pytest.raises(AuthError, match=message):
        verify_key(workspace.catalog, presented)


def test_expired_keys_are_refused_even_from_the_cache(workspace: Workspace) -> None:
    created = create_key(
        workspace.catalog, name="short", scopes="generate", expires_in=timedelta(hours=1)
    )
    verify_key(workspace.catalog, created.plaintext)
    assert created.info.expires_at is not None
    with workspace.catalog.session() as s:
        s.execute(update(ApiKey).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    keys.clear_cache()
    with pytest.raises(AuthError, match="has expired"):
        verify_key(workspace.catalog, created.plaintext)
    assert list_keys(workspace.catalog)[0].status == "expired"


def test_a_revocation_elsewhere_takes_effect_within_the_cache_ttl(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "CACHE_TTL_S", 0.3)
    key = create_key(workspace.catalog, name="a", scopes="generate").plaintext
    verify_key(workspace.catalog, key)
    with workspace.catalog.session() as s:  # another replica revokes it in the database
        s.execute(update(ApiKey).values(revoked_at=datetime.now(UTC)))
    verify_key(workspace.catalog, key)  # still cached here
    time.sleep(0.35)
    with pytest.raises(AuthError, match="invalid API key"):
        verify_key(workspace.catalog, key)


def test_the_cached_check_answers_only_what_verify_key_checked(workspace: Workspace) -> None:
    """What the server's event loop relies on: no catalog query, the same answers."""
    key = create_key(workspace.catalog, name="a", scopes="generate").plaintext
    assert verify_cached_key(workspace.catalog, key) is None  # never checked here: ask
    principal = verify_key(workspace.catalog, key)
    assert verify_cached_key(workspace.catalog, key) == principal
    with pytest.raises(AuthError, match="malformed"):
        verify_cached_key(workspace.catalog, key[:-1])
    revoke_key(workspace.catalog, principal.prefix)
    assert verify_cached_key(workspace.catalog, key) is None  # revoked here: forgotten


def test_scopes_are_enforced_and_admin_implies_the_others(workspace: Workspace) -> None:
    gen = verify_key(
        workspace.catalog, create_key(workspace.catalog, name="g", scopes="generate").plaintext
    )
    gen.require("generate")
    with pytest.raises(ForbiddenError, match="lacks the 'admin' scope") as info:
        gen.require("admin")
    assert info.value.http_status == 403
    with pytest.raises(ForbiddenError):
        gen.require("feedback")
    admin = verify_key(
        workspace.catalog, create_key(workspace.catalog, name="ad", scopes="admin").plaintext
    )
    for scope in ("generate", "feedback", "admin"):
        admin.require(scope)


def test_bad_scopes_names_and_lifetimes_are_refused(workspace: Workspace) -> None:
    with pytest.raises(ConfigError, match=r"unknown scope.*superuser.*valid: generate"):
        create_key(workspace.catalog, name="x", scopes="generate,superuser")
    with pytest.raises(ConfigError, match="at least one scope"):
        create_key(workspace.catalog, name="x", scopes=" , ")
    with pytest.raises(ConfigError, match="name"):
        create_key(workspace.catalog, name="  ", scopes="generate")
    with pytest.raises(ConfigError, match="positive"):
        create_key(workspace.catalog, name="x", scopes="generate", expires_in=timedelta(0))
    assert list_keys(workspace.catalog) == []


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration(" 2w ") == timedelta(weeks=2)
    for bad in ("", "30", "d", "0d", "-1d", "1.5h", "10y"):
        with pytest.raises(ConfigError, match="invalid duration"):
            parse_duration(bad)


def test_list_and_revoke_by_id_or_prefix(workspace: Workspace) -> None:
    a = create_key(workspace.catalog, name="a", scopes="generate")
    b = create_key(workspace.catalog, name="b", scopes="admin", user_id="bob")
    listed = list_keys(workspace.catalog)
    assert [(k.name, k.status) for k in listed] == [("a", "active"), ("b", "active")]
    dumped = str([k.to_dict() for k in listed])
    assert a.plaintext not in dumped and b.plaintext not in dumped
    assert "key_hash" not in dumped
    assert [k.name for k in list_keys(workspace.catalog, user_id="bob")] == ["b"]

    assert revoke_key(workspace.catalog, str(a.info.id)).status == "revoked"
    assert revoke_key(workspace.catalog, b.info.prefix + "…").status == "revoked"
    assert revoke_key(workspace.catalog, a.info.id).status == "revoked"  # again: no change
    with workspace.catalog.session() as s:
        actions = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    assert actions == ["key.create", "key.create", "key.revoke", "key.revoke"]

    with pytest.raises(NotFoundError, match="no API key with id 99"):
        revoke_key(workspace.catalog, "99")
    with pytest.raises(NotFoundError, match="no API key with prefix"):
        revoke_key(workspace.catalog, "gl_zzzzzzzz")
    with pytest.raises(ConfigError, match="not the whole key"):
        revoke_key(workspace.catalog, a.plaintext)
    with pytest.raises(ConfigError, match="too short"):
        revoke_key(workspace.catalog, "gl_")


def test_an_ambiguous_prefix_is_refused(workspace: Workspace) -> None:
    for i in range(2):
        create_key(workspace.catalog, name=f"k{i}", scopes="generate")
    with workspace.catalog.session() as s:  # two prefixes that share their first 9 characters
        for key_id, tail in ((1, "xy"), (2, "zw")):
            s.execute(update(ApiKey).where(ApiKey.id == key_id).values(prefix="gl_abcdef" + tail))
    with pytest.raises(ConfigError, match="matches 2 keys"):
        revoke_key(workspace.catalog, "gl_abcdef")
    with pytest.raises(NotFoundError):  # '_' is matched literally, not as a LIKE wildcard
        revoke_key(workspace.catalog, "glXabcdef")
    assert revoke_key(workspace.catalog, "gl_abcdefzw").id == 2
    assert [k.status for k in list_keys(workspace.catalog)] == ["active", "revoked"]

"""Migration 0004 (per-key limits on ``api_keys``) up and down, keys kept, on SQLite and
PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from genloop.workspace import db as catalog_db

COLUMNS = {"requests_per_min", "tokens_per_min", "tokens_per_day", "tokens_per_month"}


def _columns(engine: sa.Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("api_keys")}


def test_key_quotas_migrate_up_and_down_keeping_keys(catalog_url: str) -> None:
    engine = catalog_db.make_engine(catalog_url)
    try:
        catalog_db.upgrade(engine, "0003")
        assert not COLUMNS & _columns(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (name, prefix, key_hash, scopes, created_at) "
                    "VALUES ('old', 'gl_abcdefgh', :h, 'generate', :t)"
                ),
                {"h": "0" * 64, "t": datetime.now(UTC)},
            )
        catalog_db.upgrade(engine, "0004")
        assert _columns(engine) >= COLUMNS
        with engine.begin() as conn:  # an old key: every limit is the server's default
            row = conn.execute(sa.text("SELECT * FROM api_keys")).mappings().one()
            assert row["name"] == "old" and all(row[c] is None for c in COLUMNS)
            big = 5 * 10**12  # a month of tokens beyond 32 bits
            conn.execute(sa.text("UPDATE api_keys SET tokens_per_month = :m"), {"m": big})
            assert conn.execute(sa.text("SELECT tokens_per_month FROM api_keys")).scalar() == big
        catalog_db.downgrade(engine, "0003")
        assert not COLUMNS & _columns(engine)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM api_keys")).scalar() == "old"
        assert catalog_db.current_revision(engine) == "0003"
    finally:
        engine.dispose()

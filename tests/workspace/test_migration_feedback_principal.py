"""Migration 0003: feedback rows gain a principal; existing rows get the bucket curation
used before (the user label, else the key that made the request), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa

from genloop.workspace import db as catalog_db


def test_principal_is_added_backfilled_and_dropped(catalog_url: str) -> None:
    engine = catalog_db.make_engine(catalog_url)
    try:
        catalog_db.upgrade(engine, "0002")
        now = "2026-12-07 12:00:00+00:00"
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, name, prefix, key_hash, scopes, created_at) "
                    "VALUES (7, 'app', 'gl_abcdefgh', :h, :scopes, :now)"
                ),
                {"h": "0" * 64, "scopes": "generate", "now": now},
            )
            for rid, key in (("r1", 7), ("r2", None)):
                conn.execute(
                    sa.text(
                        "INSERT INTO requests (id, api_key_id, endpoint, model_name, params, "
                        "prompt_tokens, completion_tokens, status, flags, created_at) VALUES "
                        "(:id, :key, 'completions', 'tiny', '{}', 0, 0, 200, '[]', :now)"
                    ),
                    {"id": rid, "key": key, "now": now},
                )
            for fid, rid, user in ((1, "r1", "alice"), (2, "r1", None), (3, "r2", None)):
                conn.execute(
                    sa.text(
                        "INSERT INTO feedback (id, request_id, user_id, rating, status, "
                        "created_at) VALUES (:id, :rid, :user, 1, 'pending', :now)"
                    ),
                    {"id": fid, "rid": rid, "user": user, "now": now},
                )

        catalog_db.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, principal FROM feedback ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, "user:alice"), (2, "key:7"), (3, None)]
        indexes = {i["name"] for i in sa.inspect(engine).get_indexes("feedback")}
        assert "ix_feedback_principal" in indexes

        catalog_db.downgrade(engine, "0002")
        columns = {c["name"] for c in sa.inspect(engine).get_columns("feedback")}
        assert "principal" not in columns and "user_id" in columns
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM feedback")).scalar() == 3
    finally:
        engine.dispose()

"""The catalog: migrations on SQLite and PostgreSQL, schema vs models, pragmas, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from genloop.errors import WorkspaceError
from genloop.workspace import Workspace, init_workspace
from genloop.workspace import db as catalog_db
from genloop.workspace.tables import (
    AuditEvent,
    Base,
    Dataset,
    DatasetVersion,
    ModelVersion,
)

TABLES = {
    "datasets",
    "dataset_versions",
    "runs",
    "run_metrics",
    "model_versions",
    "aliases",
    "alias_history",
    "evaluations",
    "api_keys",
    "requests",
    "usage",
    "feedback",
    "alerts",
    "audit_events",
    "locks",
    "label_tasks",
    "label_items",
    "labels",
}


def _tables(engine: sa.Engine) -> set[str]:
    return set(catalog_db.table_names(engine)) - {"alembic_version"}


def test_models_declare_every_table() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_upgrade_downgrade_upgrade(catalog_url: str) -> None:
    engine = catalog_db.make_engine(catalog_url)
    try:
        head = catalog_db.head_revision(engine)
        assert head is not None
        assert _tables(engine) == set()

        catalog_db.upgrade(engine)
        assert _tables(engine) == TABLES
        assert catalog_db.current_revision(engine) == head

        catalog_db.downgrade(engine, "base")
        assert _tables(engine) == set()
        assert catalog_db.current_revision(engine) is None

        catalog_db.upgrade(engine)
        assert _tables(engine) == TABLES
        assert catalog_db.current_revision(engine) == head
    finally:
        engine.dispose()


def test_migrated_schema_matches_models(catalog_url: str) -> None:
    engine = catalog_db.make_engine(catalog_url)
    try:
        catalog_db.upgrade(engine)
        with engine.connect() as conn:
            # The same comparison options as migrations/env.py uses for autogenerate.
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []

            # The comparison is not vacuous: a table the database lacks is reported.
            extra = sa.MetaData()
            for table in Base.metadata.tables.values():
                table.to_metadata(extra)
            sa.Table("not_migrated", extra, sa.Column("id", sa.Integer, primary_key=True))
            diffs = compare_metadata(context, extra)
            assert [d[0] for d in diffs] == ["add_table"]
    finally:
        engine.dispose()


def test_sqlite_pragmas_on_every_connection(workspace: Workspace) -> None:
    engine = workspace.catalog.engine
    assert engine.dialect.name == "sqlite"
    # Hold several connections at once so the pool has to open new ones.
    conns = [engine.connect() for _ in range(3)]
    try:
        for conn in conns:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")
            }
            assert pragmas == {
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": 2,  # FULL
                "busy_timeout": catalog_db.SQLITE_BUSY_TIMEOUT_MS,
            }
    finally:
        for conn in conns:
            conn.close()
    assert (workspace.root / "catalog.db-wal").exists()


def test_foreign_keys_enforced(catalog_workspace: Workspace) -> None:
    catalog = catalog_workspace.catalog
    with pytest.raises(DBIntegrityError), catalog.session() as s:
        s.add(ModelVersion(name="m", version=1, family="causal_lm", artifact="x", run_id="nope"))
    with catalog.session() as s:
        s.add(Dataset(name="d"))
    with catalog.session() as s:
        dataset_id = s.scalars(sa.select(Dataset.id)).one()
        s.add(DatasetVersion(dataset_id=dataset_id, version=1, content_hash="h", artifact="a"))
    with catalog.session() as s:  # ON DELETE CASCADE reaches the versions
        s.execute(sa.delete(Dataset).where(Dataset.id == dataset_id))
    with catalog.session() as s:
        assert s.scalars(sa.select(DatasetVersion)).all() == []


def test_datetimes_come_back_utc_aware(tmp_path: Path, catalog_url: str) -> None:
    url = make_url(catalog_url)
    if url.get_backend_name() == "postgresql":
        # A session time zone other than UTC must still give UTC datetimes back.
        url = url.update_query_dict({"options": "-c timezone=Asia/Kolkata"})
    ws = init_workspace(tmp_path / "ws", database_url=url.render_as_string(hide_password=False))
    try:
        ist = timezone(timedelta(hours=5, minutes=30))
        aware = datetime(2025, 3, 1, 12, 0, tzinfo=ist)
        naive = datetime(2025, 3, 1, 12, 0)  # naive means UTC
        with ws.catalog.session() as s:
            s.add(AuditEvent(actor="t", action="aware", at=aware))
            s.add(AuditEvent(actor="t", action="naive", at=naive))
            s.add(AuditEvent(actor="t", action="default"))
        with ws.catalog.session() as s:
            rows = {e.action: e.at for e in s.scalars(sa.select(AuditEvent))}
        for value in rows.values():
            assert value.tzinfo is not None
            assert value.utcoffset() == timedelta(0)
        assert rows["aware"] == aware
        assert rows["naive"] == naive.replace(tzinfo=UTC)
        assert abs(rows["default"] - datetime.now(UTC)) < timedelta(minutes=5)
    finally:
        ws.close()


def test_init_is_idempotent(tmp_path: Path) -> None:
    init_workspace(tmp_path / "ws").close()
    with init_workspace(tmp_path / "ws") as ws:
        assert catalog_db.current_revision(ws.catalog.engine) == catalog_db.head_revision(
            ws.catalog.engine
        )
    with Workspace.open(tmp_path / "ws") as ws:
        assert ws.catalog.backend == "sqlite"
        assert ws.store.root == tmp_path / "ws" / "artifacts"


def test_open_missing_workspace_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="genloop init") as exc:
        Workspace.open(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(exc.value)
    assert not (tmp_path / "nowhere").exists()  # opening never creates anything


def test_open_finds_workspace_through_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_workspace(tmp_path / "home").close()
    monkeypatch.setenv("GENLOOP_HOME", str(tmp_path / "home"))
    with Workspace.open() as ws:
        assert ws.root == tmp_path / "home"


def test_open_unmigrated_catalog_says_run_init(tmp_path: Path) -> None:
    (tmp_path / "ws" / "artifacts").mkdir(parents=True)
    with pytest.raises(WorkspaceError, match="genloop init"):
        Workspace.open(tmp_path / "ws")


@pytest.mark.parametrize("opener", ["init", "open"])
def test_unreachable_postgres_is_one_line_error(tmp_path: Path, opener: str) -> None:
    (tmp_path / "ws" / "artifacts").mkdir(parents=True)
    url = "postgresql://genloop:s3cret@127.0.0.1:1/catalog"
    with pytest.raises(WorkspaceError) as exc:
        if opener == "init":
            init_workspace(tmp_path / "ws", database_url=url)
        else:
            Workspace.open(tmp_path / "ws", database_url=url)
    message = str(exc.value)
    assert "\n" not in message
    assert "127.0.0.1" in message
    assert "s3cret" not in message  # the password is redacted


def test_invalid_database_url(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="invalid database URL"):
        init_workspace(tmp_path / "ws", database_url="not a url")


def test_normalize_url() -> None:
    assert catalog_db.normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert catalog_db.normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert catalog_db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_catalog_from_newer_genloop_is_refused(tmp_path: Path) -> None:
    with init_workspace(tmp_path / "ws") as ws, ws.catalog.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    for opener in (Workspace.open, init_workspace):
        with pytest.raises(WorkspaceError, match="upgrade genloop"):
            opener(tmp_path / "ws")


def test_file_that_is_not_a_database_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "ws" / "artifacts").mkdir(parents=True)
    (tmp_path / "ws" / "catalog.db").write_bytes(b"definitely not sqlite" * 300)
    with pytest.raises(WorkspaceError, match="not a database") as exc:
        Workspace.open(tmp_path / "ws")
    assert "\n" not in str(exc.value)


@pytest.mark.postgres
def test_processes_migrating_one_postgres_at_once_take_turns(pg_url: str) -> None:
    """N replicas starting together against an empty database: one migrates, the others
    wait on the advisory lock and find the schema at head (without it, the second
    CREATE TABLE fails)."""
    import subprocess
    import sys

    from ..conftest import reset_postgres

    reset_postgres(pg_url)
    # separate interpreters, as replicas are (no pickled test function: a pool whose worker
    # cannot load its task waits forever); each migrates and exits 0, or prints why not
    script = (
        "import sys; from genloop.workspace import db; c = db.Catalog(sys.argv[1]); c.migrate()"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, pg_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    catalog = catalog_db.Catalog(pg_url)
    try:
        assert catalog_db.current_revision(catalog.engine) == catalog_db.head_revision(
            catalog.engine
        )
    finally:
        catalog.dispose()

"""Catalog connections and migrations.

SQLite by default (``<workspace>/catalog.db``), PostgreSQL when ``$GENLOOP_DATABASE_URL``
(or ``database_url``) says so. SQLite runs in WAL mode with foreign keys on, a busy
timeout so concurrent writers wait instead of failing, and ``synchronous=FULL`` so a
committed row survives a power cut. The schema is owned by Alembic. On PostgreSQL,
migrations run under a session advisory lock, so N replicas starting at once against a
fresh database migrate it once: the first takes the lock and upgrades, the others wait,
then find the schema at head and do nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from genloop.errors import WorkspaceError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
# pg_advisory_lock key for schema changes and start-up work (a bigint; "genloop" in ASCII)
STARTUP_LOCK_KEY = 0x67656E6C6F6F70


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
        raise WorkspaceError(f"invalid database URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev: str | None = MigrationContext.configure(conn).get_current_revision()
        return rev


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    head: str | None = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    return head


def known_revision(engine: Engine, revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return (
            ScriptDirectory.from_config(alembic_config(engine)).get_revision(revision) is not None
        )
    except CommandError:
        return False


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())


class Catalog:
    """A connection pool to the catalog and a way to open transactions on it."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, *, write_lock: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on an exception.

        ``write_lock=True`` is for read-then-write transactions (promote, rollback). On
        SQLite it takes the database's write lock up front (``BEGIN IMMEDIATE``): the
        driver otherwise starts the transaction only at the first write, so two writers
        could both act on the same stale read. On PostgreSQL, lock the rows you read
        with ``SELECT ... FOR UPDATE`` instead.
        """
        with self._sessions.begin() as s:
            if write_lock and self.backend == "sqlite":
                s.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield s

    @contextmanager
    def startup_lock(self) -> Iterator[None]:
        """Hold the catalog-wide start-up lock for the block (PostgreSQL; SQLite's own
        write lock already serializes its writers on one machine).

        A session advisory lock on a connection of its own: the block may open others
        (Alembic does), and the lock goes with the session if the process dies.
        """
        if self.backend != "postgresql":
            yield
            return
        with self._reachable(), self.engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({STARTUP_LOCK_KEY})")
            conn.commit()
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({STARTUP_LOCK_KEY})")
                conn.commit()

    def migrate(self) -> None:
        """Bring the schema to this genloop's head revision (nothing to do when it is there).

        Safe to run from many processes at once: they take turns (:meth:`startup_lock`).
        """
        with self.startup_lock(), self._reachable():
            before = current_revision(self.engine)
            self._refuse_unknown(before)
            upgrade(self.engine)
        after = head_revision(self.engine)
        if before != after:
            log.info(
                "catalog migrated from %s to %s",
                before or "an empty database",
                after,
                extra={"database": self.redacted_url()},
            )

    def check_schema(self) -> None:
        """Refuse to run against a catalog that is older or newer than this genloop."""
        with self._reachable():
            have = current_revision(self.engine)
        self._refuse_unknown(have)
        want = head_revision(self.engine)
        if have != want:
            raise WorkspaceError(
                f"catalog schema is at {have or 'nothing'}, this genloop needs {want}; "
                "run 'genloop init' to migrate it"
            )

    def _refuse_unknown(self, revision: str | None) -> None:
        if revision is not None and not known_revision(self.engine, revision):
            raise WorkspaceError(
                f"catalog schema is at {revision}, which this genloop does not know: a newer "
                "genloop migrated it; upgrade genloop to use this workspace"
            )

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:  # unreachable server, bad credentials, not a database…
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise WorkspaceError(
                f"cannot use the catalog database {self.redacted_url()}: {first}"
            ) from exc

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def redacted_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

"""Shared fixtures and helpers: a SQLite workspace per test, one PostgreSQL database per
session, torch on one thread, a small training corpus, and ``genloop`` run as a user runs it.

PostgreSQL tests use ``$GENLOOP_TEST_POSTGRES_URL`` (default: the local server, database
``test``) to create a throwaway ``genloop_test_<hex>`` database, dropped at the end. When the
server is unreachable they are skipped, except under CI (``$CI`` set), where they fail.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from genloop.workspace import Workspace, init_workspace

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PROSE = (
    "the cat sat on the mat and the dog ran to the park while birds sang in the tall green "
    "trees near a quiet river where children play every sunny day"
)


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own workspace or catalog must never leak into a test."""
    monkeypatch.delenv("GENLOOP_HOME", raising=False)
    monkeypatch.delenv("GENLOOP_DATABASE_URL", raising=False)


@contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """torch's intra-op thread count set to 1 inside the block, put back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a whole module, its module-scoped fixtures included; a module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.

    The tests' models are tiny: they gain nothing from a second thread, and one thread per
    test process keeps tests (and the processes some of them start) from fighting over the
    machine's two cores.
    """
    with torch_on_one_thread():
        yield


@pytest.fixture(scope="module")
def no_report_plots() -> Iterator[None]:
    """The evaluation reports without their plots, which cost time and are tested in
    tests/evaluate/test_run.py; a module asks for it with ``pytestmark``."""
    from genloop.evaluate import report

    with pytest.MonkeyPatch.context() as m:
        m.setattr(report, "metric_bars", lambda result: None)
        m.setattr(report, "per_sample_histogram", lambda name, values: None)
        yield


def write_corpus(root: Path, docs: int = 40) -> Path:
    """``docs`` short text files of sentences drawn from ``PROSE`` (the same for every call),
    under ``root``: a tiny model learns them fast."""
    words = PROSE.split()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        rng = random.Random(i)
        starts = [rng.randrange(len(words) - 6) for _ in range(8)]
        text = " ".join(" ".join(words[k : k + 6]) + "." for k in starts)
        (root / f"doc{i:02d}.txt").write_text(f"{text} doc {i}.\n", encoding="utf-8")
    return root


def prose_workspace(root: Path, dataset: str) -> Workspace:
    """A workspace under ``root`` holding ``dataset``: :func:`write_corpus`'s files, a
    320-token BPE tokenizer, windows of 32 tokens, 10% validation and 5% test."""
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    workspace = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": dataset,
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.05},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320, seq_len=32))
    return workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    """A fresh workspace with a SQLite catalog."""
    ws = init_workspace(tmp_path / "ws")
    yield ws
    ws.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of a PostgreSQL database created for this test session (dropped afterwards)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin_url = make_url(os.environ.get("GENLOOP_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL)
    if admin_url.drivername in ("postgresql", "postgres"):
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"genloop_test_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        reason = f"PostgreSQL unreachable at {admin_url.render_as_string(hide_password=True)}: "
        reason += str(exc.orig or exc).strip().splitlines()[0]
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so PostgreSQL tests must run)", pytrace=False)
        pytest.skip(reason)
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def reset_postgres(url: str) -> None:
    """Empty the session database so each test starts from no schema at all."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            # A test that leaked a connection holding locks should fail here, not hang.
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty catalog database URL: a new SQLite file, or the emptied PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    url: str = request.getfixturevalue("pg_url")
    reset_postgres(url)
    return url


@pytest.fixture
def catalog_workspace(tmp_path: Path, catalog_url: str) -> Iterator[Workspace]:
    """A fresh workspace on each catalog backend (SQLite, PostgreSQL)."""
    ws = init_workspace(tmp_path / "ws", database_url=catalog_url)
    yield ws
    ws.close()


class CliResult:
    """What a user sees from one ``genloop`` command: exit code, stdout and stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_genloop(home: Workspace | Path, *args: object) -> CliResult:
    """``genloop ARGS`` through its console entry point in this process (no torch re-import),
    with ``GENLOOP_HOME`` set to ``home`` (a workspace or its root): argv, exit code, stdout
    and stderr as a user sees them."""
    import io
    import logging
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    from genloop.cli.main import main

    root = home.root if isinstance(home, Workspace) else home
    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("genloop")  # the CLI sets it up; put it back afterwards
    with pytest.MonkeyPatch.context() as m, redirect_stdout(out), redirect_stderr(err):
        m.setenv("GENLOOP_HOME", str(root))
        m.setattr(sys, "argv", ["genloop", *map(str, args)])
        m.setattr(logger, "handlers", list(logger.handlers))
        m.setattr(logger, "propagate", logger.propagate)
        m.setattr(logger, "level", logger.level)
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def genloop_cli() -> object:
    """``genloop_cli(ws_root, *args)``: ``run_genloop`` as a fixture (a module-scoped fixture
    imports ``run_genloop`` itself: ``from ..conftest import run_genloop``)."""
    return run_genloop

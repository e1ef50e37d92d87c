"""Fixtures for the tuning tests: a fixture corpus prepared as dataset ``fx``, and a tiny
1-layer, 32-wide model config that trains 20 steps and validates every 5."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
from genloop.data.prepare import prepare_dataset
from genloop.tune.storage import OPTUNA_SCHEMA
from genloop.workspace import Workspace, init_workspace

from ..conftest import write_corpus


def prepare(ws: Workspace, corpus: Path) -> None:
    data = DataConfig.model_validate(
        {
            "name": "fx",
            "sources": [{"type": "files", "paths": [str(corpus)]}],
            "split": {"val": 0.1, "test": 0.05},
            "workers": 1,
        }
    )
    prepare_dataset(ws, data, TokenizerConfig(vocab_size=320, seq_len=32))


def spec(name: str, space: dict[str, Any], *, train: dict[str, Any] | None = None,
         **tune: Any) -> dict[str, Any]:  # fmt: skip
    """The config mapping of a study ``name`` over ``space`` (``tune`` and ``train`` keys
    on top of the defaults below)."""
    return {
        "name": name,
        "tokenizer": {"vocab_size": 320, "seq_len": 32},
        "model": {"preset": "tiny", "n_layer": 1, "n_embd": 32, "n_head": 2},
        "train": {
            "dataset": "fx",
            "lr": 3e-3,
            "min_lr": 1e-7,
            "warmup_steps": 2,
            "max_steps": 20,
            "batch_size": 8,
            "eval_every": 5,
            "eval_batches": 2,
            "checkpoint_every": 100,
            "device": "cpu",
            **(train or {}),
        },
        "tune": {"space": space, **tune},
    }


@pytest.fixture
def make_spec() -> Callable[..., dict[str, Any]]:
    return spec


@pytest.fixture
def config() -> Callable[..., GenloopConfig]:
    def make(name: str, space: dict[str, Any], **kwargs: Any) -> GenloopConfig:
        return GenloopConfig.model_validate(spec(name, space, **kwargs))

    return make


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every tuning test module on one torch thread, its module-scoped fixtures included."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tune") / "corpus")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Iterator[Workspace]:
    """A SQLite workspace holding the prepared fixture dataset ``fx``, shared by a module."""
    workspace = init_workspace(tmp_path_factory.mktemp("tune_ws") / "ws")
    prepare(workspace, corpus)
    yield workspace
    workspace.close()


@pytest.fixture
def any_ws(tmp_path: Path, catalog_url: str, corpus: Path) -> Iterator[Workspace]:
    """A fresh workspace with ``fx`` on each catalog backend (on PostgreSQL, Optuna's
    schema is emptied too, as the shared fixture empties genloop's)."""
    if make_url(catalog_url).get_backend_name() == "postgresql":
        engine = create_engine(catalog_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {OPTUNA_SCHEMA} CASCADE"))
        finally:
            engine.dispose()
    workspace = init_workspace(tmp_path / "ws", database_url=catalog_url)
    prepare(workspace, corpus)
    yield workspace
    workspace.close()

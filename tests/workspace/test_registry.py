"""The model registry: refs, versions, lineage, aliases, promote/rollback, diff, races."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from genloop.errors import ConflictError, GenloopError, IntegrityError, NotFoundError
from genloop.workspace import Workspace, registry
from genloop.workspace.refs import ModelRef, RefError, parse_ref
from genloop.workspace.tables import AliasHistory, AuditEvent, Dataset, DatasetVersion, Run


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A stand-in model directory: any files will do."""
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 32}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (d / "sub" / "tokenizer.json").write_text("{}")
    (d / "MANIFEST.sha256").write_text("stale manifest from elsewhere\n")
    return d


def _register(ws: Workspace, src: Path, name: str = "m", **kw: Any) -> registry.ModelVersionInfo:
    return registry.register_model(ws, name, "causal_lm", src, **kw)


# --- refs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("m", ModelRef("m")),
        ("coder-1.5b_v2", ModelRef("coder-1.5b_v2")),
        ("m@3", ModelRef("m", version=3)),
        ("m@production", ModelRef("m", alias="production")),
        ("m@canary_2", ModelRef("m", alias="canary_2")),
    ],
)
def test_parse_ref(text: str, ref: ModelRef) -> None:
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@",
        "@1",
        "@production",
        "m@",
        "m@0",
        "m@00",
        "m@-1",
        "m@1.5",
        "m@1@2",
        "m@2x",
        "m@prod uction",
        "a/b",
        "../m",
        "bad name!",
        ".m",
        "-m",
        "m.",
        "m@²",  # a digit to str.isdigit(), not to int()
        "m@٣",  # Arabic-Indic three: not a version number either
        "x" * 129,
    ],
)
def test_parse_ref_errors(text: str) -> None:
    with pytest.raises(RefError) as exc:
        parse_ref(text)
    assert exc.value.exit_code == 2
    assert "\n" not in str(exc.value)


# --- versions and refs --------------------------------------------------------------------


def test_register_and_resolve(workspace: Workspace, model_dir: Path) -> None:
    infos = [_register(workspace, model_dir, metrics={"loss": 3.0 - i}) for i in range(3)]
    assert [i.version for i in infos] == [1, 2, 3]
    assert registry.resolve(workspace, "m").version == 3
    assert registry.resolve(workspace, "m@2").version == 2
    assert registry.resolve(workspace, ModelRef("m", version=1)).metrics == {"loss": 3.0}
    registry.promote(workspace, "m@2")
    assert registry.resolve(workspace, "m@production").version == 2
    assert registry.resolve(workspace, "m@2").aliases == ["production"]

    path = registry.artifact_path(workspace, "m@production")
    assert path == workspace.store.path("models/m/2")
    assert (path / "config.json").read_text() == '{"hidden_size": 32}'
    assert (path / "sub" / "tokenizer.json").exists()
    manifest = (path / "MANIFEST.sha256").read_text()
    assert "stale" not in manifest
    assert "genloop.json" in manifest


def test_register_links_files_from_a_scratch_directory(
    workspace: Workspace, model_dir: Path
) -> None:
    """Big imports are not copied twice: the store hard-links the staged files, and the
    staged directory stays as it was (a retry after a lost version race reuses it)."""
    with workspace.store.scratch() as scratch:
        staged = scratch / "model"
        shutil.copytree(model_dir, staged)
        (staged / "genloop.json").write_text('{"from": "the staged copy"}')
        info = _register(workspace, staged, link_files=True)
        path = registry.artifact_path(workspace, info.ref)  # the manifest verifies
        weights = path / "model.safetensors"
        assert weights.stat().st_ino == (staged / "model.safetensors").stat().st_ino
        assert json.loads((staged / "genloop.json").read_text()) == {"from": "the staged copy"}
        assert json.loads((path / "genloop.json").read_text())["name"] == "m"
        again = _register(workspace, staged, link_files=True)
    assert again.version == 2 and weights.read_bytes() == bytes(range(256)) * 8


def test_resolve_errors_name_what_exists(workspace: Workspace, model_dir: Path) -> None:
    with pytest.raises(NotFoundError, match="no model named 'm'"):
        registry.resolve(workspace, "m")
    _register(workspace, model_dir)
    with pytest.raises(NotFoundError, match=r"no version 7 \(newest: 1\)"):
        registry.resolve(workspace, "m@7")
    with pytest.raises(NotFoundError, match="no alias 'production'"):
        registry.resolve(workspace, "m@production")
    registry.promote(workspace, "m@1", "staging")
    with pytest.raises(NotFoundError, match=r"aliases of m: staging"):
        registry.resolve(workspace, "m@production")
    with pytest.raises(NotFoundError, match="models: m"):
        registry.resolve(workspace, "other@production")


def test_register_errors(workspace: Workspace, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RefError):
        _register(workspace, model_dir, name="bad/name")
    with pytest.raises(GenloopError, match="unknown model family 'rnn'"):
        registry.register_model(workspace, "m", "rnn", model_dir)
    with pytest.raises(NotFoundError, match="does not exist"):
        _register(workspace, tmp_path / "missing")
    with pytest.raises(NotFoundError, match="no run 'nope'"):
        _register(workspace, model_dir, run_id="nope")
    with pytest.raises(NotFoundError, match="dataset version"):
        _register(workspace, model_dir, dataset_version_id=42)
    with pytest.raises(NotFoundError, match="no model named 'base'"):
        _register(workspace, model_dir, parent="base")
    assert registry.list_models(workspace) == []
    assert workspace.store.keys() == []


def test_interrupted_registration_is_skipped(workspace: Workspace, model_dir: Path) -> None:
    # A crash between publishing the artifact and inserting the row leaves a directory
    # with no catalog row; later registrations must not trip over it forever.
    workspace.store.put_dir("models/m/1", model_dir)
    assert _register(workspace, model_dir).version == 2
    assert _register(workspace, model_dir).version == 3


def test_genloop_json_has_lineage(workspace: Workspace, model_dir: Path) -> None:
    with workspace.catalog.session() as s:
        s.add(Run(id="r1", name="train"))
        ds = Dataset(name="d")
        s.add(ds)
        s.flush()
        dv = DatasetVersion(dataset_id=ds.id, version=1, content_hash="h", artifact="datasets/d/1")
        s.add(dv)
        s.flush()
        dv_id = dv.id
    base = _register(workspace, model_dir, name="base")
    info = _register(
        workspace,
        model_dir,
        parent="base",
        run_id="r1",
        dataset_version_id=dv_id,
        config={"lr": 0.001, "model": {"layers": 2}},
        metrics={"val_loss": 1.25},
        tags={"variant": "lora"},
    )
    meta = json.loads((registry.artifact_path(workspace, "m@1") / "genloop.json").read_text())
    assert meta["name"] == "m"
    assert meta["version"] == 1
    assert meta["family"] == "causal_lm"
    assert meta["parent"] == base.ref == "base@1"
    assert meta["run_id"] == "r1"
    assert meta["dataset_version_id"] == dv_id
    assert meta["config"] == {"lr": 0.001, "model": {"layers": 2}}
    assert meta["metrics"] == {"val_loss": 1.25}
    assert meta["tags"] == {"variant": "lora"}
    assert info.parent == "base@1"
    assert info.run_id == "r1"


def test_tampered_model_refused(workspace: Workspace, model_dir: Path) -> None:
    _register(workspace, model_dir)
    path = workspace.store.path("models/m/1")
    (path / "model.safetensors").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        registry.artifact_path(workspace, "m")


def test_list_models(workspace: Workspace, model_dir: Path) -> None:
    assert registry.list_models(workspace) == []
    _register(workspace, model_dir, name="b")
    _register(workspace, model_dir, name="a")
    _register(workspace, model_dir, name="a")
    registry.promote(workspace, "a@1", "staging")
    infos = registry.list_models(workspace)
    assert [i.ref for i in infos] == ["a@1", "a@2", "b@1"]
    assert infos[0].aliases == ["staging"]
    assert [i.ref for i in registry.list_models(workspace, "a")] == ["a@1", "a@2"]
    data = infos[0].to_dict()
    assert data["ref"] == "a@1"
    assert data["created_at"].endswith("+00:00")
    json.dumps(data)  # serialisable as is


# --- aliases ------------------------------------------------------------------------------


def _history(ws: Workspace) -> list[tuple[int, bool]]:
    with ws.catalog.session() as s:
        rows = s.scalars(sa.select(AliasHistory).order_by(AliasHistory.id)).all()
        ids = {i.id: i.version for i in registry.list_models(ws)}
        return [(ids[r.model_version_id], r.rolled_back_at is not None) for r in rows]


def test_promote_rollback_stack(catalog_workspace: Workspace, model_dir: Path) -> None:
    ws = catalog_workspace
    for _ in range(3):
        _register(ws, model_dir)
    for v in (1, 2, 3):
        assert registry.promote(ws, f"m@{v}", reason=f"v{v} is better").version == v
    assert registry.resolve(ws, "m@production").version == 3
    assert registry.rollback(ws, "m").version == 2
    assert registry.resolve(ws, "m@production").version == 2
    assert registry.rollback(ws, "m").version == 1
    assert registry.resolve(ws, "m@production").version == 1
    with pytest.raises(ConflictError, match="no earlier version"):
        registry.rollback(ws, "m")
    assert registry.resolve(ws, "m@production").version == 1
    assert _history(ws) == [(1, False), (2, True), (3, True)]

    # Promoting again starts a new stack on top of what is live.
    registry.promote(ws, "m@3")
    assert registry.rollback(ws, "m").version == 1


def test_promote_records_history_and_audit(workspace: Workspace, model_dir: Path) -> None:
    _register(workspace, model_dir)
    _register(workspace, model_dir)
    registry.promote(workspace, "m@1", actor="alice", reason="first")
    registry.promote(workspace, "m@2", actor="bob", reason="better")
    registry.promote(workspace, "m@2", actor="bob")  # no change: audited, not a new step
    registry.rollback(workspace, "m", actor="carol", reason="regression")
    with workspace.catalog.session() as s:
        history = s.scalars(sa.select(AliasHistory).order_by(AliasHistory.id)).all()
        assert [(h.actor, h.reason, h.alias) for h in history] == [
            ("alice", "first", "production"),
            ("bob", "better", "production"),
        ]
        assert history[0].at.tzinfo is not None
        events = s.scalars(sa.select(AuditEvent).order_by(AuditEvent.id)).all()
        assert [(e.actor, e.action, e.target) for e in events] == [
            ("alice", "promote", "m@production"),
            ("bob", "promote", "m@production"),
            ("bob", "promote", "m@production"),
            ("carol", "rollback", "m@production"),
        ]
        assert events[1].details["version"] == 2
        assert events[3].details == {"version": 1, "reason": "regression"}


def test_aliases_are_independent(workspace: Workspace, model_dir: Path) -> None:
    _register(workspace, model_dir)
    _register(workspace, model_dir)
    registry.promote(workspace, "m@1")
    registry.promote(workspace, "m@2", "staging")
    registry.promote(workspace, "m@1", "staging")
    assert registry.rollback(workspace, "m", "staging").version == 2
    assert registry.resolve(workspace, "m@production").version == 1
    assert registry.resolve(workspace, "m@1").aliases == ["production"]
    assert registry.resolve(workspace, "m@2").aliases == ["staging"]


def test_promote_and_rollback_errors(workspace: Workspace, model_dir: Path) -> None:
    with pytest.raises(NotFoundError, match="no model named 'm'"):
        registry.rollback(workspace, "m")
    _register(workspace, model_dir)
    with pytest.raises(NotFoundError, match="no alias 'production' to roll back"):
        registry.rollback(workspace, "m")
    with pytest.raises(RefError, match="invalid alias"):
        registry.promote(workspace, "m@1", "1bad")
    with pytest.raises(NotFoundError):
        registry.promote(workspace, "m@9")
    registry.promote(workspace, "m@1")
    with pytest.raises(ConflictError, match="no earlier version"):
        registry.rollback(workspace, "m")


# --- diff ---------------------------------------------------------------------------------


def test_diff(workspace: Workspace, model_dir: Path) -> None:
    _register(
        workspace,
        model_dir,
        config={"lr": 0.001, "model": {"layers": 2, "dim": 64}, "seed": 1},
        metrics={"val_loss": 2.0, "accuracy": 0.5, "steps": 100, "converged": False},
    )
    _register(
        workspace,
        model_dir,
        parent="m@1",
        config={"lr": 0.0005, "model": {"layers": 4, "dim": 64}, "seed": 1, "lora": True},
        metrics={"val_loss": 1.5, "accuracy": 0.5, "bleu": 20.0, "converged": True},
    )
    d = registry.diff(workspace, "m@1", "m")
    assert d["a"] == "m@1"
    assert d["b"] == "m@2"
    assert d["config"] == {
        "lora": {"a": None, "b": True},
        "lr": {"a": 0.001, "b": 0.0005},
        "model.layers": {"a": 2, "b": 4},
    }
    assert d["metrics"]["val_loss"] == {"a": 2.0, "b": 1.5, "delta": -0.5, "delta_pct": -25.0}
    assert d["metrics"]["accuracy"]["delta"] == 0.0
    assert d["metrics"]["bleu"] == {"a": None, "b": 20.0}
    assert d["metrics"]["steps"] == {"a": 100, "b": None}
    assert d["metrics"]["converged"] == {"a": False, "b": True}  # no arithmetic on booleans
    assert d["lineage"] == {"parent": {"a": None, "b": "m@1"}}
    same = registry.diff(workspace, "m@1", "m@1")
    assert same["config"] == {}
    assert same["lineage"] == {}
    assert set(same["metrics"]) == {"val_loss", "accuracy", "steps", "converged"}


# --- concurrency --------------------------------------------------------------------------


def _run_threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


def test_concurrent_registration(catalog_workspace: Workspace, model_dir: Path) -> None:
    """4 writers (each with its own engine, as separate processes would) × 3 versions."""
    ws = catalog_workspace
    url = ws.catalog.url

    def register(i: int) -> None:
        with Workspace.open(ws.root, database_url=url) as own:
            for _ in range(3):
                _register(own, model_dir, metrics={"writer": i})

    errors = _run_threads(4, register)
    assert errors == []
    infos = registry.list_models(ws, "m")
    assert [i.version for i in infos] == list(range(1, 13))
    assert sorted(i.metrics["writer"] for i in infos) == sorted(list(range(4)) * 3)
    for info in infos:  # every row has its own, complete artifact
        meta = json.loads((registry.artifact_path(ws, info.ref) / "genloop.json").read_text())
        assert (meta["version"], meta["metrics"]) == (info.version, info.metrics)
    assert ws.store.keys("models/m") == sorted(f"models/m/{v}" for v in range(1, 13))
    assert list((ws.store.root / ".tmp").iterdir()) == []


def test_concurrent_rollbacks_each_step_back(catalog_workspace: Workspace, model_dir: Path) -> None:
    ws = catalog_workspace
    for v in range(1, 6):
        _register(ws, model_dir)
        registry.promote(ws, f"m@{v}")

    def rollback(_: int) -> None:
        with Workspace.open(ws.root, database_url=ws.catalog.url) as own:
            registry.rollback(own, "m")

    assert _run_threads(4, rollback) == []
    assert registry.resolve(ws, "m@production").version == 1
    assert _history(ws) == [(1, False), (2, True), (3, True), (4, True), (5, True)]


def test_concurrent_first_promotions(catalog_workspace: Workspace, model_dir: Path) -> None:
    ws = catalog_workspace
    for _ in range(4):
        _register(ws, model_dir)

    def promote(i: int) -> None:
        with Workspace.open(ws.root, database_url=ws.catalog.url) as own:
            registry.promote(own, f"m@{i + 1}")

    assert _run_threads(4, promote) == []
    live = registry.resolve(ws, "m@production").version
    history = _history(ws)
    assert len(history) == 4
    assert history[-1] == (live, False)  # the alias is where the last promotion put it

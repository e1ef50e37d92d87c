"""A container's start-up (``genloop.serve.container``) on a SQLite workspace: the mounted
checkpoint is imported once, changed files make a new version, a bad ref stops the start."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from genloop.errors import ConfigError, NotFoundError
from genloop.serve.container import ContainerEnv, prepare, read_env
from genloop.workspace import Workspace, registry


def test_env_names_refs_and_a_mounted_model() -> None:
    env = read_env({"GENLOOP_MODELS": " chat@production, ,embed@3", "GENLOOP_MODEL_DIR": "/m"})
    assert env == ContainerEnv(("chat@production", "embed@3"), Path("/m"), None)
    assert read_env({}) == ContainerEnv()


def test_a_mounted_model_is_imported_once_and_again_when_its_files_change(
    tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    mounted = tmp_path / "model"
    shutil.copytree(model_dirs[0], mounted)
    env = ContainerEnv(model_dir=mounted, model_name="chat")
    assert prepare(tmp_path / "ws", env) == ["chat@1"]
    assert prepare(tmp_path / "ws", env) == ["chat@1"]  # the next replica, or a restart
    weights = mounted / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert prepare(tmp_path / "ws", env) == ["chat@2"]
    with Workspace.open(tmp_path / "ws") as ws:
        assert registry.resolve(ws, "chat@1").tags["source"] == "import"
    # registry refs are served as named, after the imported one
    both = ContainerEnv(models=("chat@1",), model_dir=mounted, model_name="chat")
    assert prepare(tmp_path / "ws", both) == ["chat@2", "chat@1"]


def test_a_bad_start_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        prepare(tmp_path / "ws", ContainerEnv(models=("nope@production",)))
    with pytest.raises(ConfigError, match=r"GENLOOP_MODEL_DIR=.*no such directory"):
        prepare(tmp_path / "ws", ContainerEnv(model_dir=tmp_path / "missing"))

"""What a container does before it serves: the catalog, the models, from the environment.

Every replica of an image runs the same start-up, often at the same moment against the
same PostgreSQL and the same artifact volume:

1. migrate the catalog (under the catalog's start-up lock: one replica upgrades, the
   others wait and find it done);
2. import ``$GENLOOP_MODEL_DIR`` (a mounted Hugging Face or diffusers checkpoint) unless a
   version imported from the same files is already there, again under the lock, so N
   replicas make one version;
3. name what to serve: that version plus the refs in ``$GENLOOP_MODELS``
   (``chat@production,embed``), each resolved now so a typo stops the start.

``$GENLOOP_REDIS_URL`` (rate limits shared by the replicas) is read by ``genloop serve``
itself. Any problem is a :class:`~genloop.errors.GenloopError` with one line that says
what is wrong: the CLI prints it and exits non-zero, so an orchestrator backs off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from genloop.errors import ConfigError, GenloopError
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.registry import ModelVersionInfo

log = logging.getLogger(__name__)

ENV_MODELS = "GENLOOP_MODELS"
ENV_MODEL_DIR = "GENLOOP_MODEL_DIR"
ENV_MODEL_NAME = "GENLOOP_MODEL_NAME"
ENV_REDIS_URL = "GENLOOP_REDIS_URL"
FINGERPRINT_TAG = "source_fingerprint"


@dataclass(frozen=True)
class ContainerEnv:
    """The start-up settings an image takes from its environment."""

    models: tuple[str, ...] = ()
    model_dir: Path | None = None
    model_name: str | None = None


def read_env(environ: Mapping[str, str] = os.environ) -> ContainerEnv:
    models = tuple(m.strip() for m in environ.get(ENV_MODELS, "").split(",") if m.strip())
    model_dir = environ.get(ENV_MODEL_DIR, "").strip()
    name = environ.get(ENV_MODEL_NAME, "").strip()
    return ContainerEnv(models, Path(model_dir) if model_dir else None, name or None)


def prepare(workspace: str | Path | None, env: ContainerEnv) -> list[str]:
    """Migrate the catalog, import the mounted model, and return the refs to serve.

    Safe to run from many replicas at once; the second finds the work done.
    """
    ws = init_workspace(workspace)
    try:
        refs: list[str] = []
        if env.model_dir is not None:
            with ws.catalog.startup_lock():
                refs.append(import_model_dir(ws, env.model_dir, name=env.model_name).ref)
        for ref in env.models:
            registry.resolve(ws, ref)  # a missing model or alias: one line naming it
            refs.append(ref)
        return refs
    finally:
        ws.close()


def import_model_dir(ws: Workspace, path: Path, *, name: str | None = None) -> ModelVersionInfo:
    """The version made from the model at ``path`` (a Hugging Face or diffusers checkpoint,
    imported and checked, or a genloop model directory, registered as it is): found when
    these files were brought in before (same names, sizes and modification times), else
    brought in now."""
    import json

    from genloop.models.importer import default_name, plan_import, register_plan
    from genloop.workspace.layout import GENLOOP_JSON

    if not path.is_dir():
        raise ConfigError(
            f"{ENV_MODEL_DIR}={path}: no such directory (mount the model there, or unset it)"
        )
    name = name or default_name(path)
    fingerprint = dir_fingerprint(path)
    for info in reversed(registry.list_models(ws, name)):
        if info.tags.get(FINGERPRINT_TAG) == fingerprint:
            log.info("model %s already imported from %s", info.ref, path)
            return info
    tags = {FINGERPRINT_TAG: fingerprint}
    meta = path / GENLOOP_JSON
    if meta.is_file():  # a genloop model directory: registered as it is
        family = json.loads(meta.read_text(encoding="utf-8")).get("family")
        if not isinstance(family, str):
            raise ConfigError(f"{meta} names no family: it is not a genloop model directory")
        info = registry.register_model(
            ws, name, family, path, tags={"source": "import", **tags}, description=f"from {path}"
        )
    else:
        info = register_plan(ws, plan_import(path, name=name), tags=tags)
    log.info("imported %s from %s", info.ref, path)
    return info


def dir_fingerprint(path: Path) -> str:
    """A cheap identity of a directory's files: relative names, sizes and mtimes (hashing
    gigabytes of weights on every start would delay each replica by minutes)."""
    h = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError as exc:
        raise GenloopError(f"cannot read the model directory {path}: {exc.strerror}") from None
    return h.hexdigest()

"""Where a workspace is and how to open it."""

from __future__ import annotations

import os
from pathlib import Path

from genloop.errors import WorkspaceError
from genloop.workspace.db import Catalog
from genloop.workspace.store import ArtifactStore

DEFAULT_DIR = "genloop-workspace"
ENV_HOME = "GENLOOP_HOME"
ENV_DATABASE_URL = "GENLOOP_DATABASE_URL"
CATALOG_FILE = "catalog.db"
ARTIFACTS_DIR = "artifacts"


def resolve_root(path: str | Path | None = None) -> Path:
    """The workspace folder: the argument, else ``$GENLOOP_HOME``, else ./genloop-workspace."""
    if path is None or str(path) == "":
        path = os.environ.get(ENV_HOME) or DEFAULT_DIR
    return Path(path).expanduser().absolute()


def _database_url(root: Path, database_url: str | None) -> str:
    return database_url or os.environ.get(ENV_DATABASE_URL) or f"sqlite:///{root / CATALOG_FILE}"


class Workspace:
    """A catalog and an artifact store. Open one per process and share it."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.store = ArtifactStore(root / ARTIFACTS_DIR)

    @classmethod
    def open(cls, path: str | Path | None = None, *, database_url: str | None = None) -> Workspace:
        """Open an existing workspace; a missing one is an error that says how to create it."""
        root = resolve_root(path)
        url = _database_url(root, database_url)
        if not (root / ARTIFACTS_DIR).is_dir():
            raise WorkspaceError(f"no genloop workspace at {root}; create one with 'genloop init'")
        ws = cls(root, Catalog(url))
        try:
            ws.catalog.check_schema()
        except BaseException:
            ws.close()  # don't leave a connection pool behind
            raise
        return ws

    def close(self) -> None:
        self.catalog.dispose()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init_workspace(path: str | Path | None = None, *, database_url: str | None = None) -> Workspace:
    """Create the folder, the artifact store and the catalog, or migrate an existing one."""
    root = resolve_root(path)
    if root.exists() and not root.is_dir():
        raise WorkspaceError(f"{root} exists and is not a directory")
    try:
        (root / ARTIFACTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create workspace at {root}: {exc.strerror}") from None
    catalog = Catalog(_database_url(root, database_url))
    try:
        catalog.migrate()
    except BaseException:
        catalog.dispose()
        raise
    return Workspace(root, catalog)

"""What the catalog holds, counted: the web UI's dashboard figures."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from genloop.workspace.tables import ApiKey, Dataset, DatasetVersion, ModelVersion, Run
from genloop.workspace.workspace import Workspace

COUNTED: dict[str, Any] = {
    "runs": Run,
    "datasets": Dataset,
    "dataset_versions": DatasetVersion,
    "model_versions": ModelVersion,
    "keys": ApiKey,
}


def counts(ws: Workspace) -> dict[str, int]:
    """Rows of each counted table: runs, datasets, dataset versions, model versions, keys."""
    with ws.catalog.session() as s:
        return {
            name: int(s.scalar(select(func.count()).select_from(table)) or 0)
            for name, table in COUNTED.items()
        }

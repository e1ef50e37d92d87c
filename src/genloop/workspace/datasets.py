"""Dataset versions in the catalog: ``NAME`` (newest) or ``NAME@VERSION``.

A dataset version is an artifact ``datasets/<name>/<version>`` plus a ``dataset_versions``
row holding the hash of its inputs and config, its statistics and its lineage. The same
hash under the same name is the same version, which is how re-runs are recognised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from genloop.errors import ConflictError, NotFoundError
from genloop.workspace.refs import RefError, check_name
from genloop.workspace.tables import Dataset, DatasetVersion
from genloop.workspace.workspace import Workspace

EXCLUDED = "excluded"  # status of a version built from an erased user's data


@dataclass
class DatasetVersionInfo:
    id: int
    name: str
    version: int
    kind: str
    content_hash: str
    artifact: str
    status: str
    created_at: datetime
    stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        d["ref"] = self.ref
        return d


def _info(row: DatasetVersion) -> DatasetVersionInfo:
    return DatasetVersionInfo(
        id=row.id,
        name=row.dataset.name,
        version=row.version,
        kind=row.kind,
        content_hash=row.content_hash,
        artifact=row.artifact,
        status=row.status,
        created_at=row.created_at,
        stats=dict(row.stats or {}),
        config=dict(row.config or {}),
        lineage=dict(row.lineage or {}),
    )


def parse_dataset_ref(text: str) -> tuple[str, int | None]:
    name, sep, tail = text.strip().partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not tail.isdigit() or int(tail) < 1:
        raise RefError(f"invalid dataset ref {text!r}: use NAME or NAME@VERSION (1, 2, …)")
    return name, int(tail)


def resolve_dataset(ws: Workspace, ref: str) -> DatasetVersionInfo:
    """``NAME@VERSION``, or ``NAME``: its newest version not excluded by a privacy erasure."""
    name, version = parse_dataset_ref(ref)
    with ws.catalog.session() as s:
        query = select(DatasetVersion).join(Dataset).where(Dataset.name == name)
        if version is not None:
            query = query.where(DatasetVersion.version == version)
        else:
            query = query.where(DatasetVersion.status != EXCLUDED)
        row = s.scalars(query.order_by(DatasetVersion.version.desc()).limit(1)).first()
        if row is None:
            if s.scalar(select(Dataset.id).where(Dataset.name == name)) is None:
                known = ", ".join(s.scalars(select(Dataset.name).order_by(Dataset.name))) or "none"
                raise NotFoundError(f"no dataset named {name!r} (datasets: {known})")
            if version is None:
                raise NotFoundError(
                    f"every version of dataset {name} was excluded after a privacy erasure"
                )
            raise NotFoundError(f"dataset {name} has no version {version}")
        return _info(row)


def check_trainable(info: DatasetVersionInfo) -> DatasetVersionInfo:
    """Refuse a version excluded by a privacy erasure (it holds an erased user's data)."""
    if info.status == EXCLUDED:
        raise ConflictError(
            f"dataset {info.ref} was excluded after a privacy erasure and is never trained on "
            "again; export or prepare a new version"
        )
    return info


def get_dataset_version(ws: Workspace, version_id: int) -> DatasetVersionInfo:
    with ws.catalog.session() as s:
        row = s.get(DatasetVersion, version_id)
        if row is None:
            raise NotFoundError(f"no dataset version with id {version_id}")
        return _info(row)


def find_by_hash(ws: Workspace, name: str, content_hash: str) -> DatasetVersionInfo | None:
    """The version of ``name`` built from exactly these inputs and config, if any."""
    with ws.catalog.session() as s:
        row = s.scalars(
            select(DatasetVersion)
            .join(Dataset)
            .where(Dataset.name == name, DatasetVersion.content_hash == content_hash)
        ).first()
        return _info(row) if row is not None else None


def list_dataset_versions(ws: Workspace, name: str | None = None) -> list[DatasetVersionInfo]:
    with ws.catalog.session() as s:
        query = select(DatasetVersion).join(Dataset).order_by(Dataset.name, DatasetVersion.version)
        if name is not None:
            query = query.where(Dataset.name == check_name(name))
        return [_info(row) for row in s.scalars(query)]


def _dataset(s: Session, name: str) -> Dataset:
    ds = s.scalars(select(Dataset).where(Dataset.name == name)).first()
    if ds is None:
        ds = Dataset(name=name)
        s.add(ds)
        s.flush()
    return ds


def register_dataset_version(
    ws: Workspace,
    name: str,
    content_hash: str,
    write: Callable[[Path], None],
    *,
    kind: str = "text",
    config: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
) -> DatasetVersionInfo:
    """Publish the next version of ``name``: ``write(dir)`` fills its artifact directory.

    If a version with the same ``content_hash`` appears meanwhile (a concurrent run of the
    same config), that version is returned and this one is discarded. ``write`` may be
    called more than once (a version number taken meanwhile is skipped).
    """
    check_name(name)
    version = 0
    for _attempt in range(20):
        existing = find_by_hash(ws, name, content_hash)
        if existing is not None:
            return existing
        with ws.catalog.session() as s:
            newest = s.scalar(
                select(func.max(DatasetVersion.version)).join(Dataset).where(Dataset.name == name)
            )
        # Past the number tried last: its directory may be taken with no catalog row yet
        # (another writer between its two steps, or one that crashed there).
        version = max(newest or 0, version) + 1
        key = f"datasets/{name}/{version}"
        try:
            with ws.store.writer(key) as staging:
                write(staging)
        except ConflictError:
            continue
        try:
            with ws.catalog.session() as s:
                row = DatasetVersion(
                    dataset_id=_dataset(s, name).id,
                    version=version,
                    content_hash=content_hash,
                    kind=kind,
                    artifact=key,
                    config=config or {},
                    stats=stats or {},
                    lineage=lineage or {},
                )
                s.add(row)
                s.flush()
                return _info(row)
        except DBIntegrityError:
            ws.store.delete(key)
    raise ConflictError(f"could not register a new version of dataset {name}: too many writers")


# ---------------------------------------------------------------- what a version holds


def dataset_files(ws: Workspace, info: DatasetVersionInfo) -> list[str]:
    """The files of a dataset version's artifact, as paths relative to it, sorted."""
    if not ws.store.exists(info.artifact):
        return []
    root = ws.store.path(info.artifact)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def dataset_card(ws: Workspace, info: DatasetVersionInfo) -> str:
    """The dataset card (Markdown) written when the version was prepared."""
    path = ws.store.file(info.artifact, "card.md")
    if not path.is_file():
        raise NotFoundError(f"dataset {info.ref} has no card")
    return path.read_text(encoding="utf-8")


def dataset_samples(ws: Workspace, info: DatasetVersionInfo, limit: int) -> list[Any]:
    """Up to ``limit`` of the sample records stored with the version (none: ``[]``)."""
    path = ws.store.file(info.artifact, "samples.jsonl")
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, limit) if line.strip()]

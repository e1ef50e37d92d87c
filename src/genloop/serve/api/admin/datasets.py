"""``/v1/admin/datasets``: datasets, their versions, cards and sample records."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from genloop.security.keys import Principal
from genloop.serve.api.admin.common import Admin, Page, name_param, version_param
from genloop.serve.state import get_state
from genloop.workspace import datasets

router = APIRouter()


@router.get("/datasets", summary="Datasets with their versions", response_model=Page)
def list_datasets(request: Request, _: Principal = Admin) -> Page:
    versions = datasets.list_dataset_versions(get_state(request).ws)
    grouped: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        grouped.setdefault(v.name, []).append(v.to_dict())
    return Page(
        data=[
            {"name": name, "versions": vs, "latest": vs[-1]["version"]}
            for name, vs in grouped.items()
        ]
    )


def _dataset_version(request: Request, name: str, version: int) -> datasets.DatasetVersionInfo:
    return datasets.resolve_dataset(get_state(request).ws, f"{name}@{version}")


@router.get("/datasets/{name}/{version}", summary="One dataset version: stats, config, lineage")
def get_dataset_version(
    request: Request, name: str = name_param(), version: int = version_param(), _: Principal = Admin
) -> dict[str, Any]:
    info = _dataset_version(request, name, version)
    files = datasets.dataset_files(get_state(request).ws, info)
    return dict(info.to_dict()) | {"files": files}


@router.get("/datasets/{name}/{version}/card", summary="The dataset card (Markdown)")
def get_dataset_card(
    request: Request, name: str = name_param(), version: int = version_param(), _: Principal = Admin
) -> dict[str, Any]:
    info = _dataset_version(request, name, version)
    return {"ref": info.ref, "markdown": datasets.dataset_card(get_state(request).ws, info)}


@router.get("/datasets/{name}/{version}/samples", summary="Sample records as stored")
def get_dataset_samples(
    request: Request,
    name: str = name_param(),
    version: int = version_param(),
    _: Principal = Admin,
    limit: int = Query(20, ge=1, le=500),
) -> dict[str, Any]:
    info = _dataset_version(request, name, version)
    records = datasets.dataset_samples(get_state(request).ws, info, limit)
    return {"ref": info.ref, "object": "list", "data": records}

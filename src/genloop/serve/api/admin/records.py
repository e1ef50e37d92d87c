"""``/v1/admin/datasets/{name}/{version}/records`` and ``…/images/{split}/{index}``: a
dataset version's records a page at a time, and its images as PNG thumbnails.

Both find files from the version's artifact key and a split name checked against the
splits present; an image is served only from a file whose digest matches the manifest.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response

from genloop.data.browse import MAX_OFFSET, image_png, read_records
from genloop.security.keys import Principal
from genloop.serve.api.admin.common import MAX_ID, Admin, name_param, version_param
from genloop.serve.state import get_state
from genloop.workspace import datasets

router = APIRouter()
SPLIT = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"


@router.get("/datasets/{name}/{version}/records", summary="A page of a split's records")
def list_records(
    request: Request,
    name: str = name_param(),
    version: int = version_param(),
    _: Principal = Admin,
    split: str | None = Query(None, pattern=SPLIT, description="train, val, test…"),
    offset: int = Query(0, ge=0, le=MAX_OFFSET, description="Records skipped."),
    limit: int = Query(20, ge=1, le=100, description="Records returned."),
) -> dict[str, Any]:
    ws = get_state(request).ws
    info = datasets.resolve_dataset(ws, f"{name}@{version}")
    page = read_records(ws, info, split, offset, limit)
    return {"ref": info.ref, "kind": info.kind, "object": "list"} | page


@router.get(
    "/datasets/{name}/{version}/images/{split}/{index}",
    summary="One image of an image dataset as a PNG thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def get_image(
    request: Request,
    name: str = name_param(),
    version: int = version_param(),
    split: str = Path(pattern=SPLIT),
    index: int = Path(ge=0, le=MAX_ID),
    _: Principal = Admin,
) -> Response:
    ws = get_state(request).ws
    info = datasets.resolve_dataset(ws, f"{name}@{version}")
    png = image_png(ws, info, split, index)
    return Response(
        png,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
    )

"""``/v1/admin/models/variants``: what each model version is (format, size, measured
latency and perplexity) and which version it was made from, for the Models view."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from genloop.evaluate.variants import model_variants
from genloop.security.keys import Principal
from genloop.serve.api.admin.common import NAME, Admin, Page
from genloop.serve.state import get_state

router = APIRouter()


@router.get(
    "/models/variants",
    summary="Model versions with format, size, latency, perplexity and parent",
    response_model=Page,
)
def list_model_variants(
    request: Request,
    _: Principal = Admin,
    name: str | None = Query(None, pattern=NAME),
) -> Page:
    return Page(data=model_variants(get_state(request).ws, name))

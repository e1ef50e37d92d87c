"""What every admin router shares: the ``admin`` scope, the identifier patterns, the
path and query parameters, and the list envelope (:class:`Page`).

Identifiers in paths are checked against the same patterns as the catalog's names, so
``..``, ``%2f`` and friends are refused before any lookup.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Depends, Path, Query
from pydantic import BaseModel

from genloop.serve.auth import require_scope

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # genloop.workspace.refs.NAME_RE
ALIAS = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9][A-Za-z0-9_-]{0,63})?$"
RUN_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_ID = 2**31 - 1  # catalog ids are 32-bit on PostgreSQL: larger ones name nothing

Admin = Depends(require_scope("admin"))

# A FastAPI parameter object must not be shared between parameters (it takes the name of
# the first one), hence functions.


def name_param() -> Any:
    return Path(pattern=NAME, description="A dataset or model name.")


def version_param() -> Any:
    return Path(ge=1, le=MAX_ID, description="A version number (1, 2, …).")


def id_param() -> Any:
    return Path(ge=1, le=MAX_ID, description="An id.")


def limit_query() -> Any:
    return Query(100, ge=1, le=1000, description="Most rows returned.")


def offset_query() -> Any:
    return Query(0, ge=0, le=10_000_000, description="Rows skipped (paging).")


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]

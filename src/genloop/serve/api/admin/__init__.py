"""The admin API (scope ``admin``) the web UI and scripts use: ``/v1/admin/...``.

Runs and their metric series, datasets and their versions (stats, card, sample records),
model versions and aliases (promote, roll back, diff), evaluations and their reports,
usage, alerts, feedback review, API keys, privacy export and erasure, the audit log, and
the server's own status: one router module per resource, each handler reading the
catalog through the library functions the CLI uses. Every file a handler reads is found
from a catalog row (an artifact key), never from a path in the request.
"""

from fastapi import APIRouter

from genloop.serve.api.admin import (
    alerts,
    audit,
    datasets,
    evaluations,
    feedback,
    keys,
    models,
    monitoring,
    privacy,
    records,
    runs,
    status,
    usage,
    variants,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"])
# in this order: the HTTP reference (docs/http.md) lists the routes as they are included
for part in (
    status,
    runs,
    datasets,
    records,
    variants,  # before models: /models/variants is not a model name
    models,
    evaluations,
    usage,
    monitoring,
    alerts,
    feedback,
    keys,
    privacy,
    audit,
):
    router.include_router(part.router)

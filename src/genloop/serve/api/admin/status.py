"""``/v1/admin/status``: the server itself: models, engines, upstreams, version."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

import genloop
from genloop.security.keys import Principal
from genloop.serve.api.admin.common import Admin
from genloop.serve.state import get_state

router = APIRouter()


@router.get("/status", summary="The server: models, engines, upstreams, version")
async def status(request: Request, _: Principal = Admin) -> dict[str, Any]:
    state = get_state(request)
    models = []
    for served in state.models.served:
        cur = served.current
        entry: dict[str, Any] = {"id": served.spec, "loaded": cur is not None}
        if served.error:
            entry["error"] = served.error
        if cur is not None:
            entry |= {"ref": cur.ref, "family": cur.info.family, "kind": cur.kind}
            if cur.engine is not None:
                st = cur.engine.stats()
                entry["engine"] = {
                    "running": st.running,
                    "waiting": st.waiting,
                    "max_batch_size": st.max_batch_size,
                    "max_queue": st.max_queue,
                }
        models.append(entry)
    return {
        "version": genloop.__version__,
        "draining": state.draining or state.models.draining,
        "ready": state.models.ready,
        "models": models,
        "upstreams": state.upstreams.status(),
        "catalog": state.ws.catalog.backend,
    }

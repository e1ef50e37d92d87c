"""One prediction request of a cloud target, run through the same handlers as
``/v1/completions`` and ``/v1/chat/completions``.

An *instance* is what one prediction is made from:

- a string: a prompt, continued as ``/v1/completions`` would;
- an object with ``prompt`` (a string) or ``messages`` (chat messages, as
  ``/v1/chat/completions`` takes them), plus any sampling field those endpoints take
  (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``n``,
  ``response_format``, ...).

``parameters`` (Vertex AI's, or the same key in a SageMaker or Azure ML body) are defaults
for every instance; an instance's own fields win. A prediction is
``{"text", "finish_reason", "usage"}`` (plus ``"message"`` for a chat instance, and
``"choices"`` when ``n`` > 1). For an embedding model an instance is a text (or
``{"input": text}``), ``parameters`` may hold ``dimensions``, and a prediction is
``{"embedding": [...]}``. Every instance is checked before any is generated, and the
instances then run concurrently, so the engine batches them.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from genloop.serve.errors import ApiError, invalid

if TYPE_CHECKING:
    from starlette.requests import Request

    from genloop.security.keys import Principal
    from genloop.serve.api.chat.protocol import ChatRequest
    from genloop.serve.api.completions.protocol import CompletionRequest
    from genloop.serve.state import ServerState

MAX_INSTANCES = 64  # per request, and generations (instances × n) per request
RESERVED = ("model", "stream", "stream_options")  # set by the target, not by the caller


def parse_body(raw: bytes) -> Any:
    """The JSON body, or a 400 saying it is not JSON."""
    if not raw.strip():
        raise invalid("the request body is empty: send a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc})") from None


def instances_of(body: Any) -> tuple[list[Any], dict[str, Any]]:
    """``{"instances": [...], "parameters": {...}}`` → (instances, parameters), checked."""
    if not isinstance(body, dict) or "instances" not in body:
        raise invalid('expected a JSON object {"instances": [...], "parameters": {...}}')
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise invalid(f"unknown field(s) {', '.join(unknown)}: send instances and parameters")
    instances, parameters = body["instances"], body.get("parameters") or {}
    if not isinstance(instances, list) or not instances:
        raise invalid("instances must be a non-empty list", "instances")
    if len(instances) > MAX_INSTANCES:
        raise ApiError(
            f"{len(instances)} instances in one request; at most {MAX_INSTANCES} "
            "(split the request)",
            status=413,
            param="instances",
        )
    if not isinstance(parameters, dict):
        raise invalid("parameters must be a JSON object", "parameters")
    return instances, parameters


def to_request(
    instance: Any, parameters: dict[str, Any], model: str, where: str
) -> CompletionRequest | ChatRequest:
    """One instance (with the shared ``parameters``) as a completions or chat request."""
    from genloop.serve.api.chat.protocol import ChatRequest
    from genloop.serve.api.completions.protocol import CompletionRequest

    if isinstance(instance, str):
        fields: dict[str, Any] = {"prompt": instance}
    elif isinstance(instance, dict):
        fields = dict(instance)
    else:
        raise invalid(
            f"{where} must be a prompt string or an object with prompt or messages", where
        )
    fields = parameters | fields
    reserved = [k for k in RESERVED if k in fields]
    if reserved:
        raise invalid(f"{where}: {reserved[0]} is set by the server; leave it out", where)
    if ("prompt" in fields) == ("messages" in fields):
        raise invalid(f"{where} needs exactly one of prompt (a string) or messages", where)
    if "prompt" in fields and not isinstance(fields["prompt"], str):
        raise invalid(f"{where}.prompt must be a string", where)
    fields |= {"model": model, "stream": False}
    kind: type[CompletionRequest] | type[ChatRequest] = (
        ChatRequest if "messages" in fields else CompletionRequest
    )
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(map(str, first["loc"]))
        raise invalid(f"{where}.{loc}: {first['msg']}", where) from None


def served_model(state: ServerState) -> tuple[str, str]:
    """(id, kind) of the model the target serves (its first), or 503 while it loads."""
    listing = state.models.listing()
    if not listing or not state.models.ready:
        raise ApiError("the model is still loading; retry shortly", status=503, retry_after_s=2)
    return str(listing[0]["id"]), str(listing[0]["kind"])


async def predict(
    state: ServerState, request: Request, principal: Principal, body: Any
) -> list[dict[str, Any]]:
    """The predictions for ``body``'s instances, in order (4xx ApiError for bad input)."""
    instances, parameters = instances_of(body)
    model, kind = served_model(state)
    if kind == "embedding":
        return await _embed(state, request, principal, model, instances, parameters)
    requests = [
        to_request(x, parameters, model, f"instances[{i}]") for i, x in enumerate(instances)
    ]
    choices = sum(r.n for r in requests)
    if choices > MAX_INSTANCES:
        raise ApiError(
            f"{choices} generations in one request (instances × n); at most {MAX_INSTANCES} "
            "(split the request)",
            status=413,
            param="instances",
        )
    return list(await asyncio.gather(*(_run(state, request, principal, r) for r in requests)))


async def _run(
    state: ServerState,
    request: Request,
    principal: Principal,
    body: CompletionRequest | ChatRequest,
) -> dict[str, Any]:
    from genloop.serve.api.chat.protocol import ChatRequest
    from genloop.serve.api.chat.serving import serve_chat
    from genloop.serve.api.completions.serving import serve_completion

    if isinstance(body, ChatRequest):
        response = await serve_chat(state, request, body, principal)
    else:
        response = await serve_completion(state, request, body, principal)
    if response.status_code != 200:  # the client went away
        raise ApiError("the request was cancelled", status=499)
    out = json.loads(bytes(response.body))
    choices = [_choice(c) for c in out["choices"]]
    prediction = choices[0] | {"usage": out["usage"], "id": out["id"]}
    if len(choices) > 1:
        prediction["choices"] = choices
    return prediction


async def _embed(
    state: ServerState,
    request: Request,
    principal: Principal,
    model: str,
    instances: list[Any],
    parameters: dict[str, Any],
) -> list[dict[str, Any]]:
    """An embedding model's instances (texts, or ``{"input": text}``) in one
    ``/v1/embeddings`` request: ``[{"embedding": [...]}, ...]``."""
    from genloop.serve.api.embeddings.protocol import EmbeddingRequest
    from genloop.serve.api.embeddings.serving import serve_embeddings

    texts = []
    for i, x in enumerate(instances):
        text = x.get("input") if isinstance(x, dict) and set(x) == {"input"} else x
        if not isinstance(text, str):
            raise invalid(
                f'instances[{i}] must be a text or {{"input": text}} (an embedding model)',
                f"instances[{i}]",
            )
        texts.append(text)
    unknown = sorted(set(parameters) - {"dimensions"})
    if unknown:
        raise invalid(f"parameters.{unknown[0]}: an embedding model takes dimensions only")
    try:
        body = EmbeddingRequest.model_validate({"model": model, "input": texts} | parameters)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise invalid(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    response = await serve_embeddings(state, request, body, principal)
    data = sorted(json.loads(bytes(response.body))["data"], key=lambda d: d["index"])
    return [{"embedding": d["embedding"]} for d in data]


def _choice(choice: dict[str, Any]) -> dict[str, Any]:
    if "message" in choice:
        return {
            "text": choice["message"].get("content") or "",
            "message": choice["message"],
            "finish_reason": choice["finish_reason"],
        }
    return {"text": choice["text"], "finish_reason": choice["finish_reason"]}

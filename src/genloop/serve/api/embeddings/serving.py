"""The handler of ``POST /v1/embeddings``: inputs in, OpenAI's list of embeddings out.

1. check     the input: nothing empty (400), at most ``serve.max_embedding_inputs``
             inputs (413)
2. lease     the version the model names now (hot swap, as every route); a model that
             cannot embed is a 400 naming the fix
3. tokenize  texts with the model's own tokenizer (off the event loop when large); each
             input within the model's context (400), all together within
             ``serve.max_embedding_tokens`` (413); token ids within the vocabulary
4. admit     the tokens spent from the key's tokens-per-minute budget
5. embed     on the model's engine, with whatever other requests are queued
             (``engine/embedder.py``), within ``serve.request_timeout_s``; abandoned
             (its inputs dropped) when the client goes away
6. answer    each vector cut to ``dimensions`` and normalised again, as floats or as
             base64 of its little-endian float32 bytes (what OpenAI sends, and what the
             official client asks for by default)
7. record    request row, usage and metrics, however it ended
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from genloop.serve.api.protocol import new_id
from genloop.serve.api.streaming import CLIENT_CLOSED, json_bytes, until_disconnected
from genloop.serve.errors import ApiError, error_type, invalid

if TYPE_CHECKING:
    import numpy as np
    from starlette.requests import Request

    from genloop.security.keys import Principal
    from genloop.serve.api.embeddings.protocol import EmbeddingRequest
    from genloop.serve.engine.embedder import EmbeddingEngine
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

BIG_TEXT = 20_000  # characters in all; more are tokenized off the event loop
EMPTY = (
    "input is empty: give a text, a list of texts, a token array or a list of token arrays, "
    "none of them empty"
)


async def serve_embeddings(
    state: ServerState, request: Request, body: EmbeddingRequest, principal: Principal
) -> Response:
    inputs = _inputs(body, state.cfg.serve.max_embedding_inputs)  # 1.
    texts = [x for x in inputs if isinstance(x, str)]
    flags = state.check_input("\n".join(texts)) if texts else []
    started = time.monotonic()
    loaded = await state.models.acquire(body.model)  # 2.
    response_id = new_id("emb")
    status, prompt_tokens, dims = 500, 0, 0
    try:
        engine = _engine(loaded, body.model)
        if body.dimensions is not None and body.dimensions > engine.hidden_size:
            raise invalid(
                f"dimensions is {body.dimensions}; this model's embeddings have "
                f"{engine.hidden_size} (give 1 to {engine.hidden_size}, or leave it unset)",
                "dimensions",
            )
        ids = await _token_ids(engine, inputs, texts, state)  # 3.
        prompt_tokens = sum(len(x) for x in ids)
        await state.check_rate(principal, tokens=prompt_tokens)  # 4.
        vectors = await until_disconnected(request, _embed(engine, ids, state))  # 5.
        if vectors is None:
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        from genloop.models.embeddings import truncate_dimensions

        vectors = truncate_dimensions(vectors, body.dimensions)  # 6.
        dims = int(vectors.shape[1])
        content = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": loaded.ref,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        status = 200
        return Response(
            json_bytes(content),
            media_type="application/json",
            headers={"X-Request-Id": response_id},
        )
    except Exception as exc:
        status = int(getattr(exc, "http_status", 500))
        state.metrics.error(loaded.info.name, error_type(exc), loaded.info.version)
        raise
    finally:
        state.models.release(loaded)
        _record(  # 7.
            state, loaded, body, principal, response_id, status, prompt_tokens, dims, flags, started
        )


def _inputs(body: EmbeddingRequest, limit: int) -> list[str] | list[list[int]]:
    """The request's inputs, one item each; empty ones refused (400), too many (413)."""
    raw = body.input
    items: list[Any]
    if isinstance(raw, str):
        items = [raw]
    elif raw and isinstance(raw[0], int):
        items = [list(raw)]  # one token array
    else:
        items = list(raw)
    if not items:
        raise invalid(EMPTY, "input")
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input[{i}]"
        if len(item) == 0:
            raise invalid(f"{where} is empty; {EMPTY[len('input is empty: ') :]}", "input")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"), text does not
                raise invalid(f"{where} is not valid Unicode (a lone surrogate)", "input") from None
    if len(items) > limit:
        raise ApiError(
            f"input holds {len(items)} items; this server embeds at most {limit} per request "
            "(serve.max_embedding_inputs): send them in several requests",
            status=413,
            param="input",
            code="too_many_inputs",
        )
    return items


def _engine(loaded: LoadedModel, model: str) -> EmbeddingEngine:
    """The version's embedding engine; a model of another kind is a 400 naming the fix."""
    if loaded.kind != "embedding":
        from genloop.models.embeddings import cannot_embed

        raise ApiError(
            f"{cannot_embed(model, loaded.info.family)}, then serve it",
            param="model",
            code="model_cannot_embed",
        )
    return loaded.embedding_engine()


async def _token_ids(
    engine: EmbeddingEngine, inputs: list[Any], texts: list[str], state: ServerState
) -> list[list[int]]:
    """Each input as token ids, checked against the model and the server's token limit."""
    if texts:
        if sum(len(t) for t in texts) > BIG_TEXT:
            ids = await asyncio.to_thread(engine.encode_batch, texts)
        else:
            ids = engine.encode_batch(texts)
    else:
        ids = [list(x) for x in inputs]
    context, vocab = engine.context_length, engine.vocab_size
    for i, row in enumerate(ids):
        if not row:
            raise invalid(f"input[{i}] has no tokens for this model's tokenizer", "input")
        if len(row) > context:
            raise invalid(
                f"input[{i}] is {len(row)} tokens; this model reads at most {context} per "
                "input: shorten it",
                "input",
                "context_length_exceeded",
            )
        if not texts:
            bad = next((t for t in row if t >= vocab), None)
            if bad is not None:
                raise invalid(f"token id {bad} is outside the vocabulary ({vocab})", "input")
    total, limit = sum(len(x) for x in ids), state.cfg.serve.max_embedding_tokens
    if total > limit:
        raise ApiError(
            f"the input is {total} tokens; this server embeds at most {limit} per request "
            "(serve.max_embedding_tokens): send it in several requests",
            status=413,
            param="input",
            code="too_many_tokens",
        )
    return ids


async def _embed(engine: EmbeddingEngine, ids: list[list[int]], state: ServerState) -> np.ndarray:
    timeout = state.cfg.serve.request_timeout_s
    try:
        return await asyncio.wait_for(engine.embed(ids), timeout=timeout)
    except TimeoutError:
        raise ApiError(
            f"the request took longer than {timeout:g}s and was stopped",
            status=504,
            code="timeout",
        ) from None


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One vector as OpenAI sends it: numbers, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.tolist()
    return values


def _record(
    state: ServerState,
    loaded: LoadedModel,
    body: EmbeddingRequest,
    principal: Principal,
    response_id: str,
    status: int,
    prompt_tokens: int,
    dims: int,
    flags: list[str],
    started: float,
) -> None:
    """The request row, usage and metrics; a rate-limited request is counted, not written."""
    from genloop.monitor.usage import RequestRecord

    e2e = time.monotonic() - started
    info = loaded.info
    ok = status < 400
    state.metrics.request_finished(
        info.name, info.version, status, "stop" if ok else None, prompt_tokens, 0, e2e
    )
    monitor = state.extras.get("monitor")
    if monitor is not None:  # the anomaly detectors' feed
        monitor.observe(info.name, info.version, e2e * 1000.0, status >= 500)
    if status == 429:
        return
    raw = body.input
    # user text goes only where the log encrypts it (the prompt), never in the parameters
    prompt = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
    count = 1 if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else len(raw)
    params: dict[str, Any] = body.model_dump(exclude={"input", "user"}, exclude_none=True)
    state.recorder.submit(
        RequestRecord(
            request_id=response_id,
            endpoint="embeddings",
            model_name=info.name,
            model_version=info.version,
            api_key_id=principal.key_id,
            key_prefix=principal.prefix,
            user_id=body.user or principal.user_id,
            prompt=prompt,
            response=f"{count} embeddings of {dims} dimensions" if ok else "",
            params=params,
            prompt_tokens=prompt_tokens,
            latency_ms=e2e * 1000.0,
            status=status,
            flags=flags,
        )
    )

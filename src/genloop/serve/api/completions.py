"""``POST /v1/completions``: continue a prompt (OpenAI's legacy completions API)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field
from starlette.responses import Response

from genloop.security.keys import Principal
from genloop.serve.api.common import (
    SamplingFields,
    check_input,
    check_max_tokens,
    check_prompt_len,
    check_request,
    chunk_base,
    log_params,
    new_id,
    sampling_params,
    serve_text,
    stop_list,
    user_of,
)
from genloop.serve.auth import require_scope
from genloop.serve.errors import invalid
from genloop.serve.generation import TextJob
from genloop.serve.state import get_state

if TYPE_CHECKING:
    from genloop.serve.engine.types import TokenDelta
    from genloop.serve.generation import ChoiceResult, Piece, TextRun
    from genloop.serve.models import LoadedModel

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]
BIG_TEXT = 20_000  # characters; longer prompts are tokenized off the event loop


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=128)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=128)]
    ) = Field(description="A string, several strings, or token ids (one or several prompts).")
    max_tokens: int | None = Field(
        16, ge=1, le=1_000_000, description="Tokens to generate at most (default 16)."
    )
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Log-probabilities of the chosen and top-k tokens."
    )
    echo: bool = Field(False, description="Put the prompt before the completion.")
    best_of: int | None = Field(None, ge=1, le=128, description="Only equal to n is supported.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")


router = APIRouter(tags=["generation"])


@router.post("/v1/completions", summary="Complete a prompt (stream: true for server-sent events)")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    principal: Principal = Depends(require_scope("generate")),  # noqa: B008
) -> Response:
    state = get_state(request)
    prompts: list[str | list[int]]
    if isinstance(body.prompt, str):
        prompts = [body.prompt]
    elif body.prompt and isinstance(body.prompt[0], int):
        prompts = [list(body.prompt)]
    else:
        prompts = list(body.prompt)  # type: ignore[arg-type]
    check_request(body, state, len(prompts) * body.n)
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of is not supported (leave it unset, or equal to n)", "best_of")
    if body.echo and body.logprobs is not None:
        raise invalid("echo with logprobs (prompt log-probabilities) is not supported", "echo")
    stop = stop_list(body.stop, state.cfg.serve.max_stop)
    texts = [p for p in prompts if isinstance(p, str)]
    flags = check_input(state, "\n".join(texts)) if texts else []

    async def build(loaded: LoadedModel) -> TextJob:
        engine = loaded.text_engine()
        vocab = int(getattr(engine, "vocab_size", 0) or len(engine.tokenizer))
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                encoded = (
                    await asyncio.to_thread(engine.encode, p)
                    if len(p) > BIG_TEXT
                    else engine.encode(p)
                )
                ids.append(list(encoded))  # an empty prompt starts from BOS
            else:
                bad = [t for t in p if t >= vocab]
                if bad:
                    raise invalid(
                        f"token id {bad[0]} is outside the vocabulary ({vocab})", "prompt"
                    )
                ids.append(list(p))
        longest = max(len(x) for x in ids)
        check_prompt_len(longest, state, "prompt")
        max_tokens = check_max_tokens(body.max_tokens, longest, loaded, state, "prompt")
        return TextJob(
            endpoint="completions",
            response_id=new_id("cmpl"),
            loaded=loaded,
            prompts=ids,
            n=body.n,
            params=sampling_params(body, max_tokens=max_tokens, stop=stop, logprobs=body.logprobs),
            principal=principal,
            user_id=user_of(body, principal),
            log_prompt=texts[0] if len(prompts) == 1 and texts else _log_prompt(prompts),
            log_params=log_params(body, exclude={"prompt"}),
            flags=flags,
        )

    def echo(i: int, run: TextRun) -> str:
        if not body.echo:
            return ""
        p = prompts[i // body.n]
        return p if isinstance(p, str) else run.job.loaded.text_engine().tokenizer.decode(p)

    def respond(run: TextRun, results: list[ChoiceResult]) -> dict[str, Any]:
        return {
            "id": run.job.response_id,
            "object": "text_completion",
            "created": run.job.created,
            "model": run.job.loaded.ref,
            "system_fingerprint": run.job.loaded.ref,
            "choices": [
                {
                    "index": r.index,
                    "text": echo(r.index, run) + r.text,
                    "logprobs": _logprobs(run, r.tokens) if body.logprobs is not None else None,
                    "finish_reason": r.finish_reason,
                }
                for r in results
            ],
            "usage": run.usage(),
        }

    def base(run: TextRun, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return chunk_base(run, "text_completion", choices, body)

    def head(run: TextRun) -> list[dict[str, Any]]:
        if not body.echo:
            return []
        return [
            base(run, [{"index": i, "text": echo(i, run), "logprobs": None, "finish_reason": None}])
            for i in range(run.job.choices)
        ]

    def chunk(run: TextRun, piece: Piece) -> dict[str, Any]:
        tokens = [piece.delta] if piece.delta is not None else []
        return base(
            run,
            [
                {
                    "index": piece.index,
                    "text": piece.delta.text if piece.delta is not None else "",
                    "logprobs": _logprobs(run, tokens)
                    if body.logprobs is not None and tokens
                    else None,
                    "finish_reason": piece.finish_reason,
                }
            ],
        )

    def usage_chunk(run: TextRun) -> dict[str, Any]:
        return base(run, []) | {"usage": run.usage()}

    return await serve_text(
        state,
        request,
        body,
        principal,
        endpoint="completions",
        build=build,
        respond=respond,
        head=head,
        chunk=chunk,
        usage_chunk=usage_chunk,
    )


def _log_prompt(prompts: list[str | list[int]]) -> str:
    import json

    return json.dumps(prompts, ensure_ascii=False)


def _logprobs(run: TextRun, tokens: list[TokenDelta]) -> dict[str, Any]:
    """OpenAI's completions logprobs: parallel lists per token."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [run.token_text(t) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top_logprobs for t in tokens],
        "text_offset": offsets,
    }

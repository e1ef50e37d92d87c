"""``POST /v1/chat/completions``: answer a conversation, through the model's chat template."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="Only plain text is supported.")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(
        None, ge=1, le=1_000_000, description="Tokens to generate at most (default: as fits)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Same.")
    logprobs: bool = Field(False, description="Return the chosen tokens' log-probabilities.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: top k too.")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported.")
    tool_choice: Literal["none"] | None = Field(None, description="Not supported.")


router = APIRouter(tags=["generation"])


@router.post("/v1/chat/completions", summary="Answer a conversation (stream: true for SSE)")
async def create_chat_completion(
    body: ChatRequest,
    request: Request,
    principal: Principal = Depends(require_scope("generate")),  # noqa: B008
) -> Response:
    state = get_state(request)
    check_request(body, state, body.n)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
    stop = stop_list(body.stop, state.cfg.serve.max_stop)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    flags = check_input(
        state, "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None

    async def build(loaded: LoadedModel) -> TextJob:
        engine = loaded.text_engine()
        ids = list(engine.chat_prompt_ids(messages))
        check_prompt_len(len(ids), state, "messages")
        wanted = body.max_completion_tokens or body.max_tokens
        max_tokens = check_max_tokens(wanted, len(ids), loaded, state, "messages")
        return TextJob(
            endpoint="chat.completions",
            response_id=new_id("chatcmpl"),
            loaded=loaded,
            prompts=[ids],
            n=body.n,
            params=sampling_params(body, max_tokens=max_tokens, stop=stop, logprobs=logprobs),
            principal=principal,
            user_id=user_of(body, principal),
            log_prompt=json.dumps(messages, ensure_ascii=False),
            log_params=log_params(body, exclude={"messages"}),
            flags=flags,
        )

    def respond(run: TextRun, results: list[ChoiceResult]) -> dict[str, Any]:
        return {
            "id": run.job.response_id,
            "object": "chat.completion",
            "created": run.job.created,
            "model": run.job.loaded.ref,
            "system_fingerprint": run.job.loaded.ref,
            "choices": [
                {
                    "index": r.index,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": {"content": _logprobs(run, r.tokens)} if body.logprobs else None,
                    "finish_reason": r.finish_reason,
                }
                for r in results
            ],
            "usage": run.usage(),
        }

    def base(run: TextRun, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return chunk_base(run, "chat.completion.chunk", choices, body)

    def head(run: TextRun) -> list[dict[str, Any]]:
        return [
            base(
                run,
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
            for i in range(run.job.choices)
        ]

    def chunk(run: TextRun, piece: Piece) -> dict[str, Any]:
        if piece.delta is None:
            delta: dict[str, Any] = {}
            lp = None
        else:
            delta = {"content": piece.delta.text}
            lp = {"content": _logprobs(run, [piece.delta])} if body.logprobs else None
        return base(
            run,
            [
                {
                    "index": piece.index,
                    "delta": delta,
                    "logprobs": lp,
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
        endpoint="chat.completions",
        build=build,
        respond=respond,
        head=head,
        chunk=chunk,
        usage_chunk=usage_chunk,
    )


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(run: TextRun, tokens: list[TokenDelta]) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs: one entry per token, with its top alternatives."""
    return [
        _entry(run.token_text(t), t.logprob)
        | {"top_logprobs": [_entry(k, v) for k, v in (t.top_logprobs or {}).items()]}
        for t in tokens
    ]

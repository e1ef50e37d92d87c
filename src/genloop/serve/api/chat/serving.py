"""The handler of ``POST /v1/chat/completions``: messages in, through the model's chat
template, OpenAI's ``chat.completion`` out."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from genloop.serve.api.protocol import new_id
from genloop.serve.api.serving_text import (
    check_max_tokens,
    check_prompt_len,
    check_request,
    log_params,
    sampling_params,
    serve_text,
    stop_list,
    user_of,
)
from genloop.serve.api.text_run import TextJob
from genloop.serve.errors import invalid

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from genloop.security.keys import Principal
    from genloop.serve.api.chat.protocol import ChatRequest
    from genloop.serve.api.text_run import ChoiceResult, Piece, TextRun
    from genloop.serve.engine.types import TokenDelta
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState


async def serve_chat(
    state: ServerState, request: Request, body: ChatRequest, principal: Principal
) -> Response:
    return await serve_text(state, request, principal, ChatHandler(state, body, principal))


class ChatHandler:
    """One chat request (``serving_text.TextHandler``): a conversation answered ``n`` times."""

    endpoint = "chat.completions"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, state: ServerState, body: ChatRequest, principal: Principal) -> None:
        check_request(body, state, body.n)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        both = body.max_tokens is not None and body.max_completion_tokens is not None
        if both and body.max_tokens != body.max_completion_tokens:
            raise invalid("give max_tokens or max_completion_tokens, not both", "max_tokens")
        self.state = state
        self.body = body
        self.principal = principal
        self.stop = stop_list(body.stop, state.cfg.serve.max_stop)
        self.messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        self.flags = state.check_input(
            "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")
        )
        self.logprobs = (body.top_logprobs or 0) if body.logprobs else None

    async def build(self, loaded: LoadedModel) -> TextJob:
        body, state = self.body, self.state
        ids = list(loaded.text_engine().chat_prompt_ids(self.messages))
        check_prompt_len(len(ids), state, "messages")
        wanted = body.max_completion_tokens or body.max_tokens
        max_tokens = check_max_tokens(wanted, len(ids), loaded, state, "messages")
        return TextJob(
            endpoint=self.endpoint,
            response_id=new_id("chatcmpl"),
            loaded=loaded,
            prompts=[ids],
            n=body.n,
            params=sampling_params(
                body, max_tokens=max_tokens, stop=self.stop, logprobs=self.logprobs
            ),
            principal=self.principal,
            user_id=user_of(body, self.principal),
            log_prompt=json.dumps(self.messages, ensure_ascii=False),
            log_params=log_params(body, exclude={"messages"}),
            flags=self.flags,
        )

    def choice(self, run: TextRun, result: ChoiceResult) -> dict[str, Any]:
        return {
            "index": result.index,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": {"content": _logprobs(run, result.tokens)} if self.body.logprobs else None,
            "finish_reason": result.finish_reason,
        }

    def head(self, run: TextRun) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(run.job.choices)
        ]

    def delta(self, run: TextRun, piece: Piece) -> dict[str, Any]:
        if piece.delta is None:
            delta: dict[str, Any] = {}
            lp = None
        else:
            delta = {"content": piece.delta.text}
            lp = {"content": _logprobs(run, [piece.delta])} if self.body.logprobs else None
        return {
            "index": piece.index,
            "delta": delta,
            "logprobs": lp,
            "finish_reason": piece.finish_reason,
        }


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(run: TextRun, tokens: list[TokenDelta]) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs: one entry per token, with its top alternatives."""
    return [
        _entry(run.token_text(t), t.logprob)
        | {"top_logprobs": [_entry(k, v) for k, v in (t.top_logprobs or {}).items()]}
        for t in tokens
    ]

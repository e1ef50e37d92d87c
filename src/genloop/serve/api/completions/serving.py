"""The handler of ``POST /v1/completions``: prompts in, OpenAI's ``text_completion`` out."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from genloop.serve.api.protocol import new_id
from genloop.serve.api.serving_text import (
    check_max_tokens,
    check_prompt_len,
    check_request,
    log_params,
    prepare_grammar,
    sampling_params,
    serve_text,
    stop_list,
    user_of,
)
from genloop.serve.api.structured import response_grammar
from genloop.serve.api.text_run import TextJob
from genloop.serve.errors import invalid

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from genloop.security.keys import Principal
    from genloop.serve.api.completions.protocol import CompletionRequest
    from genloop.serve.api.text_run import ChoiceResult, Piece, TextRun
    from genloop.serve.engine.types import TokenDelta
    from genloop.serve.models import LoadedModel
    from genloop.serve.state import ServerState

BIG_TEXT = 20_000  # characters; longer prompts are tokenized off the event loop


async def serve_completion(
    state: ServerState, request: Request, body: CompletionRequest, principal: Principal
) -> Response:
    return await serve_text(state, request, principal, CompletionHandler(state, body, principal))


class CompletionHandler:
    """One completions request (``serving_text.TextHandler``): one or several prompts,
    as text or token ids, each continued ``n`` times."""

    endpoint = "completions"
    response_object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, state: ServerState, body: CompletionRequest, principal: Principal) -> None:
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
        self.state = state
        self.body = body
        self.principal = principal
        self.prompts = prompts
        self.stop = stop_list(body.stop, state.cfg.serve.max_stop)
        self.texts = [p for p in prompts if isinstance(p, str)]
        self.flags = state.check_input("\n".join(self.texts)) if self.texts else []

    async def build(self, loaded: LoadedModel) -> TextJob:
        body, state = self.body, self.state
        engine = loaded.text_engine()
        grammar = await asyncio.to_thread(response_grammar, body.response_format)
        await prepare_grammar(loaded, grammar, "response_format")
        vocab = engine.vocab_size
        ids: list[list[int]] = []
        for p in self.prompts:
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
        one_text = len(self.prompts) == 1 and self.texts
        return TextJob(
            endpoint=self.endpoint,
            response_id=new_id("cmpl"),
            loaded=loaded,
            prompts=ids,
            n=body.n,
            params=sampling_params(
                body, max_tokens=max_tokens, stop=self.stop, logprobs=body.logprobs
            ),
            principal=self.principal,
            user_id=user_of(body, self.principal),
            log_prompt=self.texts[0] if one_text else json.dumps(self.prompts, ensure_ascii=False),
            log_params=log_params(body, exclude={"prompt"}),
            flags=self.flags,
            grammar=grammar,
        )

    def choice(self, run: TextRun, result: ChoiceResult) -> dict[str, Any]:
        return {
            "index": result.index,
            "text": self._echo(result.index, run) + result.text,
            "logprobs": _logprobs(run, result.tokens) if self.body.logprobs is not None else None,
            "finish_reason": result.finish_reason,
        }

    def head(self, run: TextRun) -> list[dict[str, Any]]:
        if not self.body.echo:
            return []
        return [
            {"index": i, "text": self._echo(i, run), "logprobs": None, "finish_reason": None}
            for i in range(run.job.choices)
        ]

    def delta(self, run: TextRun, piece: Piece) -> dict[str, Any]:
        tokens = [piece.delta] if piece.delta is not None else []
        return {
            "index": piece.index,
            "text": piece.delta.text if piece.delta is not None else "",
            "logprobs": _logprobs(run, tokens)
            if self.body.logprobs is not None and tokens
            else None,
            "finish_reason": piece.finish_reason,
        }

    def _echo(self, i: int, run: TextRun) -> str:
        """Choice ``i``'s prompt, when the request asks to echo it."""
        if not self.body.echo:
            return ""
        p = self.prompts[i // self.body.n]
        return p if isinstance(p, str) else run.job.loaded.text_engine().tokenizer.decode(p)


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

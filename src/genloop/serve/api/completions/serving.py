"""The handler of ``POST /v1/completions``: prompts in, OpenAI's ``text_completion`` out.

``echo`` with ``logprobs`` scores the prompt too (what lm-evaluation-harness's
``local-completions`` model sends for its loglikelihood and multiple-choice tasks): each
choice's ``logprobs`` lists the prompt's tokens first, the first with a null log-probability
and null top, then the generated ones, in OpenAI's legacy shape (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``). ``max_tokens: 0`` then scores the
prompt and generates nothing.
"""

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
    from genloop.serve.engine.types import PromptLogprobs, TokenDelta
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
        self.scores_prompt = body.echo and body.logprobs is not None
        if body.max_tokens == 0 and not self.scores_prompt:
            raise invalid(
                "max_tokens 0 generates nothing: it only scores the prompt, with echo: true "
                "and logprobs set",
                "max_tokens",
            )
        if self.scores_prompt and body.num_beams > 1:
            raise invalid("echo with logprobs (prompt log-probabilities) needs num_beams 1", "echo")
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
                body,
                max_tokens=max_tokens,
                stop=self.stop,
                logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if self.scores_prompt else None,
            ),
            principal=self.principal,
            user_id=user_of(body, self.principal),
            log_prompt=self.texts[0] if one_text else json.dumps(self.prompts, ensure_ascii=False),
            log_params=log_params(body, exclude={"prompt"}),
            flags=self.flags,
            grammar=grammar,
        )

    def choice(self, run: TextRun, result: ChoiceResult) -> dict[str, Any]:
        echo = self._echo(result.index, run)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = _logprobs(run, result.tokens, at=len(echo))
            if result.prompt_logprobs is not None:
                logprobs = _join(
                    self._prompt_logprobs(run, result.index, result.prompt_logprobs), logprobs
                )
        return {
            "index": result.index,
            "text": echo + result.text,
            "logprobs": logprobs,
            "finish_reason": result.finish_reason,
        }

    def head(self, run: TextRun) -> list[dict[str, Any]]:
        if not self.body.echo or self.scores_prompt:  # a scored prompt comes as its own piece
            return []
        return [
            {"index": i, "text": self._echo(i, run), "logprobs": None, "finish_reason": None}
            for i in range(run.job.choices)
        ]

    def delta(self, run: TextRun, piece: Piece) -> dict[str, Any]:
        if piece.prompt is not None:  # the echoed prompt and its scores, before any token
            return {
                "index": piece.index,
                "text": self._echo(piece.index, run),
                "logprobs": self._prompt_logprobs(run, piece.index, piece.prompt),
                "finish_reason": None,
            }
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

    def _prompt_logprobs(self, run: TextRun, i: int, scored: PromptLogprobs) -> dict[str, Any]:
        """Choice ``i``'s prompt tokens in OpenAI's completions logprobs shape (the first
        token's log-probability and top are null: nothing comes before it)."""
        texts = run.prompt_token_texts(run.job.prompts[i // self.body.n])
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": texts,
            "token_logprobs": list(scored.logprobs),
            "top_logprobs": list(scored.top_logprobs),
            "text_offset": offsets,
        }


def _join(head: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
    """Two logprobs objects, one after the other (the prompt's, then the completion's)."""
    return {key: head[key] + tail[key] for key in head}


def _logprobs(run: TextRun, tokens: list[TokenDelta], at: int = 0) -> dict[str, Any]:
    """OpenAI's completions logprobs: parallel lists per token; ``text_offset`` counts from
    ``at`` (where the completion starts in the choice's text: after an echoed prompt)."""
    offsets = []
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [run.token_text(t) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top_logprobs for t in tokens],
        "text_offset": offsets,
    }

"""The handler of ``POST /v1/chat/completions``: messages in, through the model's chat
template, OpenAI's ``chat.completion`` out.

With ``tools`` (and ``tool_choice`` other than ``none``) the answer's ``<tool_call>``
blocks come back as the message's ``tool_calls`` (``finish_reason: tool_calls``), streamed
in OpenAI's shape: a call's first delta carries its ``id``, ``type`` and
``function.name``, later ones pieces of ``function.arguments``. ``tool_calls.py`` reads
them; ``api/structured.py`` writes the grammar that keeps them well formed.

A captioning model (kind ``vision``) answers with the captions of the last user
message's images instead (``vision.py``); a text model refuses image parts.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from genloop.serve.api.chat.tool_calls import (
    ToolCallParser,
    render_messages,
    template_knows_tools,
)
from genloop.serve.api.chat.vision import serve_vision_chat
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
from genloop.serve.api.structured import check_tools, schema_of, tools_grammar
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
    models = state.models
    if models.has(body.model) and models.kind(body.model) is None:
        await models.wait_started()  # its first load decides how it answers
    if models.kind(body.model) == "vision":
        return await serve_vision_chat(state, request, body, principal)
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
        self.tool_mode, self.tool_name = _tool_choice(body)
        self.flags = state.check_input(
            "\n".join(m.text() for m in body.messages if m.role != "assistant")
        )
        self.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.parsers: dict[int, ToolCallParser] = {}  # streamed choices' tool calls
        self.pending: dict[int, list[TokenDelta]] = {}  # tokens of held-back text (logprobs)

    @property
    def uses_tools(self) -> bool:
        return self.tool_mode not in (None, "none")

    def _grammar(self) -> str | None:
        """The request's grammar (tools, response_format), its schemas checked: a 400 for
        a bad one. Off the event loop: a big schema takes a moment to check."""
        body = self.body
        content = schema_of(body.response_format)
        if not self.uses_tools:
            return tools_grammar([], "none", content=content)
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
        check_tools(tools)
        return tools_grammar(
            tools,
            self.tool_mode,  # type: ignore[arg-type]
            name=self.tool_name,
            parallel=body.parallel_tool_calls is not False,
            content=content,
        )

    async def build(self, loaded: LoadedModel) -> TextJob:
        body, state = self.body, self.state
        engine = loaded.text_engine()
        images = [(i, j) for i, m in enumerate(body.messages) for j in m.image_parts()]
        if images:
            i, j = images[0]
            raise invalid(
                f"model {loaded.served} does not take images (it is a text model; captioning "
                "models do)",
                f"messages[{i}].content[{j}]",
                "images_not_supported",
            )
        grammar = await asyncio.to_thread(self._grammar)
        param = "tools" if self.uses_tools else "response_format"
        await prepare_grammar(loaded, grammar, param)
        template_tools = template_knows_tools(engine.tokenizer)
        messages, tools = render_messages(
            body.messages, body.tools if self.uses_tools else None, template_tools=template_tools
        )
        ids = list(engine.chat_prompt_ids(messages, tools))
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
            log_prompt=json.dumps(messages, ensure_ascii=False),
            log_params=log_params(body, exclude={"messages"}),
            flags=self.flags,
            grammar=grammar,
        )

    def choice(self, run: TextRun, result: ChoiceResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        finish = result.finish_reason
        if self.uses_tools:
            parser = ToolCallParser()
            parser.feed(result.text)
            parser.finish()
            calls = parser.complete_calls
            content = parser.content + parser.cut_off
            message["content"] = content if content.strip() or not calls else None
            if calls:
                message["tool_calls"] = [_call(c.id, c.name, c.arguments) for c in calls]
                if finish == "stop" and not parser.cut_off:
                    finish = "tool_calls"
        return {
            "index": result.index,
            "message": message,
            "logprobs": {"content": _logprobs(run, result.tokens)} if self.body.logprobs else None,
            "finish_reason": finish,
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

    def delta(self, run: TextRun, piece: Piece) -> dict[str, Any] | None:
        if not self.uses_tools:
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
        return self._tool_delta(run, piece)

    def _tool_delta(self, run: TextRun, piece: Piece) -> dict[str, Any] | None:
        """A streamed piece of an answer that may call tools: its content, new calls and
        argument pieces; None while its text is held back (a tag may be starting)."""
        parser = self.parsers.setdefault(piece.index, ToolCallParser())
        tokens = self.pending.setdefault(piece.index, [])
        finish = piece.finish_reason
        if piece.delta is not None:
            tokens.append(piece.delta)
            update = parser.feed(piece.delta.text)
        else:
            update = parser.finish()
            if finish == "stop" and parser.complete_calls and not parser.cut_off:
                finish = "tool_calls"
        if not update and finish is None:
            return None
        delta: dict[str, Any] = {}
        if update.content:
            delta["content"] = update.content
        calls: list[dict[str, Any]] = [
            {
                "index": c.index,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": ""},
            }
            for c in update.started
        ]
        calls += [{"index": i, "function": {"arguments": a}} for i, a in update.arguments]
        if calls:
            delta["tool_calls"] = calls
        lp = {"content": _logprobs(run, tokens)} if self.body.logprobs and tokens else None
        self.pending[piece.index] = []
        return {"index": piece.index, "delta": delta, "logprobs": lp, "finish_reason": finish}


def _tool_choice(body: ChatRequest) -> tuple[str | None, str | None]:
    """(mode, function name): ``none``, ``auto``, ``required`` or ``named`` (with the
    name); (None, None) without tools."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return None, None
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        return choice, None
    names = [t.function.name for t in body.tools]
    if choice.function.name not in names:
        raise invalid(
            f"tool_choice names {choice.function.name!r}, which is not among the tools "
            f"({', '.join(names)})",
            "tool_choice",
        )
    return "named", choice.function.name


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(run: TextRun, tokens: list[TokenDelta]) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs: one entry per token, with its top alternatives."""
    return [
        _entry(run.token_text(t), t.logprob)
        | {"top_logprobs": [_entry(k, v) for k, v in (t.top_logprobs or {}).items()]}
        for t in tokens
    ]

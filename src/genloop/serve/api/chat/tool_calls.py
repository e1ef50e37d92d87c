"""Tool calls in a chat: the tools and earlier calls into the prompt, new calls out of the text.

In. A chat template that knows tools (it mentions ``tools``, as Qwen's and Hermes' do)
gets them as transformers passes them (``apply_chat_template(tools=...)``), and earlier
calls as ``tool_calls`` with their arguments parsed, as vLLM passes them. A template that
does not (genloop's own) gets the tools as a system message in the Hermes wording, earlier
calls as the ``<tool_call>`` blocks the model wrote, and tool results as user turns in
``<tool_response>`` tags: every template renders system, user and assistant turns.

Out. :class:`ToolCallParser` reads the ``<tool_call>`` blocks (``api/structured.py``) out of
the text as it grows: content before and around them, then for each call its name as soon
as it is written and its arguments piece by piece (the pieces of one call join to its
arguments' JSON text, exactly as generated). A call counts only once its JSON is complete;
a text cut off inside one (``finish_reason: length``) yields no call for it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from genloop.serve.api.structured import CALL_CLOSE, CALL_OPEN

if TYPE_CHECKING:
    from genloop.serve.api.chat.protocol import ChatMessage, Tool

# The system message for templates without tools (the wording of Qwen2.5's template)
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*', re.S)
_HEAD_LIMIT = 512  # characters of a call's start in which its name must have appeared


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def template_knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (``api/structured.py``)."""
    return f'{CALL_OPEN}\n{{"name":{json.dumps(name)},"arguments":{arguments}}}\n{CALL_CLOSE}'


def render_messages(
    messages: list[ChatMessage], tools: list[Tool] | None, *, template_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for the chat template, and the tools to hand it (None: none, or
    already in a system message). ``tools`` None: the request's tool_choice is none."""
    specs = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if template_tools:
            msg: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {
                            "name": c.function.name,
                            "arguments": _loads(c.function.arguments),
                        },
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        elif role == "tool":
            response = f"<tool_response>\n{m.text()}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # one user turn for consecutive results
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        else:
            calls = [call_text(c.function.name, c.function.arguments) for c in m.tool_calls or ()]
            out.append({"role": role, "content": "\n".join([m.text()] * bool(m.text()) + calls)})
    for msg in out:
        msg.pop("tool_results", None)
    if specs is None or template_tools:
        return out, specs
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in specs)
    prompt = TOOLS_PROMPT.format(tools=listing)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # as it came: the template shows it as text


# ------------------------------------------------------------------------ reading calls


@dataclass
class Call:
    index: int
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class Update:
    """What one piece of text added: content, new calls (name known), argument pieces."""

    content: str = ""
    started: list[Call] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)  # (call index, piece)

    def __bool__(self) -> bool:
        return bool(self.content or self.started or self.arguments)


class ToolCallParser:
    """The calls in a growing text (module docstring). ``feed`` each new piece, then
    ``finish`` once; :attr:`calls` and :attr:`content` hold the result."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.content = ""  # text outside calls
        self.cut_off = ""  # the text of a call cut off before its JSON ended
        self._state = "text"  # text | head | args | tail
        self._buf = ""
        self._raw = ""  # the current call's text from its tag on (for a cut-off call)
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> Update:
        update = Update()
        self._buf += text
        while self._step(update):
            pass
        self.content += update.content
        return update

    def finish(self) -> Update:
        """The text is complete: the content held back (a possible tag's start). A call
        cut off before its JSON ended is dropped from :attr:`calls`; its text is kept in
        :attr:`cut_off` (it was never sent as content)."""
        update = Update()
        if self._state == "text":
            if not (self.calls and not self._buf.strip()):
                update.content = self._buf
        elif not (self._state == "tail" and self.calls[-1].complete):
            if self._state != "head":
                self.calls.pop()
            self.cut_off = self._raw + self._buf
        self._buf = ""
        self.content += update.content
        return update

    @property
    def complete_calls(self) -> list[Call]:
        return [c for c in self.calls if c.complete]

    def _step(self, update: Update) -> bool:
        """Move on as far as the buffer allows; True when it should be called again."""
        if self._state == "text":
            at = self._buf.find(CALL_OPEN)
            if at < 0:
                keep = _partial_suffix(self._buf, CALL_OPEN)
                out = self._buf[: len(self._buf) - keep]
                if self.calls and not out.strip():
                    return False  # whitespace between calls is not content
                update.content += out
                self._buf = self._buf[len(out) :]
                return False
            before = self._buf[:at]
            if not (self.calls and not before.strip()):
                update.content += before
            self._raw = CALL_OPEN
            self._buf = self._buf[at + len(CALL_OPEN) :]
            self._state = "head"
            return True
        if self._state == "head":
            found = _HEAD.match(self._buf)
            if found is None or found.end() == len(self._buf):  # more may follow the colon
                if len(self._buf) > _HEAD_LIMIT:  # not a call: it was text after all
                    update.content += self._raw + self._buf
                    self._raw, self._buf, self._state = "", "", "text"
                return False
            name = json.loads(f'"{found.group(1)}"')
            call = Call(len(self.calls), new_call_id(), name)
            self.calls.append(call)
            update.started.append(call)
            self._raw += self._buf[: found.end()]
            self._buf = self._buf[found.end() :]
            self._state, self._depth, self._in_string, self._escape = "args", 0, False, False
            return True
        if self._state == "args":
            call = self.calls[-1]
            end = self._scan(self._buf)
            piece = self._buf if end is None else self._buf[:end]
            if piece:
                call.arguments += piece
                update.arguments.append((call.index, piece))
                self._raw += piece
            self._buf = "" if end is None else self._buf[end:]
            if end is None:
                return False
            call.complete = _is_json(call.arguments)
            self._state = "tail"
            return True
        # tail: the rest of the call object, then the closing tag
        at = self._buf.find(CALL_CLOSE)
        if at < 0:
            return False
        self._raw += self._buf[: at + len(CALL_CLOSE)]
        self._buf = self._buf[at + len(CALL_CLOSE) :]
        self._raw, self._state = "", "text"
        return True

    def _scan(self, text: str) -> int | None:
        """Where the arguments value ends in ``text`` (an index past its last character),
        or None when it goes on; strings and nesting tracked across calls."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        return i + 1  # a string value
                continue
            if ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                if self._depth == 0:
                    return i  # a scalar value, ended by the call object's brace
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
            elif ch == "," and self._depth == 0:
                return i
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (held back: it may be one)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

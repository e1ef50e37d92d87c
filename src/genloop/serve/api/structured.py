"""Structured outputs at the API: ``response_format`` and ``tools`` become one grammar.

Both text endpoints take ``response_format`` (``json_object``, or ``json_schema`` with a
``schema``); ``/v1/chat/completions`` also takes ``tools`` and ``tool_choice``. Whatever
was asked is written here as one grammar in llguidance's Lark dialect (``%json {schema}``
embeds a JSON schema), which the engine keeps every generated token inside
(``serve/engine/grammar.py``; the vLLM engine hands the same text to vLLM's ``guidance``
backend, so it means the same there).

JSON is written compact (no whitespace between tokens: ``{"a":1,"b":[2]}``). Free
whitespace is unbounded in a grammar, and a model that has not learned to stop (an
untrained one) then writes newlines until its budget is gone.

Tool calls are written the way Hermes and Qwen models write them (vLLM's ``hermes``
parser reads the same)::

    <tool_call>
    {"name":"get_weather","arguments":{"city":"Paris"}}
    </tool_call>

- ``tool_choice: required`` (and the default ``auto`` with a JSON ``response_format``):
  the output is one or more such blocks (one with ``parallel_tool_calls: false``); a named
  function (``{"type": "function", "function": {"name": ...}}``): exactly one block, that
  function's;
- ``auto``: free text, in which ``<tool_call>`` opens a block whose JSON the grammar then
  holds to a tool's name and parameters schema (llguidance's lazy trigger, the way its
  structural tags work). The model decides, by writing the tag or not; what it writes as
  a call is always a valid call. Parsing the text afterwards alone (vLLM's hermes parser)
  would leave malformed calls possible; forcing JSON alone would take away the text answer;
- ``none``: no grammar, and the tools are not put in the prompt.

``chat/tool_calls.py`` reads the blocks back out of the text, whole or as they stream.
"""

from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any, Literal

from genloop.serve.errors import invalid

if TYPE_CHECKING:
    from genloop.serve.api.protocol import ResponseFormat

MAX_SCHEMA_CHARS = 100_000  # of one schema, as JSON
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON (module docstring)
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
EMPTY_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
_NOT_SUPPORTED = re.compile(r"Unimplemented keys: \[(.*)\]")


# ------------------------------------------------------------------------ grammars


def response_grammar(fmt: ResponseFormat | None, param: str = "response_format") -> str | None:
    """The grammar of a ``response_format`` (None for plain text); a 400 for a bad schema."""
    schema = schema_of(fmt, param)
    return None if schema is None else _start(f"%json {_embed(schema)}")


def schema_of(fmt: ResponseFormat | None, param: str = "response_format") -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (None for plain text), checked."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None:
        raise invalid("response_format json_schema needs a json_schema object", param)
    schema = fmt.json_schema.schema_
    if schema is None:  # OpenAI allows it: any JSON object then
        return {"type": "object"}
    check_schema(schema, f"{param}.json_schema.schema")
    return schema


def tools_grammar(
    tools: list[dict[str, Any]],
    mode: Literal["auto", "required", "named", "none"],
    *,
    name: str | None = None,
    parallel: bool = True,
    content: dict[str, Any] | None = None,
) -> str | None:
    """The grammar of a tool call request (module docstring). ``tools`` are OpenAI's
    ``{"type": "function", "function": {...}}`` (checked by :func:`check_tools`); ``mode``
    is the ``tool_choice`` (``named``: the function ``name``); ``content`` is the JSON
    schema the answer must follow when it is not a call (None: free text)."""
    if mode == "none":
        return None if content is None else _start(f"%json {_embed(content)}")
    functions = [t["function"] for t in tools]
    if mode == "named":
        functions = [f for f in functions if f["name"] == name]
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(functions)))}"]
    for i, f in enumerate(functions):
        head = json.dumps(f'{{"name":{json.dumps(f["name"])},"arguments":')
        params = f.get("parameters") or EMPTY_PARAMETERS
        rules.append(f'call_{i}: {head} args_{i} "}}"')
        rules.append(f"args_{i}: %json {_embed(params)}")
    block = f"tool_call: {json.dumps(CALL_OPEN + chr(10))} call {json.dumps(chr(10) + CALL_CLOSE)}"
    calls = 'tool_call ("\\n" tool_call)*' if parallel and mode != "named" else "tool_call"
    if mode == "auto" and content is None:
        # free text; the tag opens a call (a lazy lexeme ends the text at the tag)
        start = [
            "start: text_call* TEXT",
            f'text_call: call_trig "\\n" call "\\n{CALL_CLOSE}"',
            f"call_trig[lazy]: TEXT {json.dumps(CALL_OPEN)}",
            r"TEXT: /(.|\n)*/",
        ]
        return _grammar(start + rules)
    if mode == "auto":
        start = [f"start: {calls} | content", f"content: %json {_embed(content or {})}", block]
        return _grammar(start + rules)
    return _grammar([f"start: {calls}", block, *rules])


def _embed(schema: dict[str, Any], **extra: Any) -> str:
    """A JSON schema as ``%json`` takes it, with genloop's JSON options (llguidance reads
    them from the schema's ``x-guidance`` key)."""
    own = schema.get("x-guidance")
    options = (own if isinstance(own, dict) else {}) | JSON_OPTIONS | extra
    return json.dumps(schema | {"x-guidance": options}, ensure_ascii=False)


def _start(rule: str) -> str:
    return _grammar([f"start: {rule}"])


def _grammar(lines: list[str]) -> str:
    return "%llguidance {}\n" + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ checks


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming what is wrong with ``schema``, or listing the JSON Schema features the
    grammar engine does not support (all of them, not the first)."""
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise invalid(f"the schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS}", param)
    problem = _schema_problem(text)
    if problem is not None:
        raise invalid(problem, param)


@functools.lru_cache(maxsize=256)
def _schema_problem(schema_text: str) -> str | None:
    """Why llguidance refuses a schema (None: it takes it). Cached: clients send the same
    schemas again and again."""
    from genloop.serve.engine.grammar import check_grammar

    schema = json.loads(schema_text)

    def errors(lenient: bool) -> list[str]:
        return check_grammar(_start(f"%json {_embed(schema, lenient=lenient)}"))

    strict = errors(False)
    if not strict:
        return None
    if not errors(True):  # only unimplemented keywords: name every one
        import llguidance

        lenient = _start(f"%json {_embed(schema, lenient=True)}")
        _, warnings = llguidance.LLMatcher.validate_grammar_with_warnings(lenient)
        features: list[str] = []
        for w in warnings:
            found = _NOT_SUPPORTED.search(w)
            names = json.loads(f"[{found.group(1)}]") if found else [w]
            features += [str(n) for n in names if str(n) not in features]
        return (
            "the schema uses JSON Schema features that structured outputs do not support: "
            + ", ".join(features)
            + " (remove them, or enforce them after parsing)"
        )
    reason = _first_error(strict[0])
    if "not supported" in reason:
        return f"the schema uses a feature that structured outputs do not support: {reason}"
    return f"the schema is not a valid JSON schema: {reason}"


def _first_error(message: str) -> str:
    """llguidance's message without the grammar excerpt it quotes (line-numbered)."""
    message = message.split("failed to compile JSON schema: ", 1)[-1]
    lines = [ln for ln in message.splitlines() if not re.match(r"\s*\d+ \|", ln)]
    return " ".join(ln.strip() for ln in lines if ln.strip() and ln.strip() != "^")


def check_tools(tools: list[dict[str, Any]]) -> None:
    """Names unique; every parameters schema one the grammar engine takes (400s)."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        f = tool["function"]
        if f["name"] in seen:
            raise invalid(f"two tools are named {f['name']!r}", f"tools[{i}].function.name")
        seen.add(f["name"])
        params = f.get("parameters")
        if params is not None:
            check_schema(params, f"tools[{i}].function.parameters")

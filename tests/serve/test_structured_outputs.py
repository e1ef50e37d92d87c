"""Structured outputs and tool calls through the official ``openai`` client, unchanged,
against a live server on loopback (the session's untrained tiny Llama): ``parse()`` with a
pydantic model, ``json_object`` on both endpoints, tool calls streamed and not with a round
trip back through a ``tool`` message, and the 400s of bad schemas and tools."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Address(BaseModel):
    city: str
    zip_code: str


class Person(BaseModel):
    name: str
    age: int
    email: str | None
    role: Literal["admin", "user", "guest"]
    tags: list[str]
    address: Address


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": GetWeather.model_json_schema(),
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time now."},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(module_ws: Workspace) -> Iterator[LiveServer]:
    with running_server(module_ws, serve_config(), make_keys(module_ws)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client"], max_retries=0
    ) as c:
        yield c


def test_parse_gives_schema_conforming_json_for_every_seed(client: openai.OpenAI) -> None:
    """The model is untrained: only the grammar (and closing within the budget) makes all
    50 answers parse."""

    def ask(seed: int) -> Person:
        r = client.chat.completions.parse(
            model="tiny",
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format=Person,
            seed=seed,
            temperature=1.0,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.message.parsed is not None
        Person.model_validate_json(choice.message.content or "")
        return choice.message.parsed

    with ThreadPoolExecutor(8) as pool:
        people = list(pool.map(ask, range(50)))
    assert len(people) == 50
    assert len({p.model_dump_json() for p in people}) > 1  # sampled, not one fixed answer


def test_json_object_on_both_endpoints(server: LiveServer) -> None:
    with server.client(server.keys["client"]) as c:
        for path, body in (
            ("/v1/chat/completions", {"messages": ASK}),
            ("/v1/completions", {"prompt": "JSON:"}),
        ):
            r = c.post(
                path,
                json={"model": "tiny", "seed": 3, "max_tokens": 200}
                | body
                | {"response_format": {"type": "json_object"}},
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert choice["finish_reason"] == "stop"
            assert isinstance(json.loads(text), dict)


def _weather_call(message: object) -> GetWeather:
    calls = message.tool_calls  # type: ignore[attr-defined]
    assert calls, message
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert calls[0].function.name == "get_weather"
    return GetWeather.model_validate_json(calls[0].function.arguments)


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
)
def test_tool_call_round_trip(client: openai.OpenAI, tool_choice: object) -> None:
    """A call, its result sent back as a tool message, then the final answer."""
    tools = [WEATHER_TOOL, TIME_TOOL] if tool_choice == "required" else [WEATHER_TOOL]
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=tools,  # type: ignore[arg-type]
        tool_choice=tool_choice,  # type: ignore[arg-type]
        parallel_tool_calls=False,
        seed=5,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls or []) == 1
    if tool_choice != "required":
        _weather_call(choice.message)
    call = (choice.message.tool_calls or [])[0]
    json.loads(call.function.arguments)
    messages = [
        *ASK,
        choice.message,  # as it came back, as the openai client's examples do
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=tools,
        tool_choice="none",
        max_tokens=20,  # type: ignore[arg-type]
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)


def test_streamed_tool_calls_have_openais_shape(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        stream=True,
        seed=7,
    )
    deltas, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.tool_calls:
                deltas += choice.delta.tool_calls
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first = deltas[0]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == ""
    later = [d for d in deltas[1:] if d.index == first.index]
    assert later and all(d.id is None and d.function.name is None for d in later)
    arguments = "".join(d.function.arguments or "" for d in later)
    GetWeather.model_validate_json(arguments)

    # the openai client's own stream helper puts the same calls together
    with client.chat.completions.stream(
        model="tiny",
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
        tool_choice="required",
        seed=7,
    ) as s:
        completion = s.get_final_completion()
    calls = completion.choices[0].message.tool_calls or []
    assert isinstance(calls[0].function.parsed_arguments, GetWeather)
    assert calls[0].function.arguments == json.loads(json.dumps(calls[0].function.arguments))


def _schema_format(schema: object) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"response_format": _schema_format({"type": "objectx"})}, "response_format", "objectx"),
        (
            {"response_format": _schema_format({"$ref": "#/$defs/nowhere"})},
            "response_format",
            "nowhere",
        ),
        (
            {
                "response_format": _schema_format(
                    {
                        "type": "object",
                        "properties": {
                            "a": {"not": {"type": "string"}},
                            "b": {"type": "array", "uniqueItems": True},
                        },
                    }
                )
            },
            "response_format",
            "not support",  # and both features named (below)
        ),
        (
            {"response_format": _schema_format({"type": "string", "pattern": "(?<=a)b"})},
            "response_format",
            "look-around",
        ),
        (
            {"response_format": _schema_format({"type": "string", "x-guidance": "odd"})},
            "response_format",
            None,  # accepted or refused, but never a 500
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name", "get_weather"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
            "tools[0].function.parameters",
            "type",
        ),
        ({"response_format": {"type": "json_object"}, "num_beams": 2}, "num_beams", "beam"),
    ],
)
def test_bad_structured_requests_are_400s(
    server: LiveServer, change: dict[str, object], param: str, words: str | None
) -> None:
    with server.client(server.keys["client"]) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK} | change)
    assert r.status_code in ((200, 400) if words is None else (400,)), r.text
    if words is None:
        return
    error = r.json()["error"]
    assert (error["param"] or "").startswith(param), error
    assert words in error["message"], error
    if "not support" in words:
        assert "not" in error["message"] and "uniqueItems" in error["message"]


def test_bad_messages_are_400s(server: LiveServer) -> None:
    with server.client(server.keys["client"]) as c:
        for messages in (
            [*ASK, {"role": "tool", "content": "21"}],  # no tool_call_id
            [{"role": "user", "content": None}],
            [{"role": "user", "content": "x", "tool_calls": []}],
        ):
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
            assert r.status_code == 400, r.text


def test_a_call_that_cannot_finish_ends_on_length_without_tool_calls(
    client: openai.OpenAI,
) -> None:
    """max_tokens below the shortest call: cut off, and no call claimed from its text."""
    for stream in (False, True):
        kwargs = dict(
            model="tiny",
            messages=ASK,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=12,
            seed=1,
        )
        if not stream:
            r = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
            choice = r.choices[0]
            assert choice.finish_reason == "length"
            assert choice.message.tool_calls is None
            assert (choice.message.content or "").startswith("<tool_call>")
            continue
        finish, calls = None, []
        for chunk in client.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                calls += ch.delta.tool_calls or []
        assert finish == "length"
        arguments = "".join(c.function.arguments or "" for c in calls if c.function)
        with pytest.raises(ValueError):
            json.loads(arguments)  # what was streamed is visibly incomplete
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="tiny", messages=ASK, response_format=Person, max_tokens=8
        )


def test_parse_of_a_json_schema_on_completions(server: LiveServer) -> None:
    with server.client(server.keys["client"]) as c:
        r = c.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "A person:",
                "max_tokens": 300,
                "seed": 11,
                "response_format": _schema_format(Person.model_json_schema()),
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    Person.model_validate_json(r.json()["choices"][0]["text"])


def test_a_parsed_answer_goes_back_into_the_conversation(client: openai.OpenAI) -> None:
    """parse() answers carry ``parsed`` and ``parsed_arguments``; appended to the messages
    as they came (the openai docs' way), the next request takes them."""
    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]
    r = client.chat.completions.parse(
        model="tiny", messages=ASK, tools=tools, tool_choice="required", max_tokens=120, seed=2
    )
    message = r.choices[0].message
    call = (message.tool_calls or [])[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)
    final = client.chat.completions.create(
        model="tiny",
        messages=[*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "21"}],
        tools=tools,
        max_tokens=10,
    )
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_answers_in_text_or_with_valid_calls(client: openai.OpenAI) -> None:
    """tool_choice auto: the model decides; whatever it writes as a call is a valid one."""
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[WEATHER_TOOL],
            max_tokens=60,
            seed=seed,  # type: ignore[list-item]
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            for call in choice.message.tool_calls:
                GetWeather.model_validate_json(call.function.arguments)
        else:
            assert choice.finish_reason in ("stop", "length")
            assert isinstance(choice.message.content, str)


def test_scored_and_constrained_requests_share_a_batch(client: openai.OpenAI) -> None:
    """A prompt scored for lm-evaluation-harness (echo + logprobs) and a schema-bound answer
    running together get what each gets alone: the same prompt scores, the same JSON."""

    def score() -> list[float | None]:
        r = client.completions.create(
            model="tiny",
            prompt="The cat sat on the mat",
            echo=True,
            logprobs=1,
            max_tokens=1,
            temperature=0,
        )
        assert r.choices[0].logprobs is not None
        return list(r.choices[0].logprobs.token_logprobs or [])

    def answer() -> str:
        r = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            temperature=0,
            max_tokens=80,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "weather", "schema": GetWeather.model_json_schema()},
            },
        )
        return r.choices[0].message.content or ""

    alone = (score(), answer())
    with ThreadPoolExecutor(8) as pool:
        scores = [pool.submit(score) for _ in range(4)]
        answers = [pool.submit(answer) for _ in range(4)]
        together = [f.result() for f in scores], [f.result() for f in answers]
    GetWeather.model_validate_json(alone[1])
    for got in together[0]:
        assert got == pytest.approx(alone[0], abs=1e-4)
    assert together[1] == [alone[1]] * 4

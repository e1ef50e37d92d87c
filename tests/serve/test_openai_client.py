"""The official ``openai`` client, unchanged, against a live server on loopback: models,
completions, chat, streaming, sampling controls, logprobs, extras, errors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


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


def test_models_lists_the_served_ref_and_its_version(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny@production"]
    assert models[0].model_extra["ref"] == "tiny@1"
    assert client.models.retrieve("tiny@production").id == "tiny@production"


def test_completion_reports_usage_finish_reason_and_an_id(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny@production", prompt="Hello", max_tokens=7)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.model == "tiny@1"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_greedy_and_seeded_sampling_repeat_themselves(client: openai.OpenAI) -> None:
    def text(**kw: object) -> str:
        r = client.completions.create(model="tiny", prompt="The cat", max_tokens=12, **kw)
        return r.choices[0].text

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=1, seed=7) == text(temperature=1, seed=7)
    samples = {text(temperature=1, seed=s) for s in range(4)}
    assert len(samples) > 1  # different seeds, different draws


def test_n_choices_and_several_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Hi", n=3, max_tokens=4, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    r = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=3)
    assert len(r.choices) == 4
    assert r.usage is not None and r.usage.completion_tokens <= 12


def test_stop_sequence_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="Rain", max_tokens=40, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 10, "the greedy continuation is too short to pick a stop string"
    stop = text[6:9]
    r = client.completions.create(
        model="tiny", prompt="Rain", max_tokens=40, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_the_unstreamed_one(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "Hello there", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    finished = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finished == ["length"] or finished == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


def test_chat_uses_the_template_and_streams(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    r = client.chat.completions.create(
        model="tiny@production", messages=messages, max_tokens=10, temperature=0
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.usage is not None and r.usage.prompt_tokens > 8  # the template's tokens count
    stream = client.chat.completions.create(
        model="tiny@production", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_logprobs_for_completions_and_chat(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and r.usage is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    c = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    content = c.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) <= 3 and t.logprob <= 0 for t in content)


def test_extras_top_k_and_beam_search(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=6, extra_body={"top_k": 1, "seed": 3}
    )
    greedy = client.completions.create(model="tiny", prompt="Hi", max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy
    beam = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=6, extra_body={"num_beams": 3}
    )
    assert beam.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="tiny", prompt="Hi", max_tokens=6, stream=True, extra_body={"num_beams": 2}
        )
    assert err.value.body["param"] == "stream"


def test_errors_have_the_openai_shape_and_classes(server: LiveServer) -> None:
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="gl_" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client"], max_retries=0
    )
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="x")
    assert nf.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as n:
        client.completions.create(model="tiny", prompt="x", n=9)
    assert n.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as mt:
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    assert mt.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as st:
        client.completions.create(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"])
    assert st.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as tp:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert tp.value.body["param"] == "temperature"
    scoped = openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["feedback"], max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError):
        scoped.completions.create(model="tiny", prompt="x")
    bad_key.close(), client.close(), scoped.close()


def test_a_response_id_takes_feedback(server: LiveServer, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, user="alice"
    )
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.keys['client']}"}
    ) as h:
        body = {"response_id": r.id, "rating": -1, "correction": "Hello!", "user": "alice"}
        ok = h.post("/v1/feedback", json=body)
        assert ok.status_code == 200, ok.text
        assert ok.json()["response_id"] == r.id
        missing = h.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": 1})
        assert missing.status_code == 404
        bad = h.post("/v1/feedback", json={"response_id": r.id, "rating": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    admin = httpx.get(
        server.url + "/v1/admin/feedback",
        headers={"Authorization": f"Bearer {server.keys['admin']}"},
    ).json()
    row = next(f for f in admin["data"] if f["response_id"] == r.id)
    assert row["user_id"] == "alice" and row["rating"] == -1 and row["has_correction"]

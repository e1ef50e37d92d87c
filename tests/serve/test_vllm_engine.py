"""``serve.engine: vllm``: genloop's gateway over a real, managed vLLM process.

One vLLM process serves the whole module (it takes a minute or two to start on CPU): a
session-scoped server runs genloop's app with ``serve.engine: vllm`` on a tiny Llama (head
size 32: vLLM's CPU attention has no kernel for 16). The tests go through the gateway with
API keys and compare with vLLM answering directly. The hot-swap and restart tests cost one
extra start each; the last test stops the server and checks that no vLLM process is left.

Without a vLLM environment (``make vllm``; ``$GENLOOP_VLLM_PYTHON``) the module is skipped,
unless ``$GENLOOP_REQUIRE_VLLM`` is set (``make pytest`` sets it), when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from genloop.config import parse_config
from genloop.serve.engine.vllm import INSTALL_COMMAND, VllmEngine, find_vllm_python
from genloop.workspace import Workspace, init_workspace

from .conftest import CORPUS, LiveServer, build_wide_llama, make_keys, wait_for_request_row

REQUIRED = bool(os.environ.get("GENLOOP_REQUIRE_VLLM"))
STARTUP_S = 900.0

pytestmark = pytest.mark.skipif(
    find_vllm_python() is None and not REQUIRED,
    reason=f"no vLLM environment ('{INSTALL_COMMAND}' or $GENLOOP_VLLM_PYTHON)",
)


class SlowLiveServer(LiveServer):
    """A live server that waits for vLLM's start (minutes on CPU) before it is ready."""

    def wait_ready(self, timeout: float = STARTUP_S) -> None:
        super().wait_ready(timeout)


@pytest.fixture(scope="session")
def vllm_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with ``wide@1`` (a 2-layer, 64-wide Llama, 2 query heads sharing one
    key/value head) and ``wide@production`` → 1."""
    from genloop.data.tokenizer import train_bpe
    from genloop.workspace import registry

    root = tmp_path_factory.mktemp("vllm")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    model = build_wide_llama(root / "wide", tok, n_head=2, n_kv_head=1, context_length=256)
    ws = init_workspace(root / "ws")
    registry.register_model(ws, "wide", "causal_lm", model)
    registry.promote(ws, "wide@1", "production")
    # wide@2, other weights, for the hot-swap test
    other = build_wide_llama(root / "wide2", tok, seed=4, n_head=2, n_kv_head=1, context_length=256)
    registry.register_model(ws, "wide", "causal_lm", other)
    yield ws
    ws.close()


@pytest.fixture(scope="session")
def gateway(vllm_ws: Workspace) -> Iterator[SlowLiveServer]:
    """genloop's server over one managed vLLM process, for the whole session."""
    from genloop.serve.app import create_app
    from genloop.serve.engine.vllm import require_vllm_python

    require_vllm_python()  # $GENLOOP_REQUIRE_VLLM without an environment: fail now, clearly

    cfg = parse_config(
        {
            "serve": {
                "models": ["wide@production"],
                "port": 0,
                "device": "cpu",
                "engine": "vllm",
                "max_prompt_tokens": 128,
                "max_tokens": 64,
                "max_batch_size": 4,
            },
            "security": {"guardrails": {"max_repetition": None}},
        }
    )
    server = SlowLiveServer(create_app(vllm_ws, cfg), cfg, make_keys(vllm_ws))
    with server:
        yield server


def engine_of(server: LiveServer) -> VllmEngine:
    engine = server.state.models.served[0].current.engine
    assert isinstance(engine, VllmEngine)
    return engine


def bare_vllm(engine: VllmEngine) -> httpx.Client:
    """A client of the vLLM process itself (its internal key), for comparisons."""
    return httpx.Client(
        base_url=engine.process.base_url,
        headers={"Authorization": f"Bearer {engine.process.api_key}"},
        timeout=60,
    )


def stream_in_background(
    server: LiveServer, body: dict[str, Any]
) -> tuple[threading.Thread, list[str]]:
    """Stream ``body`` from ``/v1/completions`` on a thread; returns once the first line
    arrived, with the thread and the list its lines go to."""
    started, lines = threading.Event(), []

    def stream() -> None:
        with (
            server.client(server.keys["generate"]) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                started.set()
                if line:
                    lines.append(line)

    running = threading.Thread(target=stream)
    running.start()
    assert started.wait(60)
    return running, lines


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


# ---------------------------------------------------------------------------- requests


def test_greedy_completion_equals_bare_vllm(gateway: SlowLiveServer) -> None:
    engine = engine_of(gateway)
    body = {"prompt": "The cat sat on", "max_tokens": 12, "temperature": 0}
    with gateway.client(gateway.keys["generate"]) as c:
        r = c.post("/v1/completions", json={"model": "wide@production"} | body)
    assert r.status_code == 200, r.text
    ours = r.json()
    with bare_vllm(engine) as v:
        theirs = v.post("/v1/completions", json={"model": engine.process.served_name} | body)
    assert theirs.status_code == 200, theirs.text
    assert ours["choices"][0]["text"] == theirs.json()["choices"][0]["text"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [ours["usage"][k] for k in counts] == [theirs.json()["usage"][k] for k in counts]
    assert ours["model"] == "wide@1"
    assert ours["choices"][0]["finish_reason"] == theirs.json()["choices"][0]["finish_reason"]


def test_streamed_completion_is_the_same_text_and_is_logged(
    gateway: SlowLiveServer, vllm_ws: Workspace
) -> None:
    body = {"model": "wide", "prompt": "Rain fell on", "max_tokens": 10, "temperature": 0}
    with gateway.client(gateway.keys["client"]) as c:
        whole = c.post("/v1/completions", json=body).json()
        with c.stream(
            "POST",
            "/v1/completions",
            json=body | {"stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            assert r.status_code == 200
            request_id = r.headers["X-Request-Id"]
            events = sse_events(r)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == whole["choices"][0]["text"]
    assert events[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 10
    # the request log row, which feedback links to by this id
    row = wait_for_request_row(vllm_ws, request_id)
    assert row.status == 200 and row.model_version == 1
    assert row.completion_tokens == 10 and row.endpoint == "completions"
    with gateway.client(gateway.keys["client"]) as c:
        fb = c.post("/v1/feedback", json={"response_id": request_id, "rating": 1})
    assert fb.status_code in (200, 201), fb.text


def test_chat_streamed_and_not(gateway: SlowLiveServer) -> None:
    body = {
        "model": "wide@production",
        "messages": [{"role": "user", "content": "Hello there! How are you?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with gateway.client(gateway.keys["generate"]) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            assert s.status_code == 200
            events = sse_events(s)
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert streamed == message["content"]
    assert r.json()["usage"]["completion_tokens"] == 8


def test_usage_is_recorded_per_key(gateway: SlowLiveServer, vllm_ws: Workspace) -> None:
    from genloop.security.keys import create_key

    key = create_key(vllm_ws.catalog, name="usage-probe", scopes=["generate"]).plaintext
    with gateway.client(key) as c:
        r = c.post("/v1/completions", json={"model": "wide", "prompt": "A bird", "max_tokens": 5})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    with gateway.client(gateway.keys["admin"]) as a:
        while True:
            usage = a.get("/v1/admin/usage", params={"by": "key,model"}).json()
            mine = [u for u in usage["summary"] if u["key_name"] == "usage-probe"]
            if mine and mine[0]["requests"] == 1:
                break
            assert time.monotonic() < deadline, usage
            time.sleep(0.05)
    assert mine[0]["model"] == "wide"
    assert mine[0]["completion_tokens"] == 5
    assert mine[0]["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]


def test_echo_with_logprobs_scores_the_prompt_as_the_native_engine_does(
    gateway: SlowLiveServer, vllm_ws: Workspace
) -> None:
    """lm-evaluation-harness's loglikelihood request (a batch of token-id prompts, echo,
    logprobs 1, max_tokens 1) and a score-only one (max_tokens 0) through the gateway: the
    prompt's entries are bare vLLM's, and within fp32 rounding a Hugging Face forward's
    log_softmax, which is what the native engine returns (tests/serve/test_prompt_logprobs)."""
    import torch

    from genloop.models.pretrained import load_pretrained
    from genloop.workspace import registry

    engine = engine_of(gateway)
    prompts = [engine.encode("The cat sat on the mat."), engine.encode("Rain fell on")]
    body = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    with gateway.client(gateway.keys["generate"]) as c:
        r = c.post("/v1/completions", json={"model": "wide", "prompt": prompts} | body)
        only = c.post(
            "/v1/completions",
            json={"model": "wide", "prompt": prompts[0]} | body | {"max_tokens": 0, "logprobs": 2},
        )
    assert r.status_code == 200 and only.status_code == 200, r.text + only.text
    with bare_vllm(engine) as v:
        theirs = v.post(
            "/v1/completions",
            json={"model": engine.process.served_name, "prompt": prompts[0]} | body,
        ).json()["choices"][0]["logprobs"]
    model = load_pretrained(
        vllm_ws.store.open_verified(
            registry.resolve(vllm_ws, f"wide@{engine.model_version}").artifact
        )
    )
    choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
    for prompt, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1 == len(lp["tokens"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
        with torch.inference_mode():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        got = torch.tensor(lp["token_logprobs"][1 : len(prompt)])
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    first = choices[0]["logprobs"]
    assert first["token_logprobs"] == pytest.approx(theirs["token_logprobs"], abs=1e-6)
    scored = only.json()
    assert scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["text"] == engine.tokenizer.decode(prompts[0])
    lp = scored["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompts[0])  # the prompt alone
    assert lp["token_logprobs"] == pytest.approx(first["token_logprobs"][:-1], abs=1e-5)
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])


def test_json_schema_is_followed_by_vllm(gateway: SlowLiveServer) -> None:
    """The same grammar as on the native engine, through vLLM's guidance backend: an
    untrained model's answer is the schema's JSON (every value bounded, so it ends
    within max_tokens without genloop's closing rule, which vLLM does not have)."""
    schema = {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"},
        },
        "required": ["city", "n", "ok"],
        "additionalProperties": False,
    }
    body = {
        "model": "wide",
        "messages": [{"role": "user", "content": "A city as JSON."}],
        "max_tokens": 64,
        "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    }
    with gateway.client(gateway.keys["generate"]) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    doc = json.loads(choice["message"]["content"])
    assert doc["city"] in ("Paris", "Rome") and 0 <= doc["n"] <= 99
    assert isinstance(doc["ok"], bool)


def test_a_key_is_needed(gateway: SlowLiveServer) -> None:
    with gateway.client() as c:
        r = c.post("/v1/completions", json={"model": "wide", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_vllm_refusal_arrives_in_genloop_shape(gateway: SlowLiveServer) -> None:
    """A request that passes genloop's checks but that vLLM refuses (here: submitted to the
    engine directly, past the gateway's context check) is a 400 with vLLM's message."""
    import asyncio

    from genloop.serve.engine.types import GenerationRequest, SamplingParams
    from genloop.serve.errors import ApiError

    engine = engine_of(gateway)

    async def run() -> None:
        stream = engine.submit(
            GenerationRequest("too-long", [1, 2, 3], SamplingParams(max_tokens=10_000))
        )
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()

    loop = gateway.state.extras["loading"].get_loop()  # the server's event loop
    future = asyncio.run_coroutine_threadsafe(run(), loop)
    with pytest.raises(ApiError) as caught:
        future.result(timeout=60)
    assert caught.value.http_status == 400
    assert "max_tokens" in str(caught.value) and caught.value.param == "max_tokens"
    assert engine.stats().running == 0  # its place was given back


def test_bad_input_is_refused_before_vllm(gateway: SlowLiveServer) -> None:
    with gateway.client(gateway.keys["generate"]) as c:
        r = c.post(
            "/v1/completions",
            json={"model": "wide", "prompt": "x", "max_tokens": 2, "num_beams": 2},
        )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == "num_beams"


# ---------------------------------------------------------------------------- lifecycle


def test_promotion_swaps_to_a_new_vllm_process_while_the_old_one_serves(
    gateway: SlowLiveServer,
) -> None:
    """Promoting wide@2 starts its own vLLM process; while it starts (a minute on CPU),
    requests go on to wide@1, a stream running at the promotion finishes there, and once
    the new process answers traffic moves to it and the old process is stopped."""
    old = engine_of(gateway)
    old_pid = old.process.pid
    assert old_pid is not None
    body = {"model": "wide@production", "prompt": "The cat", "max_tokens": 8, "temperature": 0}
    with gateway.client(gateway.keys["generate"]) as c:
        before = c.post("/v1/completions", json=body).json()
    assert before["model"] == "wide@1"

    running, lines = stream_in_background(gateway, body | {"max_tokens": 48, "stream": True})
    with gateway.client(gateway.keys["admin"]) as a:
        r = a.post("/v1/admin/models/wide/promote", json={"version": 2, "reason": "test"})
        assert r.status_code == 200, r.text
    with gateway.client(gateway.keys["generate"]) as c:
        during = c.post("/v1/completions", json=body, timeout=60)
        assert during.status_code == 200, during.text
        assert during.json()["model"] == "wide@1"  # served by the old version meanwhile
        deadline = time.monotonic() + STARTUP_S
        while engine_of(gateway) is old:
            assert time.monotonic() < deadline, "wide@2 never took over"
            time.sleep(1.0)
        after = c.post("/v1/completions", json=body).json()
    running.join(60)
    assert after["model"] == "wide@2"
    assert after["choices"][0]["text"] != before["choices"][0]["text"]  # other weights
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" and {c["model"] for c in chunks} == {"wide@1"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 60
    while gateway.state.models._retired:
        assert time.monotonic() < deadline, "the old vLLM was never stopped"
        time.sleep(0.2)
    assert old.process.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(old_pid, 0)


def test_killed_process_is_restarted(gateway: SlowLiveServer) -> None:
    engine = engine_of(gateway)
    old_pid = engine.process.pid
    assert old_pid is not None
    os.killpg(old_pid, signal.SIGKILL)
    body = {"model": "wide", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with gateway.client(gateway.keys["generate"]) as c:
        down = c.post("/v1/completions", json=body)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["type"] == "service_unavailable"
        assert "Retry-After" in down.headers
        deadline = time.monotonic() + STARTUP_S
        while engine.restarts < 1:
            assert time.monotonic() < deadline, "vLLM was not restarted"
            time.sleep(1.0)
        assert engine.process.pid != old_pid
        up = c.post("/v1/completions", json=body)
    assert up.status_code == 200, up.text
    with pytest.raises(ProcessLookupError):
        os.killpg(old_pid, 0)  # nothing of the old process group is left


def test_closing_the_server_stops_vllm(gateway: SlowLiveServer) -> None:
    """Runs last: stopping the server lets a running request finish, then stops vLLM and
    leaves no process of it behind."""
    engine = engine_of(gateway)
    pid = engine.process.pid
    assert pid is not None
    body = {"model": "wide", "prompt": "The dog", "max_tokens": 40, "stream": True}
    running, lines = stream_in_background(
        gateway, body | {"stream_options": {"include_usage": True}}
    )
    gateway.__exit__(None, None, None)
    running.join(60)
    assert lines[-1] == "data: [DONE]"  # the running request finished
    usage = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]["usage"]
    assert usage["completion_tokens"] == 40
    assert engine.process.pid is None  # stopped by the server's shutdown
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # and nothing of its process group is left


# ---------------------------------------------------------------------------- no vLLM


def test_missing_vllm_environment_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genloop.serve.engine.vllm import VllmNotInstalled, require_vllm_python

    monkeypatch.setenv("GENLOOP_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(VllmNotInstalled, match=INSTALL_COMMAND):
        require_vllm_python()

"""``/v1/embeddings`` on a live server: the official ``openai`` client (float and base64,
``dimensions``, token arrays) against vectors computed directly, batching of concurrent
requests, bad input, models of the wrong kind, and keys, usage, logs, limits and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from genloop.models.embeddings import Embedder, load_embedder
from genloop.workspace import Workspace, init_workspace

from ..tiny_encoders import build_bert, encoder_tokenizer
from .conftest import LiveServer, make_keys, running_server, serve_config, wait_for_request_row

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]
TEXTS = ["which cat", "a spoon here", "the dog ran to the park", "owl"]
MAX_INPUTS, MAX_TOKENS, CONTEXT = 8, 120, 32


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> Iterator[Workspace]:
    """``enc`` (a tiny BERT, masked_lm) and ``tiny`` (a causal LM) in one workspace."""
    from genloop.workspace import registry

    root = tmp_path_factory.mktemp("emb")
    bert = build_bert(root / "bert", encoder_tokenizer(root / "tok"), context=CONTEXT)
    ws = init_workspace(root / "ws")
    registry.register_model(ws, "enc", "masked_lm", bert)
    registry.register_model(ws, "tiny", "causal_lm", model_dirs[0])
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def server(ws: Workspace) -> Iterator[LiveServer]:
    keys = make_keys(ws)
    from genloop.security.keys import create_key

    keys["hog"] = create_key(ws.catalog, name="hog", scopes=["generate"]).plaintext
    cfg = serve_config(
        models=["enc", "tiny"],
        max_embedding_inputs=MAX_INPUTS,
        max_embedding_tokens=MAX_TOKENS,
        embedding_batch_wait_ms=100,
        rate_limit={"tokens_per_min": 1000},
    )
    with running_server(ws, cfg, keys) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client"], max_retries=0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def embedder(ws: Workspace) -> Embedder:
    from genloop.workspace import registry

    return load_embedder(registry.artifact_path(ws, "enc"))


def vectors(response: Any) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_the_openai_client_gets_the_vectors_embed_computes(
    client: openai.OpenAI, embedder: Embedder
) -> None:
    want = embedder.embed(TEXTS)
    assert want.shape == (4, 32) and np.allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
    floats = client.embeddings.create(model="enc", input=TEXTS, encoding_format="float")
    b64 = client.embeddings.create(model="enc", input=TEXTS)  # the client asks for base64
    for r in (floats, b64):
        assert r.object == "list" and r.model == "enc@1"
        assert [d.index for d in r.data] == [0, 1, 2, 3]
        assert all(d.object == "embedding" for d in r.data)
        assert np.allclose(vectors(r), want, atol=1e-5)
        tokens = sum(len(ids) for ids in embedder.token_ids(TEXTS))
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    assert np.array_equal(vectors(floats), vectors(b64))  # float32 both ways, bit for bit
    one = client.embeddings.create(model="enc", input=TEXTS[2], encoding_format="float")
    assert len(one.data) == 1 and np.allclose(vectors(one)[0], want[2], atol=1e-5)


def test_dimensions_truncate_and_renormalise(client: openai.OpenAI, embedder: Embedder) -> None:
    full = embedder.embed(TEXTS)
    r = client.embeddings.create(model="enc", input=TEXTS, dimensions=8)
    got = vectors(r)
    assert got.shape == (4, 8)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(embedder.embed(TEXTS, dimensions=8), want, atol=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="enc", input="owl", dimensions=33)
    assert err.value.body["param"] == "dimensions" and "32" in err.value.body["message"]


def test_token_arrays_embed_as_their_texts(client: openai.OpenAI, embedder: Embedder) -> None:
    ids = embedder.token_ids(TEXTS[:2])
    want = embedder.embed(TEXTS[:2])
    one = client.embeddings.create(model="enc", input=ids[0], encoding_format="float")
    several = client.embeddings.create(model="enc", input=ids, encoding_format="float")
    assert np.allclose(vectors(one)[0], want[0], atol=1e-5)
    assert np.allclose(vectors(several), want, atol=1e-5)
    assert several.usage.prompt_tokens == sum(len(x) for x in ids)


def test_concurrent_requests_share_forward_passes(server: LiveServer) -> None:
    engine = server.state.models.find("enc").current.embedding_engine()
    before = engine.stats()

    def one(i: int) -> int:
        with server.client(server.keys["generate"]) as c:
            r = c.post("/v1/embeddings", json={"model": "enc", "input": [TEXTS[i % 4], "owl"]})
            return r.status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8
    after = engine.stats()
    assert after.requests - before.requests == 8
    assert after.inputs - before.inputs == 16
    forwards = after.forwards - before.forwards
    assert forwards < 8, "each request had a forward of its own: nothing was batched"
    assert after.largest_batch > 2


def test_bad_input_is_a_400_and_too_much_a_413_naming_the_limit(server: LiveServer) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        with server.client(server.keys["generate"]) as c:
            return c.post("/v1/embeddings", json={"model": "enc"} | body)

    for empty in ("", [], [""], ["owl", ""], [[]]):
        r = post({"input": empty})
        assert r.status_code == 400, (empty, r.text)
        assert r.json()["error"]["param"] == "input" and "empty" in r.json()["error"]["message"]
    many = post({"input": ["owl"] * (MAX_INPUTS + 1)})
    assert many.status_code == 413
    assert f"at most {MAX_INPUTS}" in many.json()["error"]["message"]
    long = post({"input": [[7] * 25] * 6})  # 150 tokens, each input within the context
    assert long.status_code == 413, long.text
    assert f"at most {MAX_TOKENS}" in long.json()["error"]["message"]
    over = post({"input": [1] * (CONTEXT + 1)})
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    assert str(CONTEXT) in over.json()["error"]["message"]
    vocab = post({"input": [[5, 100_000]]})
    assert vocab.status_code == 400 and "vocabulary" in vocab.json()["error"]["message"]
    fmt = post({"input": "owl", "encoding_format": "int8"})
    assert fmt.status_code == 400 and fmt.json()["error"]["param"] == "encoding_format"
    assert post({"input": [True, False]}).status_code == 400  # not token ids 1 and 0
    with server.client(server.keys["generate"]) as c:
        lone = c.post(
            "/v1/embeddings",
            content=b'{"model": "enc", "input": ["owl", "\\ud800"]}',
            headers={"content-type": "application/json"},
        )
    assert lone.status_code == 400 and "input[1] is not valid Unicode" in lone.text


def test_models_of_the_wrong_kind_are_refused_naming_the_fix(
    client: openai.OpenAI, server: LiveServer
) -> None:
    with pytest.raises(openai.BadRequestError) as emb:
        client.embeddings.create(model="tiny", input="owl")
    message = emb.value.body["message"]
    assert "causal_lm" in message and "masked_lm" in message
    assert emb.value.body["code"] == "model_cannot_embed"
    with pytest.raises(openai.BadRequestError) as cmpl:
        client.completions.create(model="enc", prompt="owl", max_tokens=2)
    assert "/v1/embeddings" in cmpl.value.body["message"]
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="enc", messages=[{"role": "user", "content": "x"}])
    assert "/v1/embeddings" in chat.value.body["message"]
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed["enc"]["kind"] == "embedding" and listed["enc"]["family"] == "masked_lm"


def test_keys_scopes_usage_logs_rate_limits_and_metrics_apply(
    server: LiveServer, ws: Workspace
) -> None:
    body = {"model": "enc", "input": ["which owl", "a lamp here"], "user": "ann"}
    with server.client() as c:
        assert c.post("/v1/embeddings", json=body).status_code == 401
    with server.client(server.keys["feedback"]) as c:
        assert c.post("/v1/embeddings", json=body).status_code == 403
    with server.client(server.keys["generate"]) as c:
        ok = c.post("/v1/embeddings", json=body)
    assert ok.status_code == 200
    row = wait_for_request_row(ws, ok.headers["X-Request-Id"])
    assert row.endpoint == "embeddings" and row.status == 200 and row.user_id == "ann"
    assert row.prompt_tokens == ok.json()["usage"]["prompt_tokens"] > 0
    assert "which owl" not in str(row.params)  # the text is only kept encrypted
    hog = {"model": "enc", "input": [[7] * 30] * 4}  # 120 tokens; the budget: 1000 a minute
    with server.client(server.keys["hog"]) as c:
        codes = [c.post("/v1/embeddings", json=hog).status_code]
        while codes[-1] == 200 and len(codes) < 25:
            codes.append(c.post("/v1/embeddings", json=hog).status_code)
    assert codes[0] == 200 and codes[-1] == 429 and len(codes) > 5
    with server.client(server.keys["admin"]) as c:
        metrics = c.get("/metrics").text
    assert 'requests_total{model_name="enc",model_version="1",status="200"}' in metrics
    assert 'requests_total{model_name="enc",model_version="1",status="413"}' in metrics
    assert 'prompt_tokens_total{model_name="enc",model_version="1"}' in metrics


def test_the_engine_splits_big_requests_and_drops_abandoned_ones(embedder: Embedder) -> None:
    import asyncio

    from genloop.serve.engine.embedder import EmbeddingEngine
    from genloop.serve.engine.types import EngineBusy, EngineStopped

    ids = embedder.token_ids(TEXTS * 2)  # 8 inputs
    want = embedder.embed(TEXTS * 2)

    async def main() -> None:
        engine = EmbeddingEngine(
            embedder, "enc", 1, max_batch_inputs=3, max_batch_tokens=1000, max_queue=1
        )
        await engine.start()
        assert np.allclose(await engine.embed(ids), want, atol=1e-5)
        stats = engine.stats()
        assert (stats.forwards, stats.largest_batch, stats.inputs) == (3, 3, 8)
        longest = max(len(x) for x in ids)
        engine.max_batch_tokens = 2 * longest  # at most two inputs of that length a forward
        assert np.allclose(await engine.embed(ids), want, atol=1e-5)
        assert engine.stats().forwards - stats.forwards >= 4

        engine.batch_wait_s = 0.2  # the next forward waits: cancel the request meanwhile
        before = engine.stats()
        task = asyncio.create_task(engine.embed(ids))
        await asyncio.sleep(0.02)
        with pytest.raises(EngineBusy):  # max_queue 1: one request waits already
            await engine.embed(ids[:1])
        task.cancel()
        await asyncio.sleep(0.3)
        after = engine.stats()
        assert after.inputs == before.inputs and after.waiting == 0  # dropped, not embedded
        await engine.drain(1.0)
        with pytest.raises(EngineStopped):
            await engine.embed(ids)

    asyncio.run(main())

"""An ONNX variant served by onnxruntime: the engine, the HTTP API and ``genloop generate``.

The model is a tiny grouped-query Llama (2 layers, 64 wide, 4 query heads sharing 2
key/value heads) on the session's BPE tokenizer, its weights drawn wide so that greedy text
varies from token to token. It is registered as ``wide@1`` and ``genloop optimize``'s own
code exports it (``optimize_model(..., export="onnx")``, which calls ``export_onnx`` and
verifies the graph) as ``wide@2``. In fp32 the ONNX engine's greedy tokens are the PyTorch
engine's on the parent, alone and inside a batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from genloop.config import OptimizeConfig, ServeConfig
from genloop.errors import GenloopError
from genloop.serve.engine.engine import Engine, collect
from genloop.serve.engine.loader import load_engine
from genloop.serve.engine.onnx_runner import OnnxRunner
from genloop.serve.engine.runner import Chunk
from genloop.serve.engine.types import GenerationRequest, SamplingParams
from genloop.workspace import Workspace, registry

from .conftest import build_wide_llama, make_keys, make_workspace, running_server, serve_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "The cat sat on the mat.",
    "def add(a, b):",
    "Rain",
    "Hello there! How are you today? I am fine, thank you very much. The dog ran",
]
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def ws(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> Iterator[Workspace]:
    """The serve tests' workspace plus ``wide@1`` (PyTorch) and ``wide@2`` (its ONNX export)."""
    from genloop.optimize.run import optimize_model

    root = tmp_path_factory.mktemp("onnx")
    workspace = make_workspace(root / "ws", model_dirs)
    source = build_wide_llama(root / "wide", model_dirs[0])
    registry.register_model(workspace, "wide", "causal_lm", source)
    result = optimize_model(workspace, "wide@1", OptimizeConfig(export="onnx"))
    assert [v.ref for v in result.variants] == ["wide@2"]
    yield workspace
    workspace.close()


def artifact(ws: Workspace, ref: str) -> Path:
    return ws.store.open_verified(registry.resolve(ws, ref).artifact)


def engine_for(path: Path, **serve: Any) -> Engine:
    cfg = ServeConfig(**({"device": "cpu", "max_batch_size": 4, "max_queue": 8} | serve))
    return load_engine(path, model_name="wide", model_version=None, cfg=cfg)


async def greedy_one_by_one(eng: Engine, prompts: list[list[int]]) -> list[Any]:
    """Each prompt's (token ids, Finished), one request after another."""
    await eng.start()
    try:
        out = []
        for i, prompt in enumerate(prompts):
            deltas, finished = await collect(eng.submit(GenerationRequest(f"r{i}", prompt, GREEDY)))
            out.append(([d.token_id for d in deltas], finished))
        return out
    finally:
        await eng.close()


@pytest.fixture(scope="module")
def reference(ws: Workspace) -> list[Any]:
    """The PyTorch engine's greedy (token ids, Finished) for each prompt, on the parent."""
    eng = engine_for(artifact(ws, "wide@1"))
    assert eng.runner.kind == "native"
    prompts = [eng.encode(p) for p in PROMPTS]
    return list(asyncio.run(greedy_one_by_one(eng, prompts)))


# --------------------------------------------------------------------------- runner


def test_batched_decode_gives_each_sequence_its_logits_alone(ws: Workspace) -> None:
    """Three sequences of different lengths decode in one call (the shorter ones with a
    masked gap before the new token) and get the logits each gets decoding alone."""
    from genloop.optimize.onnx import load_onnx_lm

    lm = load_onnx_lm(artifact(ws, "wide@2"), threads=1)
    prompts = [[5, 9, 30, 41, 7, 7, 60], [11, 12], [90, 3, 3, 101]]
    nxt = [17, 23, 29]
    together = OnnxRunner(lm, n_slots=4, max_len=32)
    for slot, p in enumerate(prompts):  # slots 1..3: slot 0 stays empty
        together.step([Chunk(slot + 1, p, 0, True)], [], [], [])
    for _ in range(3):  # each step feeds back the argmax of the one before
        batched = together.step([], [1, 2, 3], nxt, [len(p) for p in prompts])
        assert batched is not None and batched.shape == (3, lm.vocab_size)
        for i, p in enumerate(prompts):
            alone = OnnxRunner(lm, n_slots=1, max_len=32)
            for start in range(0, len(p), 3):  # prefilled in chunks of 3
                alone.step([Chunk(0, p[start : start + 3], start, False)], [], [], [])
            row = alone.step([], [0], [nxt[i]], [len(p)])
            assert row is not None
            torch.testing.assert_close(batched[i], row[0], atol=1e-5, rtol=1e-5)
        prompts = [[*p, t] for p, t in zip(prompts, nxt, strict=True)]
        nxt = [int(t) for t in batched.argmax(-1)]


# --------------------------------------------------------------------------- engine


def test_greedy_equals_the_pytorch_engine_alone(ws: Workspace, reference: list[Any]) -> None:
    eng = engine_for(artifact(ws, "wide@2"))
    assert eng.runner.kind == "onnx" and eng.model is None
    assert eng.context_length == 128 and eng.eos_token_ids
    prompts = [eng.encode(p) for p in PROMPTS]
    got = asyncio.run(greedy_one_by_one(eng, prompts))
    for prompt, (tokens, finished), (want, _) in zip(PROMPTS, got, reference, strict=True):
        assert tokens == want, prompt
        assert finished.reason == "length" and finished.completion_tokens == MAX_TOKENS
    assert len({tuple(t) for t, _ in reference}) == len(PROMPTS)  # not one repeated token
    assert all(len(set(t)) > 2 for t, _ in reference)


def test_greedy_equals_the_pytorch_engine_inside_a_busy_batch(
    ws: Workspace, reference: list[Any]
) -> None:
    """The four prompts (four lengths) with two sampled requests, six requests on four
    slots: sequences join as others finish (the last slot's cache moves into the freed
    one), long prompts are prefilled in chunks of 8 beside the decode rows."""
    eng = engine_for(artifact(ws, "wide@2"), max_batch_size=4)
    eng.scheduler.prefill_chunk, eng.scheduler.prefill_budget = 8, 12
    prompts = [eng.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(PROMPTS)

    async def main() -> list[Any]:
        await eng.start()
        sampled = [
            GenerationRequest(
                f"noise{i}",
                prompts[i + 1],
                SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True),
            )
            for i, n in enumerate((3, 20))
        ]
        greedy = [GenerationRequest(f"g{i}", p, GREEDY) for i, p in enumerate(prompts)]
        results = await asyncio.gather(*(collect(eng.submit(r)) for r in sampled + greedy))
        await eng.close()
        assert [f.completion_tokens for _, f in results[:2]] == [3, 20]
        return results[2:]

    got = asyncio.run(main())
    for prompt, (deltas, finished), (want, ref) in zip(PROMPTS, got, reference, strict=True):
        assert [d.token_id for d in deltas] == want, prompt
        assert finished.text == ref.text
    assert eng.steps < 3 + 20 + len(PROMPTS) * MAX_TOKENS  # the least one after another


def test_prompt_logprobs_equal_the_pytorch_engines(ws: Workspace) -> None:
    """echo with logprobs on the ONNX variant: the prompt's scores (every position's logits
    of the same forward) are the PyTorch engine's on the parent, in chunks and whole."""
    from genloop.serve.engine.types import PromptLogprobs

    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=3)

    async def scores(eng: Engine, prompt: list[int], chunk: int | None) -> PromptLogprobs:
        await eng.start()
        if chunk is not None:
            eng.scheduler.prefill_chunk = chunk
        try:
            events = [e async for e in eng.submit(GenerationRequest("s", prompt, params))]
        finally:
            await eng.close()
        return next(e for e in events if isinstance(e, PromptLogprobs))

    torch_eng = engine_for(artifact(ws, "wide@1"))
    prompt = torch_eng.encode(PROMPTS[3])
    want = asyncio.run(scores(torch_eng, prompt, None))
    for chunk in (None, 5):
        got = asyncio.run(scores(engine_for(artifact(ws, "wide@2")), prompt, chunk))
        assert got.logprobs[0] is None and len(got.logprobs) == len(prompt)
        assert got.logprobs[1:] == pytest.approx(want.logprobs[1:], abs=1e-4)
        assert list(got.top_logprobs[1]) == list(want.top_logprobs[1])  # type: ignore[arg-type]


def test_beam_search_is_refused_clearly(ws: Workspace) -> None:
    eng = engine_for(artifact(ws, "wide@2"))
    request = GenerationRequest("b", [5, 6, 7], SamplingParams(max_tokens=4, num_beams=2))

    async def main() -> None:
        eng.submit(request)

    with pytest.raises(GenloopError, match=r"beam search .* onnx runner"):
        asyncio.run(main())


def test_forcing_the_wrong_runner_is_a_clear_error(ws: Workspace) -> None:
    with pytest.raises(GenloopError, match="ONNX variant: it runs on the onnx runner"):
        load_engine(
            artifact(ws, "wide@2"),
            model_name="wide",
            model_version=2,
            cfg=ServeConfig(device="cpu"),
            runner="native",
        )
    with pytest.raises(GenloopError, match="needs an ONNX variant"):
        load_engine(
            artifact(ws, "wide@1"),
            model_name="wide",
            model_version=1,
            cfg=ServeConfig(device="cpu"),
            runner="onnx",
        )


# ----------------------------------------------------------------- HTTP and the CLI


def sse_texts(r: httpx.Response) -> tuple[str, list[Any]]:
    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def test_the_server_serves_the_onnx_variant(ws: Workspace, reference: list[Any]) -> None:
    keys = make_keys(ws)
    cfg = serve_config(models=["wide@2"], max_batch_size=4)
    with running_server(ws, cfg, keys) as server, server.client(keys["client"]) as c:
        body = {"model": "wide", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        text = data["choices"][0]["text"]
        assert text == reference[0][1].text
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
            assert s.status_code == 200
            streamed, chunks = sse_texts(s)
        assert streamed == text and len(chunks) > 2
        beams = c.post("/v1/completions", json=body | {"num_beams": 2})
        assert beams.status_code == 400, beams.text
        assert "beam search" in beams.json()["error"]["message"]
        assert "num_beams 1" in beams.json()["error"]["message"]


def test_genloop_generate_runs_the_onnx_variant(
    ws: Workspace, reference: list[Any], genloop_cli: Any
) -> None:
    settings = ("-p", PROMPTS[1], "--temperature", "0", "--max-tokens", str(MAX_TOKENS))
    ran = genloop_cli(ws.root, "generate", "wide@2", *settings, "--json")
    assert ran.returncode == 0, ran.output
    data = json.loads(ran.stdout)
    assert (data["model"], data["version"]) == ("wide", 2)
    (choice,) = data["choices"]
    assert choice["text"] == reference[1][1].text
    streamed = genloop_cli(ws.root, "generate", "wide@2", *settings)
    assert streamed.returncode == 0, streamed.output
    assert streamed.stdout == choice["text"] + "\n"
    by_dir = genloop_cli(ws.root, "generate", artifact(ws, "wide@2"), *settings, "--json")
    assert by_dir.returncode == 0, by_dir.output
    assert json.loads(by_dir.stdout)["choices"] == [choice]
    sampled = genloop_cli(
        ws.root, "generate", "wide@2", "-p", "x", "-n", "3", "--seed", "1", "--json"
    )
    assert sampled.returncode == 0, sampled.output
    assert len({c["text"] for c in json.loads(sampled.stdout)["choices"]}) == 3

"""Prompt log-probabilities in the engine (``SamplingParams.prompt_logprobs``): the values are
a Hugging Face forward's fp32 ``log_softmax``, alone, in chunks and inside a busy batch, and
the requests around them decode exactly as they would without them.

Models: the session's tiny Llama (``conftest.model_dirs``) and the grouped-query, wide-drawn
variant ``build_wide_llama`` makes (its logits spread enough that a wrong row shows).
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

from genloop.errors import GenloopError
from genloop.serve.engine.engine import Engine
from genloop.serve.engine.types import (
    Finished,
    GenerationRequest,
    PromptLogprobs,
    SamplingParams,
    TokenDelta,
)
from genloop.workspace import Workspace

from .conftest import LiveServer, build_wide_llama, make_keys, running_server, serve_config
from .test_engine import PROMPTS, engine_for, hf_greedy, hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
SCORE = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=5)


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]) -> Path:
    return build_wide_llama(tmp_path_factory.mktemp("gqa") / "gqa", model_dirs[0])


def hf_prompt_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of a Hugging Face forward over the whole prompt, fp32: (T, V)."""
    model, _ = hf_model(path)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_against_hf(path: Path, ids: list[int], scored: PromptLogprobs, k: int) -> None:
    ref = hf_prompt_logprobs(path, ids)
    assert len(scored.logprobs) == len(ids) == len(scored.top_logprobs)
    assert scored.logprobs[0] is None and scored.top_logprobs[0] is None
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(scored.logprobs[1:])
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    for i, top in enumerate(scored.top_logprobs[1:]):
        assert top is not None and 1 <= len(top) <= k  # texts that collide keep the best
        best = ref[i].topk(k).values
        assert max(top.values()) == pytest.approx(best[0].item(), abs=TOL)
        # every value reported is one of the k best, best first
        assert all(any(abs(v - b) < TOL for b in best.tolist()) for v in top.values())


async def read_all(stream: Any) -> list[Any]:
    return [e async for e in stream]


async def events_of(engine: Engine, request: GenerationRequest) -> list[Any]:
    return await read_all(engine.submit(request))


def split(events: list[Any]) -> tuple[PromptLogprobs | None, list[TokenDelta], Finished]:
    """(the PromptLogprobs event, the token deltas, Finished), checking their order."""
    scored = [e for e in events if isinstance(e, PromptLogprobs)]
    assert len(scored) <= 1
    if scored:
        assert events[0] is scored[0]  # before any token
    assert isinstance(events[-1], Finished)
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    return (scored[0] if scored else None), deltas, events[-1]


@pytest.mark.parametrize(("which", "runner"), [("llama", "auto"), ("gqa", "auto"), ("gqa", "hf")])
def test_prompt_logprobs_equal_a_hf_forward_alone(
    which: str, runner: str, model_dirs: tuple[Path, Path], gqa_llama: Path
) -> None:
    path = model_dirs[0] if which == "llama" else gqa_llama
    eng = engine_for(path, runner=runner)
    assert eng.runner.kind == ("native" if runner == "auto" else "hf")
    ids = [eng.encode(p) for p in PROMPTS]

    async def main() -> list[list[Any]]:
        await eng.start()
        try:
            return [
                await events_of(eng, GenerationRequest(f"s{i}", p, SCORE))
                for i, p in enumerate(ids)
            ]
        finally:
            await eng.close()

    for prompt, events in zip(ids, asyncio.run(main()), strict=True):
        scored, deltas, finished = split(events)
        assert scored is not None and deltas == []  # max_tokens 0: scored, nothing generated
        assert finished.reason == "length" and finished.completion_tokens == 0
        assert finished.prompt_tokens == len(prompt)
        check_against_hf(path, prompt, scored, SCORE.prompt_logprobs or 0)


def test_prompt_logprobs_inside_a_busy_batch_disturb_nothing(gqa_llama: Path) -> None:
    """Scored prompts (cut into chunks of 8, with and without generation after them) share
    steps with sampled noise and greedy requests: the scores are the HF forward's, and every
    greedy request, the scored-and-generating one included, gives HF generate's tokens."""
    eng = engine_for(gqa_llama, max_batch_size=6, max_queue=16)
    eng.scheduler.prefill_chunk, eng.scheduler.prefill_budget = 8, 12
    ids = [eng.encode(p) for p in PROMPTS]
    long_prompt = ids[3] + ids[0]  # several chunks
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    score_and_go = SamplingParams(max_tokens=10, temperature=0.0, prompt_logprobs=0, logprobs=0)

    async def main() -> dict[str, list[Any]]:
        await eng.start()
        requests = [
            GenerationRequest(
                f"noise{i}",
                ids[(i + 1) % 4] * (1 + i % 2),
                SamplingParams(max_tokens=6 + 5 * i, temperature=1.0, seed=i, ignore_eos=True),
            )
            for i in range(3)
        ]
        requests += [
            GenerationRequest("g0", ids[0], greedy),
            GenerationRequest("g3", ids[3], greedy),
        ]
        streams = {r.request_id: eng.submit(r) for r in requests}
        await asyncio.sleep(0.02)  # the scored ones arrive while the batch decodes
        streams["s_long"] = eng.submit(GenerationRequest("s_long", long_prompt, SCORE))
        streams["s_go"] = eng.submit(GenerationRequest("s_go", ids[1], score_and_go))
        streams["s_one"] = eng.submit(GenerationRequest("s_one", ids[2][:1], SCORE))
        out = dict(
            zip(
                streams,
                await asyncio.gather(*(read_all(s) for s in streams.values())),
                strict=True,
            )
        )
        await eng.close()
        return out

    got = asyncio.run(main())
    for name, prompt in (("g0", ids[0]), ("g3", ids[3])):
        scored, deltas, _ = split(got[name])
        assert scored is None
        assert [d.token_id for d in deltas] == hf_greedy(gqa_llama, prompt, greedy.max_tokens)
    for i in range(3):
        assert split(got[f"noise{i}"])[2].reason == "length"

    scored, deltas, finished = split(got["s_long"])
    assert scored is not None and not deltas and finished.reason == "length"
    check_against_hf(gqa_llama, long_prompt, scored, SCORE.prompt_logprobs or 0)

    scored, deltas, _ = split(got["s_go"])
    assert scored is not None and all(t is None for t in scored.top_logprobs)  # k = 0
    ref = hf_prompt_logprobs(gqa_llama, ids[1])
    want = ref[torch.arange(len(ids[1]) - 1), torch.tensor(ids[1][1:])]
    torch.testing.assert_close(torch.tensor(scored.logprobs[1:]), want, atol=TOL, rtol=0)
    tokens = [d.token_id for d in deltas]
    assert tokens == hf_greedy(gqa_llama, ids[1], score_and_go.max_tokens)
    # the first generated token is scored from the prompt's last row, as a prompt token is
    assert deltas[0].logprob == pytest.approx(ref[-1, tokens[0]].item(), abs=TOL)

    scored, deltas, _ = split(got["s_one"])  # a one-token prompt: just the first None
    assert scored is not None and scored.logprobs == [None] and not deltas
    assert eng.steps > greedy.max_tokens  # they really shared steps


def test_bad_prompt_logprob_requests_are_clear_errors(
    gqa_llama: Path, tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    eng = engine_for(gqa_llama)
    ids = eng.encode(PROMPTS[0])
    bad = {
        "max_tokens must be at least 1": SamplingParams(max_tokens=0),
        "logprobs must be in [0, 20]": SamplingParams(max_tokens=0, prompt_logprobs=21),
        "need num_beams 1": SamplingParams(max_tokens=4, prompt_logprobs=1, num_beams=2),
    }

    async def main() -> None:
        for message, params in bad.items():
            with pytest.raises(GenloopError, match=message.replace("[", r"\[")):
                eng.submit(GenerationRequest("bad", ids, params))

    asyncio.run(main())

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.family import get_family
    from genloop.models.pretrained import save_hf_dir

    tok = load_hf_tokenizer(model_dirs[0])
    t5 = get_family("seq2seq").build(
        {"preset": "tiny", "vocab_size": len(tok), "n_layer": 1, "n_embd": 32, "n_head": 2}
    )
    t5_eng = engine_for(
        save_hf_dir(t5, tmp_path / "t5", family="seq2seq", tokenizer_dir=model_dirs[0])
    )

    async def seq2seq() -> None:
        with pytest.raises(GenloopError, match="encoder-decoder"):
            t5_eng.submit(GenerationRequest("t5", ids, SCORE))

    asyncio.run(seq2seq())


# ------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(module_ws: Workspace) -> Iterator[LiveServer]:
    with running_server(module_ws, serve_config(), make_keys(module_ws)) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(server.keys["generate"]) as c:
        yield c


def tokenizer_of(server: LiveServer) -> Any:
    return server.state.models.served[0].current.engine.tokenizer


def test_echo_with_logprobs_scores_a_text_prompt(
    http: httpx.Client, server: LiveServer, model_dirs: tuple[Path, Path]
) -> None:
    prompt = "The cat sat on the mat."
    r = http.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    ids = tokenizer_of(server)(prompt)["input_ids"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == prompt
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = hf_prompt_logprobs(model_dirs[0], ids)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, atol=TOL, rtol=0)
    for i, top in enumerate(lp["top_logprobs"][1:]):
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(ref[i].max().item(), abs=TOL)


def test_batched_token_prompts_score_the_prompt_then_the_generated_token(
    http: httpx.Client, server: LiveServer
) -> None:
    """What lm-evaluation-harness's local-completions sends for loglikelihood requests: a
    batch of token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0. Each choice
    lists its prompt's entries, then the one generated token's; the scores are those of the
    same prompt sent alone."""
    tok = tokenizer_of(server)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    body = {"model": "tiny", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    r = http.post("/v1/completions", json=body | {"prompt": prompts, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for prompt, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + 1  # the prompt, then the token
        generated = lp["top_logprobs"][-1]
        assert len(generated) == 1 and lp["token_logprobs"][-1] == max(generated.values())
        assert choice["text"].startswith(tok.decode(prompt))
        alone = http.post("/v1/completions", json=body | {"prompt": prompt, "max_tokens": 0})
        assert alone.json()["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            lp["token_logprobs"][:-1], abs=TOL
        )
        # lm-eval's is_greedy: a token equal to the best of its top-1 is the argmax
        for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert value <= max(top.values()) + 1e-6


def test_streamed_echo_with_logprobs_sends_the_scored_prompt_first(
    http: httpx.Client, server: LiveServer
) -> None:
    body = {
        "model": "tiny",
        "prompt": "Rain fell on the quiet town",
        "echo": True,
        "logprobs": 2,
        "max_tokens": 4,
        "temperature": 0,
    }
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    chunks = []
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    first = chunks[0]
    assert first["text"] == body["prompt"] and first["logprobs"]["token_logprobs"][0] is None
    streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    assert streamed == whole["logprobs"]["token_logprobs"]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_the_openai_client_gets_prompt_logprobs(server: LiveServer) -> None:
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.keys["generate"]) as client:
        out = client.completions.create(
            model="tiny", prompt="Hello there!", echo=True, logprobs=2, max_tokens=0
        )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert out.choices[0].text == "Hello there!"
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == out.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs", "less than or equal to 20"),
        ({"logprobs": 1, "max_tokens": 0}, "max_tokens", "max_tokens 0 generates nothing"),
        ({"echo": True, "max_tokens": 0}, "max_tokens", "max_tokens 0 generates nothing"),
        ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"echo": True, "logprobs": 1, "num_beams": 2}, "echo", "needs num_beams 1"),
    ],
)
def test_bad_prompt_logprob_requests_are_400s(
    http: httpx.Client, extra: dict[str, Any], param: str, message: str
) -> None:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "The cat"} | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]

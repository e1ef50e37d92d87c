"""Prompt log-probabilities in the engine (``SamplingParams.prompt_logprobs``): the values are
a Hugging Face forward's fp32 ``log_softmax``, alone, in chunks and inside a busy batch, and
the requests around them decode exactly as they would without them.

Models: the session's tiny Llama (``conftest.model_dirs``) and the grouped-query, wide-drawn
variant ``build_wide_llama`` makes (its logits spread enough that a wrong row shows).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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

from .conftest import build_wide_llama
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
        requests += [GenerationRequest("g0", ids[0], greedy), GenerationRequest("g3", ids[3], greedy)]
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
    t5_eng = engine_for(save_hf_dir(t5, tmp_path / "t5", family="seq2seq", tokenizer_dir=model_dirs[0]))

    async def seq2seq() -> None:
        with pytest.raises(GenloopError, match="encoder-decoder"):
            t5_eng.submit(GenerationRequest("t5", ids, SCORE))

    asyncio.run(seq2seq())

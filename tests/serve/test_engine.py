"""The engine on a real tiny model: exactness against Hugging Face ``generate``, continuous
batching, cancellation, the bounded queue, deadlines, drain, sampling and text.

Models are the session's tiny Llama (``conftest.model_dirs``: 2 layers, 32 wide, random
weights, a 320-token BPE) plus a grouped-query variant and a tiny T5 built here.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.config import ServeConfig
from genloop.errors import GenloopError
from genloop.serve.engine import load_engine
from genloop.serve.engine.engine import Engine, collect
from genloop.serve.engine.protocol import TextEngine
from genloop.serve.engine.types import (
    EngineBusy,
    EngineStopped,
    Finished,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)

from .conftest import build_wide_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "The cat sat on the mat.",
    "def add(a, b):",
    "Rain",
    "Hello there! How are you today? I am fine, thank you very much. The dog ran",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def engine_for(path: Path, **serve: Any) -> Engine:
    runner = serve.pop("runner", "auto")
    from genloop.serve.engine.loader import load_engine as load

    cfg = ServeConfig(**({"device": "cpu", "max_batch_size": 4, "max_queue": 8} | serve))
    return load(path, model_name=path.name, model_version=1, cfg=cfg, runner=runner)


@functools.cache
def hf_model(path: Path) -> tuple[Any, Any]:
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import load_pretrained

    return load_pretrained(path), load_hf_tokenizer(path)


def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face generate's greedy continuation, the reference."""
    model, tok = hf_model(path)
    encoder_decoder = bool(model.config.is_encoder_decoder)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, 1:].tolist() if encoder_decoder else out[0, len(prompt_ids) :].tolist()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def complete(engine: Engine, request: GenerationRequest) -> tuple[list[TokenDelta], Finished]:
    return await collect(engine.submit(request))


async def generate(engine: Engine, request: GenerationRequest) -> tuple[list[int], Finished]:
    deltas, finished = await complete(engine, request)
    return [d.token_id for d in deltas], finished


@pytest.fixture(scope="module")
def llama(model_dirs: tuple[Path, Path]) -> Path:
    return model_dirs[0]


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]) -> Path:
    """``build_wide_llama`` (grouped-query, weights drawn wide), untied."""
    out = tmp_path_factory.mktemp("gqa") / "gqa"
    return build_wide_llama(out, model_dirs[0], tie_embeddings=False)


@pytest.fixture(scope="module")
def engine(gqa_llama: Path) -> Iterator[Engine]:
    eng = engine_for(gqa_llama)
    yield eng
    run(eng.close())


# ------------------------------------------------------------------- exactness


@pytest.mark.parametrize("which", ["llama", "gqa_llama"])
def test_greedy_equals_hf_generate_alone(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    eng = engine_for(path)
    assert eng.runner.kind == "native" and isinstance(eng, TextEngine)

    async def main() -> list[list[int]]:
        await eng.start()
        out = []
        for i, prompt in enumerate(PROMPTS):
            tokens, finished = await generate(
                eng, GenerationRequest(f"r{i}", eng.encode(prompt), GREEDY)
            )
            assert finished.completion_tokens == len(tokens)
            out.append(tokens)
        await eng.close()
        return out

    got = run(main())
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == hf_greedy(path, eng.encode(prompt), GREEDY.max_tokens), prompt


def test_greedy_equals_hf_generate_inside_a_busy_batch(gqa_llama: Path) -> None:
    """Greedy requests join and leave a batch full of sampled ones of other lengths; long
    prompts are prefilled in chunks of 8 tokens, in the same forward as the decode rows."""
    eng = engine_for(gqa_llama, max_batch_size=4, max_queue=16)
    eng.scheduler.prefill_chunk, eng.scheduler.prefill_budget = 8, 12
    ids = [eng.encode(p) for p in PROMPTS]

    async def main() -> dict[str, list[int]]:
        await eng.start()
        noise = [
            eng.submit(
                GenerationRequest(
                    f"noise{i}",
                    ids[(i + 1) % 4] * (1 + i % 3),
                    SamplingParams(max_tokens=5 + 7 * i, temperature=1.0, seed=i, ignore_eos=True),
                )
            )
            for i in range(4)
        ]
        first = [eng.submit(GenerationRequest("g0", ids[0], GREEDY))]
        await asyncio.sleep(0.05)  # later ones arrive while the batch is decoding
        later = [eng.submit(GenerationRequest(f"g{i}", ids[i], GREEDY)) for i in (1, 2, 3)]
        results = await asyncio.gather(*(collect(s) for s in noise + first + later))
        await eng.close()
        names = [f"noise{i}" for i in range(4)] + ["g0", "g1", "g2", "g3"]
        assert all(f.reason == "length" for _, f in results[:4])
        return {n: [d.token_id for d in r[0]] for n, r in zip(names, results, strict=True)}

    got = run(main())
    for i in range(4):
        assert got[f"g{i}"] == hf_greedy(gqa_llama, ids[i], GREEDY.max_tokens), PROMPTS[i]
    assert eng.steps > GREEDY.max_tokens  # they really shared steps, not one after another


def test_generic_runner_equals_hf_generate(gqa_llama: Path) -> None:
    eng = engine_for(gqa_llama, runner="hf")
    assert eng.runner.kind == "hf"
    ids = [eng.encode(p) for p in PROMPTS[:3]]

    async def main() -> list[list[int]]:
        await eng.start()
        streams = [eng.submit(GenerationRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(ids)]
        out = [[d.token_id for d in (await collect(s))[0]] for s in streams]
        await eng.close()
        return out

    for prompt, tokens in zip(ids, run(main()), strict=True):
        assert tokens == hf_greedy(gqa_llama, prompt, GREEDY.max_tokens)


@pytest.fixture(scope="module")
def int8_llamas(tmp_path_factory: pytest.TempPathFactory, gqa_llama: Path) -> dict[str, Path]:
    """``gqa_llama`` quantized to int8 (``genloop optimize --quantize int8``), both modes."""
    from genloop.models.pretrained import load_pretrained
    from genloop.optimize.quantize import quantize_model, save_quantized

    out = {}
    for mode in ("dynamic", "weight_only"):
        model = load_pretrained(gqa_llama)
        description = quantize_model(model, "int8", mode)  # type: ignore[arg-type]
        directory = tmp_path_factory.mktemp(f"int8-{mode}") / "q"
        out[mode] = save_quantized(model, directory, description, tokenizer_dir=gqa_llama)
    return out


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int8_variants_take_the_fast_path_and_equal_hf_generate(
    int8_llamas: dict[str, Path], mode: str
) -> None:
    """An int8 variant runs on the batched fast path (its q/k/v and gate/up int8 layers
    fused, exactly), and greedy decoding alone gives the int8 model's own ``generate``
    tokens. Weight-only int8 has no per-batch activation scale, so it does inside a busy
    batch too; dynamic int8 scales activations per step over the whole batch (fbgemm's
    kernel), so there a batch may round differently and only the shape is checked."""
    path = int8_llamas[mode]
    eng = engine_for(path, max_batch_size=4, max_queue=16)
    assert eng.runner.kind == "native"
    ids = [eng.encode(p) for p in PROMPTS]

    async def alone() -> list[list[int]]:
        await eng.start()
        return [
            (await generate(eng, GenerationRequest(f"a{i}", p, GREEDY)))[0]
            for i, p in enumerate(ids)
        ]

    async def together() -> list[list[int]]:
        streams = [eng.submit(GenerationRequest(f"b{i}", p, GREEDY)) for i, p in enumerate(ids)]
        out = [[d.token_id for d in (await collect(s))[0]] for s in streams]
        await eng.close()
        return out

    solo = run(alone())
    batched = run(together())
    for prompt, tokens, in_batch in zip(ids, solo, batched, strict=True):
        assert tokens == hf_greedy(path, prompt, GREEDY.max_tokens)
        assert len(in_batch) == GREEDY.max_tokens or in_batch[-1] in eng.eos_token_ids
        if mode == "weight_only":
            assert in_batch == tokens


def test_seq2seq_runs_on_the_generic_runner(tmp_path: Path, model_dirs: tuple[Path, Path]) -> None:
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.family import get_family
    from genloop.models.pretrained import save_hf_dir

    tok = load_hf_tokenizer(model_dirs[0])
    torch.manual_seed(0)
    t5 = get_family("seq2seq").build(
        {"preset": "tiny", "vocab_size": len(tok), "n_layer": 2, "n_embd": 32, "n_head": 2}
    )
    path = save_hf_dir(t5, tmp_path / "t5", family="seq2seq", tokenizer_dir=model_dirs[0])
    eng = engine_for(path)
    assert eng.runner.kind == "hf"
    prompt = eng.encode(PROMPTS[0])

    async def main() -> list[int]:
        await eng.start()
        tokens, _ = await generate(
            eng, GenerationRequest("t5", prompt, SamplingParams(max_tokens=12, temperature=0))
        )
        await eng.close()
        return tokens

    assert run(main()) == hf_greedy(path, prompt, 12)


def test_beam_search_equals_hf_beam_search(gqa_llama: Path, engine: Engine) -> None:
    from genloop.models.pretrained import load_pretrained

    prompt = engine.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=10, num_beams=3)
    tokens, finished = run(generate(engine, GenerationRequest("beam", prompt, params)))
    model = load_pretrained(gqa_llama)
    with torch.inference_mode():
        ref = model.generate(
            torch.tensor([prompt]),
            num_beams=3,
            max_new_tokens=10,
            do_sample=False,
            early_stopping=True,
            eos_token_id=engine.eos_token_id,
            pad_token_id=engine.tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
    assert tokens == ref
    assert finished.completion_tokens == len(ref)


# ------------------------------------------------------- cancel, queue, deadlines


class StepRecorder:
    """An EngineObserver noting, at each finish, the engine step count and the reason."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.finished: dict[str, tuple[int, str]] = {}
        self.calls: list[str] = []

    def on_queued(self, model: str, version: int | None) -> None:
        self.calls.append("queued")

    def on_scheduled(self, model: str, version: int | None, queue_s: float) -> None:
        self.calls.append("scheduled")

    def on_first_token(self, model: str, version: int | None, ttft_s: float) -> None:
        self.calls.append("first_token")

    def on_token(self, model: str, version: int | None, gap_s: float) -> None:
        self.calls.append("token")

    def on_finished(
        self, model: str, version: int | None, finished: Finished, e2e_s: float
    ) -> None:
        assert self.engine is not None
        self.calls.append("finished")
        self.finished[f"#{len(self.finished)}"] = (self.engine.steps, finished.reason)


def long_request(name: str, prompt: list[int], **kw: Any) -> GenerationRequest:
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    return GenerationRequest(name, prompt, params, **kw)


def test_closing_the_stream_frees_the_slot_within_one_step(llama: Path) -> None:
    eng = engine_for(llama, max_batch_size=2)
    recorder = StepRecorder()
    eng.observer, recorder.engine = recorder, eng
    prompt = eng.encode(PROMPTS[0])

    async def main() -> None:
        await eng.start()
        other = eng.submit(long_request("other", prompt))
        victim = eng.submit(long_request("victim", prompt))
        waiting = eng.submit(long_request("waiting", prompt))  # no slot until one frees
        seen = 0
        async for event in victim:
            assert isinstance(event, TokenDelta)
            seen += 1
            if seen == 3:
                break
        assert eng.stats().running == 2 and eng.stats().waiting == 1
        steps_at_close = eng.steps
        await victim.aclose()
        deadline = time.monotonic() + 10
        while "#0" not in recorder.finished and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        step, reason = recorder.finished["#0"]
        assert reason == "cancelled"
        assert step <= steps_at_close + 1  # dropped before the next step ran the model
        # the freed slot went to the waiting request, which now produces tokens
        event = await waiting.__anext__()
        assert isinstance(event, TokenDelta)
        assert eng.stats().running == 2 and eng.stats().waiting == 0
        await other.aclose()
        await waiting.aclose()
        await eng.close()

    run(main())
    assert recorder.calls[0] == "queued" and recorder.calls.count("queued") == 3
    assert recorder.calls.count("scheduled") == 3 and recorder.calls.count("finished") == 3
    assert {"first_token", "token"} <= set(recorder.calls)


def test_cancelling_the_consuming_task_cancels_the_request(engine: Engine) -> None:
    prompt = engine.encode(PROMPTS[2])

    async def main() -> None:
        stream = engine.submit(long_request("task", prompt))
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                started.set()

        task = asyncio.create_task(consume())
        # cancel while tokens flow (a fixed sleep raced the 200 tokens on a fast machine)
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 10
        while engine.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        assert engine.stats().running == 0 and engine.stats().waiting == 0

    run(main())


def test_a_stream_dropped_unread_is_cancelled(engine: Engine) -> None:
    prompt = engine.encode(PROMPTS[1])

    async def main() -> None:
        stream = engine.submit(long_request("dropped", prompt))
        assert isinstance(await stream.__anext__(), TokenDelta)
        del stream  # never closed, never read to the end
        gc.collect()
        deadline = time.monotonic() + 10
        while engine.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        assert engine.stats().running == 0

    run(main())


def test_queue_overflow_gives_exactly_the_expected_number_of_busy_errors(llama: Path) -> None:
    eng = engine_for(llama, max_batch_size=2, max_queue=3)
    prompt = eng.encode(PROMPTS[0])

    async def main() -> None:
        await eng.start()
        accepted, busy = [], []
        for i in range(9):  # 2 running + 3 waiting fit; 4 do not
            try:
                accepted.append(eng.submit(long_request(f"q{i}", prompt)))
            except EngineBusy as exc:
                busy.append(exc)
        assert len(accepted) == 5 and len(busy) == 4
        assert all(e.http_status == 429 and e.retry_after_s >= 1 for e in busy)
        stats = eng.stats()
        assert stats.running + stats.waiting == 5 and stats.max_queue == 3
        for stream in accepted:
            await stream.aclose()
        deadline = time.monotonic() + 10
        while eng.stats().running + eng.stats().waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        accepted.append(eng.submit(long_request("after", prompt)))  # room again
        await accepted[-1].aclose()
        await eng.close()

    run(main())


class SlowTokens(StepRecorder):
    """Makes every decode step take at least 5 ms (it runs on the engine thread)."""

    def on_token(self, model: str, version: int | None, gap_s: float) -> None:
        time.sleep(0.005)


def test_request_deadlines_finish_as_timeout(gqa_llama: Path) -> None:
    eng = engine_for(gqa_llama)
    eng.observer = SlowTokens()
    prompt = eng.encode(PROMPTS[0])
    room = eng.context_length - len(prompt)

    async def main() -> None:
        late = long_request("late", prompt, deadline=time.monotonic() + 0.3)
        late.params = SamplingParams(max_tokens=room, temperature=0, ignore_eos=True)
        tokens, finished = await generate(eng, late)  # room × 5 ms > 0.3 s
        assert finished.reason == "timeout"
        assert len(tokens) < room and finished.completion_tokens == len(tokens)
        # a request whose deadline passes while it waits never reaches the model
        expired = long_request("expired", prompt, deadline=time.monotonic() - 1)
        tokens, finished = await generate(eng, expired)
        assert finished.reason == "timeout" and tokens == []
        await eng.close()

    run(main())


def test_drain_finishes_short_work_and_aborts_long_work_by_the_deadline(llama: Path) -> None:
    eng = engine_for(llama, max_batch_size=4)
    eng.observer = SlowTokens()  # 200 tokens take a second at least: past the drain deadline
    prompt = eng.encode(PROMPTS[0])

    async def main() -> None:
        await eng.start()
        short = eng.submit(
            GenerationRequest("short", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
        )
        long = eng.submit(long_request("long", prompt))
        beam = eng.submit(
            GenerationRequest("beam", prompt, SamplingParams(max_tokens=200, num_beams=2))
        )
        short_task = asyncio.create_task(collect(short))
        long_task = asyncio.create_task(collect(long))
        beam_task = asyncio.create_task(collect(beam))
        await asyncio.sleep(0.02)
        start = time.monotonic()
        await eng.drain(0.3)
        elapsed = time.monotonic() - start
        assert elapsed < 0.3 + 3.0  # the deadline, plus one step and a thread join
        _, short_done = await short_task
        assert short_done.reason == "length" and short_done.completion_tokens == 3
        _, long_done = await long_task
        assert long_done.reason == "cancelled" and long_done.error
        assert 0 < long_done.completion_tokens < 200
        _, beam_done = await beam_task
        assert beam_done.reason in ("cancelled", "length")
        with pytest.raises(EngineStopped) as info:
            eng.submit(long_request("too-late", prompt))
        assert info.value.http_status == 503
        assert not eng._thread or not eng._thread.is_alive()

    run(main())


# ------------------------------------------------------------ sampling and text


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: Engine) -> None:
    prompt = engine.encode(PROMPTS[3])
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234)

    async def main() -> tuple[list[int], list[int], list[int]]:
        alone, _ = await generate(engine, GenerationRequest("s1", prompt, params))
        streams = [
            engine.submit(GenerationRequest(f"n{i}", prompt[i:], SamplingParams(temperature=1.0)))
            for i in range(3)
        ]
        again, _ = await generate(engine, GenerationRequest("s2", prompt, params))
        for s in streams:
            await s.aclose()
        other, _ = await generate(
            engine,
            GenerationRequest("s3", prompt, SamplingParams(**{**params.__dict__, "seed": 99})),
        )
        return alone, again, other

    alone, again, other = run(main())
    assert alone == again
    assert alone != other


def test_top_k_one_is_greedy_and_logprobs_are_the_models(engine: Engine, gqa_llama: Path) -> None:
    prompt = engine.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=6, temperature=5.0, top_k=1, logprobs=3)
    deltas, _ = run(complete(engine, GenerationRequest("k1", prompt, params)))
    assert [d.token_id for d in deltas] == hf_greedy(gqa_llama, prompt, 6)
    nucleus = SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6)  # the best token only
    tokens, _ = run(generate(engine, GenerationRequest("p0", prompt, nucleus)))
    assert tokens == hf_greedy(gqa_llama, prompt, 6)
    from genloop.models.pretrained import load_pretrained

    model = load_pretrained(gqa_llama)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)
    first = deltas[0]
    assert first.logprob == pytest.approx(expected[first.token_id].item(), abs=1e-4)
    assert first.top_logprobs is not None and len(first.top_logprobs) <= 3
    best = max(first.top_logprobs.values())
    assert best == pytest.approx(expected.max().item(), abs=1e-4)


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(engine: Engine) -> None:
    prompt = engine.encode(PROMPTS[0])
    free, _ = run(
        complete(
            engine,
            (GenerationRequest("free", prompt, SamplingParams(max_tokens=20, temperature=0))),
        )
    )
    text = "".join(d.text for d in free)
    assert len(text) > 4
    stop = text[2:4]  # a stop string that appears inside the greedy text
    params = SamplingParams(max_tokens=20, temperature=0, stop=(stop,))
    deltas, finished = run(complete(engine, (GenerationRequest("stop", prompt, params))))
    assert finished.reason == "stop"
    assert finished.text == text[: text.index(stop)]
    assert "".join(d.text for d in deltas) == finished.text
    assert stop not in "".join(d.text for d in deltas)


def test_stop_token_ids_and_eos(engine: Engine) -> None:
    prompt = engine.encode(PROMPTS[1])
    free, _ = run(
        complete(
            engine, (GenerationRequest("f", prompt, SamplingParams(max_tokens=8, temperature=0)))
        )
    )
    third = free[2].token_id
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(third,))
    deltas, finished = run(complete(engine, (GenerationRequest("t", prompt, params))))
    first_hit = [d.token_id for d in free].index(third)
    assert finished.reason == "stop" and len(deltas) == first_hit + 1
    assert deltas[-1].text == ""  # the stop token adds no text


def test_requests_from_two_event_loops_in_two_threads(engine: Engine) -> None:
    """The handoff works whichever loop (uvicorn's, a CLI's) submits."""
    prompt = engine.encode(PROMPTS[2])
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        results[i] = run(
            complete(
                engine,
                (
                    GenerationRequest(
                        f"loop{i}", prompt, SamplingParams(max_tokens=10, temperature=0)
                    )
                ),
            )
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    texts = {i: r[1].text for i, r in results.items()}
    assert len(texts) == 2 and texts[0] == texts[1]


def test_bad_requests_are_clear_errors(engine: Engine) -> None:
    ok = engine.encode("Hi")

    async def submit(ids: list[int], **params: Any) -> None:
        engine.submit(GenerationRequest("bad", ids, SamplingParams(**params)))

    cases: list[tuple[list[int], dict[str, Any], str]] = [
        ([], {}, "empty"),
        ([1] * engine.context_length, {}, "at most"),
        ([10_000], {}, "token ids"),
        (ok, {"max_tokens": 0}, "max_tokens"),
        (ok, {"temperature": -1.0}, "temperature"),
        (ok, {"top_p": 0.0}, "top_p"),
        (ok, {"top_k": 0}, "top_k"),
        (ok, {"logprobs": 50}, "logprobs"),
        (ok, {"num_beams": 0}, "num_beams"),
    ]
    for ids, params, words in cases:
        with pytest.raises(GenloopError, match=words):
            run(submit(ids, **params))


def test_tokenizer_services(engine: Engine) -> None:
    assert engine.encode("") == [engine.tokenizer.bos_token_id]
    ids = engine.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    assert engine.tokenizer.decode(ids).endswith("<|assistant|>\n")
    template = engine.tokenizer.chat_template
    try:
        engine.tokenizer.chat_template = None
        with pytest.raises(GenloopError, match="no chat template"):
            engine.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    finally:
        engine.tokenizer.chat_template = template
    assert engine.context_length == 128 and engine.eos_token_id == engine.tokenizer.eos_token_id


def test_load_engine_refuses_image_models_and_missing_dirs(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "genloop.json").write_text('{"family": "diffusion"}')
    cfg = ServeConfig(device="cpu")
    with pytest.raises(GenloopError, match="image model"):
        load_engine(tmp_path / "img", model_name="img", model_version=1, cfg=cfg)
    with pytest.raises(GenloopError, match="not a model directory"):
        load_engine(tmp_path / "nothing", model_name="x", model_version=None, cfg=cfg)


def test_the_kv_cache_is_sized_within_its_budget(gqa_llama: Path) -> None:
    """serve.kv_cache_bytes caps the slots, and the cache the runner allocates is the size
    the plan states; a budget under one sequence is a clear error naming the settings."""
    from genloop.serve.engine.kv_cache import plan_cache

    # 2 layers × 2 (keys, values) × 2 kv heads × head dim 16 × 4 bytes, 128 positions a slot
    per_slot = 2 * 2 * 2 * 16 * 4 * 128
    roomy = engine_for(gqa_llama, max_batch_size=4)
    assert roomy.cache_plan is not None and roomy.cache_plan.slots == 4
    assert roomy.runner.cache.nbytes == roomy.cache_plan.nbytes == 4 * per_slot  # type: ignore[attr-defined]

    capped = engine_for(gqa_llama, max_batch_size=64, kv_cache_bytes=2**20)
    assert capped.cache_plan is not None
    assert capped.max_batch_size == capped.runner.n_slots == 2**20 // per_slot == 16
    assert "serve.max_batch_size 64 would need 4.0 MiB" in capped.cache_plan.describe()

    with pytest.raises(GenloopError, match=r"raise serve\.kv_cache_bytes"):
        plan_cache(position_bytes=512, positions=128, max_batch_size=4, budget=per_slot - 1)

"""lm-evaluation-harness itself (``lm_eval.simple_evaluate``, model ``local-completions``)
against a real ``genloop serve`` on loopback, on local tasks written here (a task YAML and
JSONL data in tmp; nothing from the hub).

- multiple choice (loglikelihood): the harness sends batches of token-id prompts with echo
  and logprobs and sums each continuation's log-probabilities; its per-choice values and its
  accuracy must be what genloop's engine computes on the same items directly (the sum of the
  continuation's prompt log-probabilities per choice, argmax);
- generate_until: its greedy generations must be the engine's, so an exact_match whose
  targets are the engine's own text for half the items is exactly 0.5.

The model is the session's tiny Llama; its random weights make the choices' scores differ.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genloop.serve.engine.engine import collect
from genloop.serve.engine.types import GenerationRequest, PromptLogprobs, SamplingParams
from genloop.workspace import Workspace

from .conftest import LiveServer, make_keys, running_server, serve_config

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is a dev dependency (pip install -e .[dev])"
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MC_ITEMS = [
    ("The cat sat on the", ["mat", "tree", "river"], 0),
    ("The dog ran in the", ["park", "night", "town"], 0),
    ("A bird sang in the", ["mat", "tree", "rain"], 1),
    ("Rain fell on the quiet", ["town", "cat", "print"], 0),
    ("Hello there! How are", ["you", "we", "the"], 0),
    ("def add(a, b):\n    return a", ["+ b", "- b", "* b"], 0),
    ("I am fine, thank", ["you", "the", "dog"], 0),
    ("The river rose slowly through the", ["night", "park", "mat"], 0),
]
GEN_PROMPTS = ["The cat sat", "Hello there!", "Rain fell on", "def add(a, b):", "A bird"]
MAX_GEN = 6


@pytest.fixture(scope="module")
def server(module_ws: Workspace) -> Iterator[LiveServer]:
    cfg = serve_config(max_n=8)
    with running_server(module_ws, cfg, make_keys(module_ws)) as s:
        yield s


def engine_of(server: LiveServer) -> Any:
    return server.state.models.served[0].current.engine


def engine_scores(server: LiveServer, prompts: list[list[int]]) -> list[list[float | None]]:
    """Each prompt's log-probabilities straight from the served engine (echo + logprobs 0,
    max_tokens 0), on an event loop of this thread."""
    engine = engine_of(server)
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)

    async def main() -> list[list[float | None]]:
        out = []
        for i, ids in enumerate(prompts):
            stream = engine.submit(GenerationRequest(f"ref-{i}", ids, params))
            events = [e async for e in stream]
            scored = [e for e in events if isinstance(e, PromptLogprobs)]
            out.append(scored[0].logprobs)
        return out

    return asyncio.run(main())


def engine_greedy(server: LiveServer, prompts: list[list[int]]) -> list[str]:
    engine = engine_of(server)
    params = SamplingParams(max_tokens=MAX_GEN, temperature=0.0, stop=("\n",))

    async def main() -> list[str]:
        return [
            (await collect(engine.submit(GenerationRequest(f"gen-{i}", ids, params))))[1].text
            for i, ids in enumerate(prompts)
        ]

    return asyncio.run(main())


def write_task(root: Path, name: str, rows: list[dict[str, Any]], spec: str) -> Path:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml_path = root / f"{name}.yaml"
    yaml_path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n" + spec,
        encoding="utf-8",
    )
    return yaml_path


MC_SPEC = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_SPEC = f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def run_harness(
    server: LiveServer, tasks: list[Path], monkeypatch: pytest.MonkeyPatch, **model_args: Any
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir = engine_of(server).tokenizer.name_or_path
    monkeypatch.setenv("OPENAI_API_KEY", server.keys["generate"])  # the harness's auth header
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {
        "model": "tiny",
        "base_url": f"{server.url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": model_dir,
        "batch_size": 4,
        "max_retries": 1,
    } | model_args
    results = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=[str(t) for t in tasks],
        task_manager=TaskManager(include_defaults=False),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert results is not None
    return results


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_multiple_choice_equals_the_engines_own_scores(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenized: bool
) -> None:
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in MC_ITEMS]
    task = write_task(tmp_path, "genloop_mc", rows, MC_SPEC)
    results = run_harness(server, [task], monkeypatch, tokenized_requests=tokenized)

    # genloop's own evaluation of the same items: lm-eval's split of context and
    # continuation (the whole text encoded, the context's tokens cut off), scored by the
    # engine, summed over the continuation, argmax over the choices
    tok = engine_of(server).tokenizer
    expected_ll: list[list[float]] = []
    correct = []
    for question, choices, answer in MC_ITEMS:
        context = tok(question, add_special_tokens=False).input_ids
        # the task's target_delimiter (a space) goes between the question and each choice
        wholes = [tok(f"{question} {c}", add_special_tokens=False).input_ids for c in choices]
        scores = engine_scores(server, wholes)
        sums = [sum(s[len(context) :]) for s in scores]  # type: ignore[arg-type]
        expected_ll.append(sums)
        correct.append(float(max(range(len(sums)), key=sums.__getitem__) == answer))
    accuracy = sum(correct) / len(correct)
    assert 0.0 < accuracy < 1.0 or len(set(correct)) == 1  # a random model: informative items

    got = results["results"]["genloop_mc"]["acc,none"]
    assert got == pytest.approx(accuracy, abs=1e-9)
    samples = sorted(results["samples"]["genloop_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_ITEMS)
    for sample, want in zip(samples, expected_ll, strict=True):
        lls = [resp[0][0] for resp in sample["resps"]]
        assert lls == pytest.approx(want, abs=1e-4)


def test_lm_eval_generate_until_gets_the_engines_greedy_text(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = engine_of(server).tokenizer
    texts = engine_greedy(server, [tok(p, add_special_tokens=False).input_ids for p in GEN_PROMPTS])
    assert len(set(texts)) > 1  # the model says different things to different prompts
    # the first three targets are the engine's own text, the others cannot be
    rows = [
        {"prompt": p, "target": t if i < 3 else t + " never"}
        for i, (p, t) in enumerate(zip(GEN_PROMPTS, texts, strict=True))
    ]
    task = write_task(tmp_path, "genloop_gen", rows, GEN_SPEC)
    results = run_harness(server, [task], monkeypatch)
    assert results["results"]["genloop_gen"]["exact_match,none"] == pytest.approx(3 / 5)
    samples = sorted(results["samples"]["genloop_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == texts

"""Batch inference through the engine: output lines, errors per item, and resuming after an
interruption (a cancelled run, a torn last line) with the same texts as an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from genloop.config import ServeConfig
from genloop.errors import GenloopError
from genloop.serve.batch import BatchItem, done_ids, item_seed, read_items, run_batch
from genloop.serve.engine import load_engine
from genloop.serve.engine.engine import Engine
from genloop.serve.engine.types import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = SamplingParams(max_tokens=12, temperature=0.8, seed=7)


@pytest.fixture(scope="module")
def engine(model_dirs: tuple[Path, Path]) -> Iterator[Engine]:
    cfg = ServeConfig(device="cpu", max_batch_size=4, max_queue=4)
    eng = load_engine(model_dirs[0], model_name="tiny", model_version=1, cfg=cfg)
    yield eng
    asyncio.run(eng.close())


def write_input(path: Path, count: int = 12) -> Path:
    lines = []
    for i in range(count):
        if i % 4 == 3:
            lines.append({"id": f"c{i}", "messages": [{"role": "user", "content": f"hi {i}"}]})
        else:
            lines.append({"id": f"p{i}", "prompt": f"The cat {i} sat", "metadata": {"k": i}})
    if count > 5:
        lines[5]["max_tokens"] = 3
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def read_output(path: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "an id was written twice"
    return by_id


def test_every_item_gets_one_line(engine: Engine, tmp_path: Path) -> None:
    items = read_items(write_input(tmp_path / "in.jsonl"))
    seen: list[tuple[int, int]] = []
    result = asyncio.run(
        run_batch(
            engine,
            items,
            tmp_path / "out.jsonl",
            params=PARAMS,
            progress=lambda d, t: seen.append((d, t)),
        )
    )
    out = read_output(tmp_path / "out.jsonl")
    assert set(out) == {item.id for item in items}
    assert result.generated == 12 and result.skipped == 0 and result.failed == 0
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)
    assert out["p5"]["completion_tokens"] <= 3 and out["p0"]["completion_tokens"] <= 12
    assert out["p0"]["metadata"] == {"k": 0} and "metadata" not in out["c3"]
    assert out["c3"]["prompt_tokens"] == len(
        engine.chat_prompt_ids([{"role": "user", "content": "hi 3"}])
    )
    assert result.completion_tokens == sum(r["completion_tokens"] for r in out.values())
    assert all(r["finish_reason"] in ("stop", "length") for r in out.values())


def test_resume_after_an_interruption_gives_the_uninterrupted_output(
    engine: Engine, tmp_path: Path
) -> None:
    items = read_items(write_input(tmp_path / "in.jsonl"))
    full = tmp_path / "full.jsonl"
    asyncio.run(run_batch(engine, items, full, params=PARAMS))

    part = tmp_path / "part.jsonl"

    async def interrupted() -> None:
        stop = asyncio.Event()

        def progress(done: int, total: int) -> None:
            if done >= 4:
                stop.set()

        task = asyncio.create_task(run_batch(engine, items, part, params=PARAMS, progress=progress))
        await stop.wait()
        task.cancel()  # what Ctrl-C does to asyncio.run's main task
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    written = read_output(part)
    assert 4 <= len(written) < len(items)
    deadline = time.monotonic() + 10  # the engine thread drops them at its next step
    while engine.stats().running + engine.stats().waiting and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().running == 0 and engine.stats().waiting == 0  # slots were freed
    with part.open("a", encoding="utf-8") as f:
        f.write('{"id": "p1", "text": "torn li')  # killed in the middle of a line
    result = asyncio.run(run_batch(engine, items, part, params=PARAMS))
    assert result.skipped == len(written) and result.generated == len(items) - len(written)
    resumed = read_output(part)
    assert resumed == read_output(full)  # same ids, same seeded texts


def test_a_refused_item_gets_an_error_and_the_run_goes_on(engine: Engine, tmp_path: Path) -> None:
    long_prompt = "word " * (engine.context_length * 2)
    items = [BatchItem("ok", prompt="The cat"), BatchItem("long", prompt=long_prompt)]
    items.append(BatchItem("hot", prompt="x", params={"temperature": -1.0}))
    result = asyncio.run(run_batch(engine, items, tmp_path / "o.jsonl", params=PARAMS))
    out = read_output(tmp_path / "o.jsonl")
    assert result.failed == 2 and "text" in out["ok"]
    assert "at most" in out["long"]["error"] and "temperature" in out["hot"]["error"]


def test_n_choices_and_per_item_seeds(engine: Engine, tmp_path: Path) -> None:
    items = [BatchItem("a", prompt="The cat"), BatchItem("b", prompt="The cat")]
    asyncio.run(run_batch(engine, items, tmp_path / "o.jsonl", params=PARAMS, n=3))
    out = read_output(tmp_path / "o.jsonl")
    texts = [c["text"] for c in out["a"]["choices"]]
    assert len(texts) == 3 and len(set(texts)) > 1  # different seeds per choice
    assert texts != [c["text"] for c in out["b"]["choices"]]  # the id is part of the seed
    assert item_seed(7, "a") == item_seed(7, "a") != item_seed(8, "a")


def test_input_mistakes_are_clear(tmp_path: Path) -> None:
    bad = {
        "not valid JSON": "{nope\n",
        "unknown key 'promt'": '{"promt": "x"}\n',
        "exactly one of prompt or messages": '{"id": 1}\n',
        "appears twice": '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n',
        "max_tokens must be an integer": '{"prompt": "a", "max_tokens": "5"}\n',
        "stop must be": '{"prompt": "a", "stop": 3}\n',
        "messages must be": '{"messages": "hi"}\n',
        "holds no prompts": "\n\n",
    }
    for words, text in bad.items():
        path = tmp_path / "in.jsonl"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(GenloopError, match=words):
            read_items(path)
    with pytest.raises(GenloopError, match="does not exist"):
        read_items(tmp_path / "missing.jsonl")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(GenloopError, match="not a line this command wrote"):
        done_ids(foreign)
    items = read_items(write_input(tmp_path / "ok.jsonl", 4))
    assert [i.id for i in items] == ["p0", "p1", "p2", "c3"]


def test_output_lines_survive_any_line_splitter(tmp_path: Path) -> None:
    """Generated text can hold U+2028 or NEL, which str.splitlines() takes for line ends."""
    from genloop.serve.batch import _write

    path = tmp_path / "o.jsonl"
    with path.open("w", encoding="utf-8") as out:
        _write(out, {"id": "a", "text": "one\u2028two\x85three\u2029"})
        _write(out, {"id": "b", "text": "plain"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["one\u2028two\x85three\u2029", "plain"]
    assert done_ids(path) == {"a", "b"}

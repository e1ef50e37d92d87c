"""Batch inference: a JSONL file of prompts through the engine at full batch, resumable.

Input, one JSON object per line::

    {"id": "q1", "prompt": "Once upon a time"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}

``id`` (default: the line number) names the item in the output and must be unique;
exactly one of ``prompt`` (plain text) or ``messages`` (rendered with the tokenizer's chat
template); optional per-item ``max_tokens``, ``temperature``, ``top_p``, ``top_k``,
``seed``, ``stop`` (a string or a list) override the run's settings; ``metadata`` (any
JSON) is copied to the output untouched.

Output, one line per item, in the order items finish::

    {"id": "q1", "text": "...", "finish_reason": "length", "prompt_tokens": 5,
     "completion_tokens": 32}

with ``n > 1``, ``choices`` (a list of ``{"text", "finish_reason", "completion_tokens"}``)
replaces the three choice fields; an item the engine refuses (a prompt longer than the
context, say) gets ``"error"`` instead, and the run goes on.

Resuming. Every line is flushed as soon as its item finishes. Running the same command
again reads the output first, drops a last line cut short by the interruption, and skips
every id already there. With a run ``seed``, each item's seed is derived from the seed and
its id, so a resumed run gives the same texts as an uninterrupted one would have.

Throughput. Up to ``max_batch_size + max_queue`` requests are kept in flight (never more,
so the engine never answers busy), which keeps every batch slot refilled the step after a
sequence finishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from genloop.errors import GenloopError
from genloop.serve.engine.types import EngineBusy, Finished, GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from genloop.serve.engine.protocol import TextEngine

ITEM_KEYS = ("id", "prompt", "messages", "metadata")
PARAM_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
MAX_LINE_BYTES = 4 * 1024 * 1024  # a longer input line is refused, not read into memory

Progress = Callable[[int, int], None]  # (items done, items in this run)


@dataclass
class BatchItem:
    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metadata: Any = None


@dataclass
class BatchResult:
    total: int  # items in the input
    skipped: int  # already in the output (a resumed run)
    generated: int  # written by this run
    failed: int  # of those, written with an "error"
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    output: Path

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "skipped": self.skipped,
            "generated": self.generated,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "output": str(self.output),
        }


# ------------------------------------------------------------------------- reading


def read_items(path: Path) -> list[BatchItem]:
    """Parse and check the whole input first: a bad line fails before any generation."""
    if not path.is_file():
        raise GenloopError(f"input file {path} does not exist")
    items: list[BatchItem] = []
    seen: set[str] = set()
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise GenloopError(f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            item = _parse_line(raw, f"{path}:{number}", default_id=str(number))
            if item.id in seen:
                raise GenloopError(f"{path}:{number}: id {item.id!r} appears twice")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise GenloopError(f"{path} holds no prompts")
    return items


def _parse_line(raw: bytes, where: str, default_id: str) -> BatchItem:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise GenloopError(f"{where}: expected a JSON object with a prompt")
    unknown = [k for k in obj if k not in ITEM_KEYS + PARAM_KEYS]
    if unknown:
        raise GenloopError(
            f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(ITEM_KEYS + PARAM_KEYS)})"
        )
    item_id = obj.get("id", default_id)
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
        raise GenloopError(f"{where}: id must be a non-empty string or an integer")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise GenloopError(f"{where}: give exactly one of prompt or messages")
    if prompt is not None and not isinstance(prompt, str):
        raise GenloopError(f"{where}: prompt must be a string")
    if messages is not None and not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
            for m in messages
        )
    ):
        raise GenloopError(f"{where}: messages must be a list of {{role, content}} objects")
    params = {k: obj[k] for k in PARAM_KEYS if k in obj}
    _check_params(params, where)
    return BatchItem(str(item_id), prompt, messages, params, obj.get("metadata"))


def _check_params(params: dict[str, Any], where: str) -> None:
    def number(key: str) -> None:
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GenloopError(f"{where}: {key} must be a number")

    for key in ("temperature", "top_p"):
        if key in params:
            number(key)
    for key in ("max_tokens", "top_k", "seed"):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], int)):
            raise GenloopError(f"{where}: {key} must be an integer")
    stop = params.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            params["stop"] = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            params["stop"] = tuple(stop)
        else:
            raise GenloopError(f"{where}: stop must be a string or a list of strings")


def done_ids(output: Path) -> set[str]:
    """Ids already in ``output``; a last line cut short by an interruption is removed."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    good = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    if good < len(data):
        with output.open("r+b") as f:
            f.truncate(good)
    ids: set[str] = set()
    for number, line in enumerate(data[:good].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise GenloopError(
                f"{output}:{number}: not a line this command wrote; use a new --output file"
            ) from None
    return ids


# ------------------------------------------------------------------------- running


def item_seed(run_seed: int, item_id: str) -> int:
    """A per-item seed from the run's seed and the item id (order-independent, stable)."""
    digest = hashlib.blake2b(f"{run_seed}:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


async def run_batch(
    engine: TextEngine,
    items: list[BatchItem],
    output: Path,
    *,
    params: SamplingParams,
    n: int = 1,
    progress: Progress | None = None,
) -> BatchResult:
    """Generate every item not yet in ``output`` and append one line per item to it."""
    if n < 1:
        raise GenloopError(f"n must be at least 1, not {n}")
    done = done_ids(output)
    todo = [item for item in items if item.id not in done]
    result = BatchResult(len(items), len(items) - len(todo), 0, 0, 0, 0, 0.0, output)
    if progress is not None:
        progress(0, len(todo))
    if not todo:
        return result
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    stats = engine.stats()
    capacity = asyncio.Semaphore(max(1, (stats.max_batch_size + stats.max_queue) // n))
    with output.open("a", encoding="utf-8") as out:

        async def one(item: BatchItem) -> None:
            async with capacity:
                line = await _generate(engine, item, params, n)
            _write(out, line)
            result.generated += 1
            result.failed += "error" in line
            result.prompt_tokens += int(line.get("prompt_tokens", 0))
            result.completion_tokens += sum(int(c) for c in _completion_counts(line))
            if progress is not None:
                progress(result.generated, len(todo))

        tasks = [asyncio.create_task(one(item)) for item in todo]
        try:
            await asyncio.gather(*tasks)
        finally:  # interrupted: cancel what is left (their streams close, slots free)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            result.seconds = time.monotonic() - start
    return result


def _completion_counts(line: dict[str, Any]) -> list[int]:
    if "choices" in line:
        return [c["completion_tokens"] for c in line["choices"]]
    return [line.get("completion_tokens", 0)]


async def _generate(
    engine: TextEngine, item: BatchItem, params: SamplingParams, n: int
) -> dict[str, Any]:
    from genloop.serve.engine.engine import collect

    line: dict[str, Any] = {"id": item.id}
    if item.metadata is not None:
        line["metadata"] = item.metadata
    try:
        if item.messages is not None:
            prompt_ids = engine.chat_prompt_ids(item.messages)
        else:
            prompt_ids = engine.encode(item.prompt or "")
        own = replace(params, **item.params)
        if "seed" not in item.params and params.seed is not None:
            own = replace(own, seed=item_seed(params.seed, item.id))
        streams = []
        try:
            for i in range(n):
                choice = own if i == 0 or own.seed is None else replace(own, seed=own.seed + i)
                request = GenerationRequest(f"batch-{item.id}-{i}", prompt_ids, choice)
                streams.append(await _submit(engine, request))
            finished = [(await collect(s))[1] for s in streams]
        finally:
            for s in streams:
                await s.aclose()
    except (GenloopError, TypeError) as exc:  # TypeError: a bad per-item override
        if isinstance(exc, EngineBusy):
            raise
        line["error"] = str(exc)
        return line
    line["prompt_tokens"] = len(prompt_ids)
    choices = [_choice(f) for f in finished]
    if n == 1:
        line.update(choices[0])
    else:
        line["choices"] = choices
    return line


async def _submit(engine: TextEngine, request: GenerationRequest) -> Any:
    """Submit, waiting out a busy engine (another client may share it)."""
    while True:
        try:
            return engine.submit(request)
        except EngineBusy as exc:
            await asyncio.sleep(min(exc.retry_after_s, 1.0))


def _choice(finished: Finished) -> dict[str, Any]:
    out: dict[str, Any] = {
        "text": finished.text,
        "finish_reason": finished.reason,
        "completion_tokens": finished.completion_tokens,
    }
    if finished.error:
        out["error"] = finished.error
    return out


# Characters json.dumps leaves raw with ensure_ascii=False that str.splitlines() would
# take for line ends: escaped, so every reader sees one item per line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _write(out: TextIO, line: dict[str, Any]) -> None:
    out.write(json.dumps(line, ensure_ascii=False).translate(_LINE_BREAKS) + "\n")
    out.flush()  # a kill mid-line leaves a partial last line, which done_ids() drops

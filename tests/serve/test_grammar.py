"""Grammar-constrained decoding (``serve/engine/grammar.py``) on the session's byte-level
BPE and tiny models: the vocabulary as llguidance reads it, the grammar cache, the way to
the end within a budget (random walks under the mask), and the engine's batch with
constrained and unconstrained sequences together."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genloop.serve.api.structured import response_grammar, tools_grammar
from genloop.serve.engine import grammar as grammar_mod
from genloop.serve.engine.engine import collect
from genloop.serve.engine.grammar import GrammarCompiler, GrammarError
from genloop.serve.engine.types import GenerationRequest, SamplingParams

from .conftest import build_wide_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "friends": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
                "required": ["name", "ok"],
            },
        },
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "friends", "score"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}


def _json(schema: dict[str, Any]) -> str:
    from genloop.serve.api.protocol import ResponseFormat

    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    grammar = response_grammar(fmt)
    assert grammar is not None
    return grammar


GRAMMARS = {
    "person": _json(PERSON),
    "object": _json({"type": "object"}),
    "required": tools_grammar([WEATHER], "required"),
    "named": tools_grammar([WEATHER], "named", name="get_weather"),
    "auto": tools_grammar([WEATHER], "auto"),
}


@pytest.fixture(scope="module")
def tokenizer(model_dirs: tuple[Path, Path]) -> Any:
    from genloop.data.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(model_dirs[0])


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    # the model's logits are wider than the tokenizer (320 > the tokens BPE learned)
    return GrammarCompiler(tokenizer, vocab_size=336, eos_token_ids=[tokenizer.eos_token_id])


def test_the_vocabulary_is_read_as_bytes(tokenizer: Any, compiler: GrammarCompiler) -> None:
    """Each token's bytes as llguidance reads them are the byte-level BPE's: the token's
    characters mapped back through GPT-2's byte alphabet (``Ġ`` is a space, and a token
    may hold part of a UTF-8 character)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ll = compiler.tokenizer
    special = set(tokenizer.all_special_ids)
    partial = 0
    for token in range(len(tokenizer)):
        if token in special:
            assert ll.is_special_token(token)
            continue
        raw = bytes(to_byte[c] for c in tokenizer.convert_ids_to_tokens(token))
        if raw == b"\xff":  # llguidance marks special tokens with 0xFF, which UTF-8 never has
            assert ll.decode_bytes([token]) == b""
            continue
        assert ll.decode_bytes([token]) == raw, token
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
    assert partial > 0  # the test covers tokens that split a character
    text = "héllo wörld, ünïcode ✓"
    ids = tokenizer(text)["input_ids"]
    assert ll.decode_bytes(ids) == text.encode()
    # the mask is as wide as the logits; ids past the tokenizer are never allowed
    constraint = compiler.constraint(GRAMMARS["auto"])
    allowed = compiler._allowed(constraint.matcher)
    assert allowed.shape == (336,)
    assert allowed[: len(tokenizer)].any() and not allowed[len(tokenizer) :].any()


def test_compiled_grammars_are_cached_lru(
    compiler: GrammarCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grammar_mod, "GRAMMAR_CACHE", 2)
    a, b, c = (_json({"type": "object", "properties": {k: {"type": "integer"}}}) for k in "abc")
    first = compiler.compile(a)
    assert compiler.compile(a) is first
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.compile(a) is first
    assert b not in compiler._cache
    # two requests on one grammar get matchers of their own
    x, y = compiler.constraint(a), compiler.constraint(a)
    assert x.matcher.consume_tokens(compiler.tokenizer.tokenize_str('{"a":1'))
    assert not y.matcher.is_accepting() and x.matcher is not y.matcher


def test_a_grammar_the_engine_refuses_is_a_grammar_error(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="invalid"):
        compiler.compile("%llguidance {}\nstart: nowhere\n")


def _walk(compiler: GrammarCompiler, grammar: str, budget: int, rng: random.Random) -> bytes:
    """A random model: any allowed token, under the mask and the closing rule, for at most
    ``budget`` tokens; the text, or raises AssertionError when it did not end."""
    c = compiler.constraint(grammar)
    out: list[int] = []
    for step in range(budget):
        left = budget - step
        forced = c.close(left)
        allowed = np.flatnonzero(compiler._allowed(c.matcher))
        token = forced if forced is not None else int(rng.choice(allowed))
        assert compiler._allowed(c.matcher)[token]
        taken = c.advance(token, left)
        out.append(taken)
        if c.finished or taken in compiler.eos_token_ids:
            assert not c.error
            return compiler.tokenizer.decode_bytes(
                [t for t in out if t not in compiler.eos_token_ids]
            )
    raise AssertionError(f"no end in {budget} tokens")


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_every_walk_ends_within_a_budget_that_allows_it(
    compiler: GrammarCompiler, name: str
) -> None:
    """Random tokens wander (long strings, numbers, extra items and calls); the closing
    rule still ends the grammar within any budget from the shortest document up."""
    grammar = GRAMMARS[name]
    shortest = compiler.compile(grammar).shortest
    assert shortest is not None
    rng = random.Random(0)
    for budget in (shortest, shortest + 3, shortest + 40, 300):
        for _ in range(8):
            text = _walk(compiler, grammar, budget, rng).decode()
            if name in ("person", "object"):
                doc = json.loads(text)
                if name == "person":
                    assert set(doc) == set(PERSON["required"])  # type: ignore[arg-type]
            elif name != "auto" or "<tool_call>" in text:
                body = text.split("<tool_call>\n", 1)[1].split("\n</tool_call>")[0]
                call = json.loads(body)
                assert call["name"] == "get_weather" and call["arguments"]["unit"] in "cf"
    with pytest.raises(AssertionError, match="no end"):
        _walk(compiler, grammar, shortest - 1, rng)


def test_unconstrained_greedy_output_is_the_same_in_a_busy_constrained_batch(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path]
) -> None:
    """Greedy requests alone, then again among constrained ones in the same batch: the
    same tokens. The constrained ones end in their grammar (no end-of-text needed)."""
    from .test_engine import PROMPTS, engine_for

    path = build_wide_llama(tmp_path_factory.mktemp("wide") / "wide", model_dirs[0])
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    grammar = GRAMMARS["person"]

    async def run(with_constrained: bool) -> tuple[list[list[int]], list[Any]]:
        eng = engine_for(path, max_batch_size=8, max_queue=16)
        await eng.start()
        ids = [eng.encode(p) for p in PROMPTS]
        constrained = [
            eng.submit(
                GenerationRequest(
                    f"c{i}", ids[i % 4], SamplingParams(max_tokens=90, seed=i), grammar=grammar
                )
            )
            for i in range(4 if with_constrained else 0)
        ]
        plain = [eng.submit(GenerationRequest(f"g{i}", p, greedy)) for i, p in enumerate(ids)]
        results = await asyncio.gather(*(collect(s) for s in plain + constrained))
        steps = eng.steps
        await eng.close()
        assert steps < 2 * 90  # they shared steps
        return [[d.token_id for d in r[0]] for r in results[:4]], results[4:]

    alone, _ = asyncio.run(run(False))
    together, constrained = asyncio.run(run(True))
    assert together == alone
    eos = 0  # the tokenizer's <|endoftext|>
    for deltas, finished in constrained:
        assert finished.reason == "stop", finished
        assert eos not in [d.token_id for d in deltas]  # ended by the grammar
        assert set(json.loads(finished.text)) == set(PERSON["required"])  # type: ignore[arg-type]

"""The scheduler alone: admission, prefill budget and chunks, slots, finishing, deadlines.

No model and no torch: plans are plain data, and the test plays the runner's part by
calling ``prefilled``/``decoded`` and appending tokens itself.
"""

from __future__ import annotations

import pytest

from genloop.serve.engine.scheduler import Move, PrefillChunk, Scheduler, Seq
from genloop.serve.engine.types import SamplingParams


def seq(name: str, prompt_len: int = 4, deadline: float | None = None) -> Seq:
    return Seq(name, list(range(1, prompt_len + 1)), SamplingParams(), 0.0, deadline)


def run_plan(s: Scheduler, plan_prefill: list[PrefillChunk], decode: list[Seq]) -> None:
    """What the engine does after the model ran: bookkeeping plus one token per row."""
    for chunk in plan_prefill:
        s.prefilled(chunk)
        if chunk.last:
            chunk.seq.output_ids.append(7)
    for q in decode:
        s.decoded(q)
        q.output_ids.append(7)


def test_admits_up_to_the_batch_size_and_queues_the_rest() -> None:
    s = Scheduler(max_running=2, max_len=64)
    a, b, c = seq("a"), seq("b"), seq("c")
    for q in (a, b, c):
        s.add(q)
    plan = s.schedule()
    assert [ch.seq for ch in plan.prefill] == [a, b]
    assert [(ch.start, ch.end, ch.last) for ch in plan.prefill] == [(0, 4, True), (0, 4, True)]
    assert plan.decode == [] and plan.moves == []
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    assert list(s.waiting) == [c] and c.status == "waiting"
    run_plan(s, plan.prefill, plan.decode)
    plan = s.schedule()
    assert plan.prefill == [] and plan.decode == [a, b]  # both decode together


def test_a_new_request_joins_the_running_batch_between_decode_steps() -> None:
    s = Scheduler(max_running=4, max_len=64)
    a = seq("a")
    s.add(a)
    plan = s.schedule()
    run_plan(s, plan.prefill, plan.decode)
    plan = s.schedule()
    run_plan(s, plan.prefill, plan.decode)
    assert a.num_cached == 5 and len(a.output_ids) == 2
    b = seq("b", prompt_len=6)
    s.add(b)
    plan = s.schedule()  # b's prefill and a's decode in the same step
    assert [ch.seq for ch in plan.prefill] == [b] and plan.decode == [a]
    run_plan(s, plan.prefill, plan.decode)
    assert s.schedule().decode == [a, b]


def test_finishing_moves_the_last_sequence_into_the_free_slot() -> None:
    s = Scheduler(max_running=4, max_len=64)
    qs = [seq(n, prompt_len=3 + i) for i, n in enumerate("abcd")]
    for q in qs:
        s.add(q)
    plan = s.schedule()
    run_plan(s, plan.prefill, plan.decode)
    a, b, c, d = qs
    s.finish(b)
    assert b.status == "finished" and b.slot is None
    assert s.running == [a, d, c] and d.slot == 1
    s.finish(d)  # d now sits in slot 1; c (slot 2) moves there
    assert s.running == [a, c] and c.slot == 1
    plan = s.schedule()
    assert plan.moves == [Move(3, 1, d.num_cached), Move(2, 1, c.num_cached)]
    assert plan.decode == [a, c]
    assert [q.slot for q in plan.decode] == [0, 1]  # contiguous again
    assert s.schedule().moves == []  # moves are handed out once


def test_finishing_the_last_or_a_waiting_sequence_moves_nothing() -> None:
    s = Scheduler(max_running=2, max_len=64)
    a, b, c = seq("a"), seq("b"), seq("c")
    for q in (a, b, c):
        s.add(q)
    s.schedule()
    s.finish(b)
    s.finish(c)  # still waiting
    s.finish(c)  # twice is harmless
    assert s.running == [a] and not s.waiting
    assert s.schedule().moves == []


def test_freed_slots_admit_waiting_requests() -> None:
    s = Scheduler(max_running=2, max_len=64)
    a, b, c = seq("a"), seq("b"), seq("c")
    for q in (a, b, c):
        s.add(q)
    plan = s.schedule()
    run_plan(s, plan.prefill, plan.decode)
    s.finish(a)
    plan = s.schedule()
    assert plan.moves == [Move(1, 0, b.num_cached)]
    assert [ch.seq for ch in plan.prefill] == [c] and c.slot == 1
    assert plan.decode == [b]


def test_long_prompts_are_chunked_within_the_prefill_budget() -> None:
    s = Scheduler(max_running=4, max_len=256, prefill_chunk=16, prefill_budget=24)
    long, short = seq("long", prompt_len=40), seq("short", prompt_len=5)
    s.add(long)
    s.add(short)
    plan = s.schedule()
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in plan.prefill] == [
        ("long", 0, 16),
        ("short", 0, 5),
    ]
    run_plan(s, plan.prefill, plan.decode)
    assert long.status == "prefill" and long.num_cached == 16 and not long.output_ids
    assert short.status == "decode"
    plan = s.schedule()  # the long prompt continues; the short one decodes meanwhile
    assert [(ch.start, ch.end) for ch in plan.prefill] == [(16, 32)]
    assert plan.decode == [short]
    run_plan(s, plan.prefill, plan.decode)
    plan = s.schedule()
    assert [(ch.start, ch.end, ch.last) for ch in plan.prefill] == [(32, 40, True)]
    run_plan(s, plan.prefill, plan.decode)
    assert long.status == "decode" and long.num_cached == 40
    assert s.schedule().decode == [long, short]


def test_the_budget_holds_new_requests_back() -> None:
    s = Scheduler(max_running=8, max_len=256, prefill_chunk=64, prefill_budget=10)
    a, b, c = seq("a", 6), seq("b", 6), seq("c", 6)
    for q in (a, b, c):
        s.add(q)
    plan = s.schedule()
    # a takes 6 tokens; b gets the remaining 4 and continues next step; c waits
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in plan.prefill] == [
        ("a", 0, 6),
        ("b", 0, 4),
    ]
    assert list(s.waiting) == [c]


def test_whole_prompt_prefill_when_the_runner_cannot_chunk() -> None:
    s = Scheduler(max_running=4, max_len=256, prefill_chunk=None, prefill_budget=8)
    a, b = seq("a", 20), seq("b", 20)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in plan.prefill] == [("a", 0, 20)]
    assert list(s.waiting) == [b]  # it would overrun the budget: next step, whole
    run_plan(s, plan.prefill, plan.decode)
    plan = s.schedule()
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in plan.prefill] == [("b", 0, 20)]


def test_deadlines_and_lookup() -> None:
    s = Scheduler(max_running=1, max_len=64)
    a, b, c = seq("a", deadline=5.0), seq("b", deadline=1.0), seq("c")
    for q in (a, b, c):
        s.add(q)
    s.schedule()
    assert s.expired(0.5) == []
    assert s.expired(1.0) == [b]
    assert set(s.expired(9.0)) == {a, b}
    assert s.find("b") is b and s.find("a") is a and s.find("zz") is None


def test_length_limit_and_bad_input() -> None:
    s = Scheduler(max_running=1, max_len=6)
    a = seq("a", prompt_len=4)
    s.add(a)
    a.output_ids = [9]
    assert not s.reached_length(a)
    a.output_ids = [9, 9]
    assert s.reached_length(a)
    with pytest.raises(ValueError):
        s.add(Seq("empty", [], SamplingParams(), 0.0))
    with pytest.raises(ValueError):
        Scheduler(max_running=0, max_len=8)

"""Continuous batching as plain bookkeeping: who waits, who runs, what the next step does.

Every engine step is *schedule → run the model → update* (vLLM's ``EngineCore.step``).
This module is the first and last part, with no model and no torch, so it is tested alone
(``tests/serve/test_scheduler.py``):

- :meth:`Scheduler.schedule` returns a :class:`Plan`: slot moves to apply to the cache,
  prefill chunks (new sequences admitted into free slots between decode steps, long prompts
  cut into chunks, at most ``prefill_budget`` prompt tokens per step so running sequences
  keep decoding), and the sequences to decode together, one token each;
- after the model ran, the engine reports back (:meth:`prefilled`, :meth:`decoded`) and
  retires sequences (:meth:`finish`), whatever the reason: stop, length, cancellation,
  deadline.

Slots. Running sequences occupy slots ``0..B-1``, in the order of :attr:`running`. When
one finishes, the last moves into its slot (a :class:`Move` in the next plan), so the
cache the decode step reads stays one contiguous block.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from genloop.serve.engine.types import SamplingParams

Status = Literal["waiting", "prefill", "decode", "finished"]


@dataclass(eq=False)
class Seq:
    """One request's progress (``eq=False``: compared by identity)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() when it was queued
    deadline: float | None = None
    output_ids: list[int] = field(default_factory=list)
    status: Status = "waiting"
    slot: int | None = None
    num_cached: int = 0  # positions whose keys and values are in the slot
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    state: Any = None  # the engine's own per-request state (stream, detokenizer, rng)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def next_token(self) -> int:
        """The token a decode step feeds: the newest one (its keys are not cached yet)."""
        return self.output_ids[-1]


@dataclass(frozen=True)
class Move:
    """Copy ``length`` cached positions from slot ``src`` to ``dst``."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions ``start..end`` of ``seq``; ``last`` when it completes the prompt."""

    seq: Seq
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.prompt_ids[self.start : self.end]


@dataclass
class Plan:
    """What one engine step does, in this order."""

    moves: list[Move] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Seq] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.moves or self.prefill or self.decode)


class Scheduler:
    """Waiting queue, running batch and slot assignment for one model."""

    def __init__(
        self,
        *,
        max_running: int,
        max_len: int,
        prefill_chunk: int | None = 512,
        prefill_budget: int = 512,
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.max_running = max_running
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk  # None: a prompt is prefilled in one piece
        self.prefill_budget = max(1, prefill_budget)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # index = slot
        self._moves: list[Move] = []

    # ------------------------------------------------------------------ admission

    def add(self, seq: Seq) -> None:
        if not seq.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        seq.status = "waiting"
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._moves)

    # ------------------------------------------------------------------- the step

    def schedule(self) -> Plan:
        """The next step: pending moves, prefill chunks within the budget, the decode batch."""
        plan = Plan(moves=self._moves)
        self._moves = []
        plan.decode = [s for s in self.running if s.status == "decode"]
        budget = self.prefill_budget
        # sequences already part-way through a long prompt go first, in slot order
        for seq in self.running:
            if seq.status == "prefill" and budget > 0:
                budget -= self._plan_chunk(plan, seq, budget)
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            seq.status = "prefill"
            self.running.append(seq)
            budget -= self._plan_chunk(plan, seq, budget)
        return plan

    def _plan_chunk(self, plan: Plan, seq: Seq, budget: int) -> int:
        start = seq.num_cached
        size = len(seq.prompt_ids) - start
        if self.prefill_chunk is not None:
            size = min(size, self.prefill_chunk, budget)
        elif plan.prefill and size > budget:
            return 0  # a whole-prompt prefill that does not fit waits for the next step
        plan.prefill.append(PrefillChunk(seq, start, start + size))
        return size

    # ---------------------------------------------------------------- bookkeeping

    def prefilled(self, chunk: PrefillChunk) -> None:
        """The model cached ``chunk``; after the last chunk the first token is sampled."""
        chunk.seq.num_cached = chunk.end
        if chunk.last:
            chunk.seq.status = "decode"

    def decoded(self, seq: Seq) -> None:
        """The model cached ``seq``'s newest token."""
        seq.num_cached += 1

    def finish(self, seq: Seq) -> None:
        """Retire ``seq`` (running or waiting); its slot goes to the last running sequence."""
        if seq.status == "finished":
            return
        if seq.status == "waiting":
            self.waiting.remove(seq)
        else:
            slot = seq.slot
            assert slot is not None and self.running[slot] is seq
            last = self.running.pop()
            if last is not seq:
                self.running[slot] = last
                assert last.slot is not None
                self._moves.append(Move(last.slot, slot, last.num_cached))
                last.slot = slot
        seq.status = "finished"
        seq.slot = None

    def find(self, request_id: str) -> Seq | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def expired(self, now: float) -> list[Seq]:
        """Unfinished sequences whose deadline has passed (the engine finishes them)."""
        return [
            s
            for s in (*self.running, *self.waiting)
            if s.deadline is not None and now >= s.deadline
        ]

    def reached_length(self, seq: Seq) -> bool:
        """No room for another token: prompt + completion fill the context."""
        return seq.length >= self.max_len

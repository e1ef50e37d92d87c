"""The engine: one loaded text model decoding many requests together, behind asyncio.

Threads. The model runs in one dedicated thread (``genloop-engine``) that loops over
*schedule → run → update* steps (``scheduler.py``, ``runner.py``, ``sampling.py``). Callers
live on asyncio event loops (uvicorn's, or ``asyncio.run`` in the CLI): ``submit`` puts the
request in a locked inbox and wakes the thread; the thread hands each step's events back
with one ``loop.call_soon_threadsafe`` per loop, which puts them on per-request
``asyncio.Queue`` s. Torch releases the GIL inside its kernels, so the event loop keeps
serving HTTP while a step runs.

Each request's stream yields :class:`TokenDelta` s (one per generated token, the end-of-
text token included, whose text is empty) and then one :class:`Finished`. Closing the
stream (``aclose()``), or cancelling the task waiting on it, cancels the request: the thread
drops it at the start of its next step, so its slot is free within one decode step.

Limits. At most ``max_batch_size`` sequences decode together; up to ``max_queue`` more
wait; beyond that ``submit`` raises :class:`EngineBusy` (HTTP 429 with a Retry-After
estimated from recent request times). Every request has a deadline (its own, or now +
``request_timeout_s``) and finishes as ``"timeout"`` when it passes, with the text so far.
``drain`` stops admission (:class:`EngineStopped`, HTTP 503), lets in-flight work finish
until its deadline, aborts the rest (reason ``"cancelled"``, ``error`` saying why) and stops
the thread.

Prompt log-probabilities (``SamplingParams.prompt_logprobs``: ``echo`` with ``logprobs`` on
``/v1/completions``, what lm-evaluation-harness's loglikelihood tasks send). Such a request's
prompt chunks ask the runner for every position's logits (``Chunk.all_logits``) inside the
same continuous batch as everyone else; the engine takes their fp32 ``log_softmax``, keeps
each next prompt token's value and the top k, and sends one :class:`PromptLogprobs` when
the prompt is done, before the first token (with ``max_tokens`` 0 the request then ends).
Requests that do not ask cost nothing more: their chunks give one row, as before.

Beam search (``num_beams > 1``) is not streamed: it runs Hugging Face ``generate`` in a
second thread (so the decode loop keeps going), and its tokens arrive together at the end.
An engine without the PyTorch model (an ONNX variant's) refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from genloop.errors import ConflictError, GenloopError
from genloop.serve.engine.grammar import ConstrainedRows, Constraint, GrammarCompiler
from genloop.serve.engine.kv_cache import CachePlan
from genloop.serve.engine.prompts import PromptTokenizer
from genloop.serve.engine.runner import Chunk, Runner
from genloop.serve.engine.sampling import (
    IncrementalDetokenizer,
    Sampled,
    StopStrings,
    make_decode,
    make_generator,
    sample,
)
from genloop.serve.engine.scheduler import Plan, PrefillChunk, Scheduler, Seq
from genloop.serve.engine.types import (
    EngineBusy,
    EngineObserver,
    EngineStats,
    EngineStopped,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptLogprobs,
    TokenDelta,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
DRAIN_ABORTED = "aborted: the server is shutting down"


# ------------------------------------------------------------------------ streams


class RequestStream:
    """The async iterator ``submit`` returns: token deltas, then one ``Finished``."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:  # cancelled (client gone) or the loop is closing
            self._close()
            raise
        if isinstance(event, Finished):
            self._done = True
        return event

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self.request_id)

    def __del__(self) -> None:  # dropped without being read to the end: free the slot
        if not self._done:
            # no lock here: the garbage collector may run this on any thread, even one that
            # holds the engine's lock; deque.append is atomic and the engine thread reads it
            self._engine._dropped.append(self.request_id)


@dataclass
class _State:
    """The engine's per-request state, carried on ``Seq.state``."""

    loop: asyncio.AbstractEventLoop
    stream: RequestStream
    generator: random.Random
    detok: IncrementalDetokenizer
    stops: StopStrings
    cancelled: bool = False  # beam search checks this between its steps
    # the prompt's scores so far (prompt_logprobs), position 0's None included
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list[dict[str, float] | None] | None = None
    constraint: Constraint | None = None  # the grammar the output must match (grammar.py)


# ------------------------------------------------------------------------- engine


class Engine:
    """A continuous-batching engine for one text model version (``protocol.TextEngine``)."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        *,
        model_name: str,
        model_version: int | None = None,
        model: PreTrainedModel | None = None,
        eos_token_ids: Sequence[int] = (),
        max_batch_size: int = 16,
        max_queue: int = 64,
        request_timeout_s: float = 60.0,
        prefill_budget: int = 512,
        observer: EngineObserver | None = None,
        family: str = "causal_lm",
    ) -> None:
        if max_batch_size > runner.n_slots:
            raise GenloopError(
                f"max_batch_size {max_batch_size} exceeds the runner's {runner.n_slots} slots"
            )
        self.model_name = model_name
        self.model_version = model_version
        self.family = family
        self.tokenizer = tokenizer
        self.model = model
        self.runner = runner
        self.context_length = runner.max_len
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.prompts = PromptTokenizer(
            tokenizer, model_name=model_name, eos_token_ids=self.eos_token_ids
        )
        self.eos_token_id = self.prompts.eos_token_id
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.observer = observer
        self.scheduler = Scheduler(
            max_running=max_batch_size,
            max_len=runner.max_len,
            prefill_chunk=runner.prefill_chunk,
            prefill_budget=prefill_budget,
        )
        self._decode = make_decode(tokenizer)
        self.grammars = GrammarCompiler(
            tokenizer, vocab_size=runner.vocab_size, eos_token_ids=sorted(self.eos_token_ids)
        )
        # shared with the asyncio side, under _lock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Seq] = []
        self._cancels: set[str] = set()
        self._dropped: deque[str] = deque()  # streams garbage-collected unfinished
        self._inflight: dict[str, Seq] = {}  # accepted and not finished, by request id
        self._accepting = True
        self._abort_all = False  # draining ran out of time: everything in flight is aborted
        self._abort_pending = False  # ... and the engine thread has yet to do it
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._warm = threading.Event()  # set once the engine thread has warmed up
        self._beam_jobs: queue.Queue[Seq | None] = queue.Queue()
        self._beam_thread: threading.Thread | None = None
        self._recent_e2e = 1.0  # moving average of request seconds, for Retry-After
        # owned by the engine thread
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
        self._beam_outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]] = {}
        self.steps = 0
        self.cache_plan: CachePlan | None = None  # how the loader sized the cache, if it did

    # ------------------------------------------------------------ tokenizer side

    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return self.prompts.chat_prompt_ids(messages, tools)

    def token_text(self, token_id: int) -> str:
        return self.prompts.token_text(token_id)

    def prepare_grammar(self, grammar: str) -> None:
        """Compile ``grammar`` for this model now (callers run it off the event loop), so
        that ``submit`` finds it in the cache; a GenloopError for one it cannot run."""
        self.grammars.compile(grammar)

    # --------------------------------------------------------------- async side

    async def start(self) -> None:
        """Start the engine threads; returns once the model is warmed up (the engine thread
        runs one prefill and one decode step first, so the first request does not pay)."""
        self._start_threads()
        await asyncio.to_thread(self._warm.wait)

    def _start_threads(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="genloop-engine", daemon=True)
            self._thread.start()
            self._beam_thread = threading.Thread(
                target=self._beam_loop, name="genloop-engine-beam", daemon=True
            )
            self._beam_thread.start()

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue ``request``; its events arrive on the returned stream.

        Must be called from a running event loop. Raises :class:`EngineBusy` when the queue
        is full, :class:`EngineStopped` while draining, and a :class:`GenloopError` for a
        request this model cannot run (prompt too long, token ids out of range, ...).
        """
        loop = asyncio.get_running_loop()
        self._validate(request)
        now = time.monotonic()
        deadline = request.deadline if request.deadline is not None else now
        if request.deadline is None:
            deadline += self.request_timeout_s
        stream = RequestStream(self, request.request_id)
        params = request.params
        seq = Seq(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_ids),
            params=params,
            arrival=now,
            deadline=deadline,
        )
        seq.state = _State(
            loop=loop,
            stream=stream,
            generator=make_generator(params.seed),
            detok=IncrementalDetokenizer(self._decode, seq.prompt_ids),
            stops=StopStrings(params.stop),
            constraint=self.grammars.constraint(request.grammar) if request.grammar else None,
        )
        if params.prompt_logprobs is not None:
            seq.state.prompt_logprobs, seq.state.prompt_top = [None], [None]
        with self._lock:
            if not self._accepting:
                raise EngineStopped(f"model {self.model_name} is shutting down")
            if request.request_id in self._inflight:
                raise ConflictError(f"request id {request.request_id!r} is already running")
            if len(self._inflight) >= self.max_batch_size + self.max_queue:
                raise EngineBusy(
                    f"model {self.model_name} is busy ({len(self._inflight)} requests in "
                    "flight); retry later",
                    retry_after_s=self._retry_after(),
                )
            self._inflight[request.request_id] = seq
            if params.num_beams > 1:
                self._beam_jobs.put(seq)
            else:
                self._inbox.append(seq)
                self._wake.notify()
        if self._thread is None:
            self._start_threads()
        return stream

    def cancel(self, request_id: str) -> None:
        """Cancel a request (thread-safe, idempotent); it finishes as ``"cancelled"``."""
        with self._lock:
            seq = self._inflight.get(request_id)
            if seq is None:
                return
            seq.state.cancelled = True
            self._cancels.add(request_id)
            self._wake.notify()

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; let in-flight requests finish for ``timeout_s``; abort the rest."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with self._lock:
            self._abort_all = self._abort_pending = True
            for seq in self._inflight.values():
                seq.state.cancelled = True
            self._wake.notify()
        if self._thread is None:  # never started: nothing can be in flight
            return
        # aborting takes effect at the next step; a step is short, but never wait forever
        grace = time.monotonic() + 5.0
        while self._inflight and time.monotonic() < grace:
            await asyncio.sleep(0.005)
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._beam_jobs.put(None)
        await asyncio.to_thread(self._join)

    async def close(self) -> None:
        """Abort everything and stop (``drain`` with no grace period)."""
        await self.drain(0.0)

    def _join(self) -> None:
        for thread in (self._thread, self._beam_thread):
            if thread is not None:
                thread.join(timeout=10.0)

    def stats(self) -> EngineStats:
        with self._lock:
            inflight = len(self._inflight)
        running = len(self.scheduler.running)
        return EngineStats(
            running=running,
            waiting=max(0, inflight - running),
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
        )

    @property
    def accepting(self) -> bool:
        return self._accepting

    def _retry_after(self) -> float:
        waiting = max(0, len(self._inflight) - self.max_batch_size)
        batches_ahead = waiting / self.max_batch_size + 1
        return float(min(60, max(1, math.ceil(self._recent_e2e * batches_ahead))))

    def _validate(self, request: GenerationRequest) -> None:
        p, ids = request.params, request.prompt_ids
        if not ids:
            raise GenloopError("the prompt is empty (it needs at least one token)")
        if len(ids) >= self.context_length:
            raise GenloopError(
                f"the prompt has {len(ids)} tokens; model {self.model_name} takes at most "
                f"{self.context_length - 1} (its context is {self.context_length} tokens)"
            )
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise GenloopError(f"prompt token ids must be in [0, {self.vocab_size})")
        if p.max_tokens < (0 if p.prompt_logprobs is not None else 1):
            raise GenloopError(
                f"max_tokens must be at least 1 (0 only to score the prompt), not {p.max_tokens}"
            )
        if not p.temperature >= 0 or not math.isfinite(p.temperature):
            raise GenloopError(f"temperature must be a number ≥ 0, not {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise GenloopError(f"top_p must be in (0, 1], not {p.top_p}")
        if p.top_k is not None and p.top_k < 1:
            raise GenloopError(f"top_k must be at least 1, not {p.top_k}")
        if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
            raise GenloopError(f"logprobs must be in [0, {MAX_LOGPROBS}], not {p.logprobs}")
        if p.prompt_logprobs is not None:
            self._validate_prompt_logprobs(p.prompt_logprobs, p.num_beams)
        if p.num_beams < 1:
            raise GenloopError(f"num_beams must be at least 1, not {p.num_beams}")
        if p.num_beams > 1 and self.model is None:
            raise GenloopError(
                f"beam search (num_beams > 1) needs the PyTorch model, and model "
                f"{self.model_name} has none (it runs on the {self.runner.kind} runner); "
                "use num_beams 1"
            )
        if any(not 0 <= t < self.vocab_size for t in p.stop_token_ids):
            raise GenloopError(f"stop_token_ids must be in [0, {self.vocab_size})")
        if request.grammar is not None and p.num_beams > 1:
            raise GenloopError(
                "beam search (num_beams > 1) cannot follow a grammar; use num_beams 1"
            )

    def _validate_prompt_logprobs(self, k: int, num_beams: int) -> None:
        if not 0 <= k <= MAX_LOGPROBS:
            raise GenloopError(f"logprobs must be in [0, {MAX_LOGPROBS}], not {k}")
        if num_beams > 1:
            raise GenloopError("prompt log-probabilities (echo with logprobs) need num_beams 1")
        if getattr(self.runner, "encoder_decoder", False):
            raise GenloopError(
                f"model {self.model_name} is an encoder-decoder: its prompt is encoded, not "
                "predicted, so it has no prompt log-probabilities (echo with logprobs)"
            )

    # ------------------------------------------------------------- engine thread

    def _warm_up(self) -> None:
        """One prefill and one decode step, so the first request does not pay for them."""
        self.runner.step([Chunk(0, [0, 0], 0, True)], [], [], [])
        self.runner.step([], [0], [0], [2])
        self.runner.release(0)

    def _loop(self) -> None:
        try:
            self._warm_up()
        except Exception:  # a model that cannot run fails its requests, with the reason
            log.exception("engine warm-up failed")
        finally:
            self._warm.set()
        while True:
            with self._lock:
                while not (
                    self._inbox
                    or self._cancels
                    or self._abort_pending
                    or self._stopping
                    or self.scheduler.has_work()
                ):
                    self._wake.wait()
                new, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
                while self._dropped:
                    cancels.add(self._dropped.popleft())
                abort_all, stopping = self._abort_pending, self._stopping
                self._abort_pending = False
            for seq in new:
                self.scheduler.add(seq)
                self._observe("on_queued", self.model_name, self.model_version)
            for request_id in cancels:
                found = self.scheduler.find(request_id)
                if found is not None:
                    self._finish(found, "cancelled")
            now = time.monotonic()
            for seq in self.scheduler.expired(now):
                self._finish(seq, "timeout")
            if abort_all:
                for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                    self._finish(seq, "cancelled", DRAIN_ABORTED)
            if stopping and not self.scheduler.num_unfinished:
                self._flush()
                return
            plan = self.scheduler.schedule()
            try:
                self._step(plan)
            except Exception as exc:  # a bug or an OOM: fail these requests, keep serving
                log.exception("engine step failed")
                failed = {id(c.seq): c.seq for c in plan.prefill} | {id(s): s for s in plan.decode}
                for seq in failed.values():
                    self._finish(seq, "error", f"{type(exc).__name__}: {exc}")
            self.steps += 1
            self._flush()

    def _step(self, plan: Plan) -> None:
        runner, scheduler = self.runner, self.scheduler
        for move in plan.moves:
            runner.move(move.src, move.dst, move.length)
        now = time.monotonic()
        for chunk in plan.prefill:
            seq = chunk.seq
            if seq.scheduled_at is None:
                seq.scheduled_at = now
                self._observe(
                    "on_scheduled", self.model_name, self.model_version, now - seq.arrival
                )
        batch = plan.decode
        scored = any(_scores(c.seq) for c in plan.prefill)
        # one per sampled logits row: the decode batch, then each prompt's last chunk (a
        # prompt only scored, max_tokens 0, samples nothing)
        rows = [*batch, *(c.seq for c in plan.prefill if c.last and _samples(c.seq))]
        constrained = ConstrainedRows.find(rows, lambda s: s.state.constraint, self._budget_left)
        if constrained is not None:
            constrained.start()  # the grammar masks are computed while the model runs
        logits = runner.step(
            [
                Chunk(c.seq.slot, c.token_ids, c.start, c.last, _scores(c.seq))  # type: ignore[arg-type]
                for c in plan.prefill
            ],
            [s.slot for s in batch],  # type: ignore[misc]
            [s.next_token for s in batch],
            [s.num_cached for s in batch],
        )
        for seq in batch:
            scheduler.decoded(seq)
        if not scored:  # the common step: one logits row per sequence that samples
            for chunk in plan.prefill:
                scheduler.prefilled(chunk)
        else:  # a scored chunk has a row per position (Runner.step); sample from the last
            picks, at, prompts = list(range(len(batch))), len(batch), []
            for chunk in plan.prefill:
                scheduler.prefilled(chunk)
                if _scores(chunk.seq):
                    prompts.append((chunk, at))
                    at += chunk.end - chunk.start
                    if chunk.last and _samples(chunk.seq):
                        picks.append(at - 1)
                elif chunk.last:
                    picks.append(at)
                    at += 1
            assert logits is not None
            self._score_prompts(logits, prompts)
            if not rows:
                return
            logits = logits.index_select(0, torch.tensor(picks, device=logits.device))
        if logits is None or not rows:
            return
        if constrained is not None:
            logits = constrained.mask(logits)
        picked = sample(logits, [s.params for s in rows], [s.state.generator for s in rows])
        if constrained is not None:
            constrained.advance(logits, picked)
        now = time.monotonic()
        for seq, choice in zip(rows, picked, strict=True):
            self._on_token(seq, choice, now)

    def _score_prompts(self, logits: torch.Tensor, prompts: list[tuple[PrefillChunk, int]]) -> None:
        """Each scored chunk's prompt log-probabilities, from its rows of ``logits`` (from
        row ``at``, one per position): the row at position i scores prompt token i + 1, in
        fp32 ``log_softmax`` as ``sample`` scores generated tokens. A prompt's last chunk
        sends its :class:`PromptLogprobs`; with ``max_tokens`` 0 the request ends there."""
        for chunk, at in prompts:
            seq, state = chunk.seq, chunk.seq.state
            targets = seq.prompt_ids[chunk.start + 1 : chunk.end + 1]  # (m,): m = t or t - 1
            if targets:
                m, k = len(targets), seq.params.prompt_logprobs or 0
                lp = torch.log_softmax(logits[at : at + m], dim=-1)  # (m, V) fp32
                index = torch.tensor(targets, device=lp.device)[:, None]
                state.prompt_logprobs.extend(lp.gather(1, index)[:, 0].tolist())
                if k > 0:
                    values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
                    for row_v, row_i in zip(values.tolist(), ids.tolist(), strict=True):
                        top: dict[str, float] = {}
                        for t, v in zip(row_i, row_v, strict=True):  # best first
                            top.setdefault(self.token_text(t), v)
                        state.prompt_top.append(top)
                else:
                    state.prompt_top.extend([None] * m)
            if chunk.last:
                self._emit(seq, PromptLogprobs(state.prompt_logprobs, state.prompt_top))
                if seq.params.max_tokens == 0:
                    self._finish(seq, "length")

    def _on_token(self, seq: Seq, choice: Sampled, now: float) -> None:
        token, p, state = choice.token_id, seq.params, seq.state
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self._observe("on_first_token", self.model_name, self.model_version, now - seq.arrival)
        else:
            gap = now - (seq.last_token_at or now)
            self._observe("on_token", self.model_name, self.model_version, gap)
        seq.last_token_at = now
        reason: FinishReason | None = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            text, reason = state.stops.flush(), "stop"
        else:
            text, hit = state.stops.add(state.detok.add(token))
            if hit:
                reason = "stop"
        error = None
        if reason is None and state.constraint is not None and state.constraint.finished:
            text += state.stops.flush()  # the grammar is complete: nothing may follow
            reason = "stop"
            if state.constraint.error:  # a token the grammar refused (a bug): say which
                reason, error = "error", f"grammar: {state.constraint.error}"
        if reason is None and (
            len(seq.output_ids) >= p.max_tokens or self.scheduler.reached_length(seq)
        ):
            text += state.stops.flush()
            reason = "length"
        top: dict[str, float] | None = None
        if choice.top is not None:
            top = {}
            for t, lp in choice.top:  # best first; tokens whose text collides keep the best
                if lp != -math.inf:  # a grammar forbids it: not an alternative
                    top.setdefault(self.token_text(t), lp)
        self._emit(seq, TokenDelta(token, text, choice.logprob, top))
        if reason is not None:
            self._finish(seq, reason, error)

    def _budget_left(self, seq: Seq) -> int:
        """Tokens ``seq`` may still generate, this step's included."""
        return min(seq.params.max_tokens - len(seq.output_ids), self.context_length - seq.length)

    def _finish(self, seq: Seq, reason: FinishReason, error: str | None = None) -> None:
        if seq.status == "finished":
            return
        slot = seq.slot
        self.scheduler.finish(seq)
        if slot is not None:
            self.runner.release(slot)
        self._complete(seq, reason, error)

    def _complete(self, seq: Seq, reason: FinishReason, error: str | None = None) -> None:
        """Send ``Finished`` and forget the request (both threads use this)."""
        seq.status = "finished"
        finished = Finished(
            reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            text=seq.state.stops.text,
            error=error,
        )
        self._emit(seq, finished)
        e2e = time.monotonic() - seq.arrival
        self._observe("on_finished", self.model_name, self.model_version, finished, e2e)
        with self._lock:
            self._inflight.pop(seq.request_id, None)
            if reason in ("stop", "length"):
                self._recent_e2e = 0.9 * self._recent_e2e + 0.1 * e2e

    def _emit(self, seq: Seq, event: Event) -> None:
        state: _State = seq.state
        self._box().setdefault(state.loop, []).append((state.stream, event))

    def _box(self) -> dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Event]]]:
        """This thread's outbox (the engine and the beam thread each fill their own)."""
        beam = threading.current_thread() is self._beam_thread
        return self._beam_outbox if beam else self._outbox

    def _flush(self) -> None:
        """Hand this step's events to their event loops, one wake-up per loop."""
        outbox = self._box().copy()
        self._box().clear()
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for stream, _ in items:
                    self.cancel(stream.request_id)

    def _observe(self, hook: str, *args: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # metrics must never break serving
            log.exception("engine observer %s failed", hook)

    # -------------------------------------------------------------- beam search

    def _beam_loop(self) -> None:
        while True:
            seq = self._beam_jobs.get()
            if seq is None:
                return
            self._observe("on_queued", self.model_name, self.model_version)
            if seq.state.cancelled or self._abort_all:
                self._complete(seq, "cancelled", DRAIN_ABORTED if self._abort_all else None)
            else:
                try:
                    self._beam_search(seq)
                except Exception as exc:
                    log.exception("beam search failed")
                    self._complete(seq, "error", f"{type(exc).__name__}: {exc}")
            self._flush()

    def _beam_search(self, seq: Seq) -> None:
        """Hugging Face beam search for one request, stopped early on cancel or deadline."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        assert self.model is not None
        p, state = seq.params, seq.state
        seq.scheduled_at = time.monotonic()
        self._observe(
            "on_scheduled", self.model_name, self.model_version, seq.scheduled_at - seq.arrival
        )
        encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        room = p.max_tokens if encoder_decoder else self.context_length - len(seq.prompt_ids)
        deadline = seq.deadline

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> Any:
                late = deadline is not None and time.monotonic() >= deadline
                return torch.full((input_ids.shape[0],), state.cancelled or late, dtype=torch.bool)

        ends = set() if p.ignore_eos else set(self.eos_token_ids)
        ends |= set(p.stop_token_ids)
        device = next(self.model.parameters()).device
        prompt = torch.tensor([seq.prompt_ids], device=device)
        with torch.inference_mode():
            out = self.model.generate(  # type: ignore[operator]
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                num_beams=p.num_beams,
                num_return_sequences=1,
                do_sample=False,
                max_new_tokens=max(1, min(p.max_tokens, room)),
                early_stopping=True,
                eos_token_id=sorted(ends) or None,
                pad_token_id=self._pad_id(),
                stopping_criteria=StoppingCriteriaList([_Stop()]),
            )
        tokens = out[0].tolist() if encoder_decoder else out[0, len(seq.prompt_ids) :].tolist()
        if encoder_decoder and tokens and tokens[0] == self._decoder_start():
            tokens = tokens[1:]  # generate's output starts with the decoder start token
        now = time.monotonic()
        reason: FinishReason = "length"
        for i, token in enumerate(tokens):
            seq.output_ids.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self._observe(
                    "on_first_token", self.model_name, self.model_version, now - seq.arrival
                )
            if token in ends:
                self._emit(seq, TokenDelta(token, state.stops.flush()))
                reason = "stop"
                break
            text, hit = state.stops.add(state.detok.add(token))
            if hit:
                self._emit(seq, TokenDelta(token, text))
                reason = "stop"
                break
            last = i == len(tokens) - 1
            self._emit(seq, TokenDelta(token, text + (state.stops.flush() if last else "")))
        error = None
        if state.cancelled:
            reason, error = "cancelled", (DRAIN_ABORTED if self._abort_all else None)
        elif deadline is not None and time.monotonic() >= deadline:
            reason = "timeout"
        self._complete(seq, reason, error)

    def _pad_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else self.eos_token_id

    def _decoder_start(self) -> int | None:
        assert self.model is not None
        start = getattr(self.model.generation_config, "decoder_start_token_id", None)
        return (
            start
            if start is not None
            else getattr(self.model.config, "decoder_start_token_id", None)
        )


def _scores(seq: Seq) -> bool:
    """Whether ``seq`` asks for its prompt's log-probabilities (every position's logits)."""
    return seq.params.prompt_logprobs is not None


def _samples(seq: Seq) -> bool:
    """Whether ``seq`` generates (a prompt scored with ``max_tokens`` 0 does not)."""
    return seq.params.max_tokens > 0


def _deliver(items: list[tuple[RequestStream, Event]]) -> None:
    """Runs on the event loop: put each event on its request's queue."""
    for stream, event in items:
        stream._queue.put_nowait(event)


async def collect(stream: AsyncIterator[Event]) -> tuple[list[TokenDelta], Finished]:
    """Read a stream to its end: the token deltas and the ``Finished`` event."""
    deltas: list[TokenDelta] = []
    async for event in stream:
        if isinstance(event, Finished):
            return deltas, event
        if isinstance(event, TokenDelta):
            deltas.append(event)
    raise GenloopError("the stream ended without a Finished event")  # never, by contract

"""The embedding engine: concurrent ``/v1/embeddings`` requests share forward passes.

A ``masked_lm`` model version is served by an :class:`EmbeddingEngine` around its
:class:`~genloop.models.embeddings.Embedder`. Each request puts its inputs (token ids,
checked by the handler) in one queue and waits for their vectors. One loop on the event
loop runs the forwards, one at a time, each in a worker thread (the event loop stays free
to take requests meanwhile):

    1. wait      until something is queued (then ``batch_wait_s`` more, when set, so that
                 requests arriving together meet in one forward)
    2. take      queued inputs, oldest first, up to ``max_batch_inputs`` of them and
                 ``max_batch_tokens`` padded tokens (inputs × the longest; one input always
                 goes, however long); inputs of requests gone (a client that left, a
                 timeout) are dropped
    3. forward   pad, encode, mean-pool, normalise (``Embedder.forward``) in a thread
    4. answer    each input's vector to its request

While a forward runs, new requests queue; the next forward takes them all together, so
under load forwards fill up without any wait, and a request larger than one forward is
split over several (each mixed with whatever else is queued). ``stats()`` counts forwards,
inputs and requests, and the largest forward so far: how well requests were batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from genloop.serve.engine.types import EngineBusy, EngineStopped

if TYPE_CHECKING:
    import numpy as np

    from genloop.models.embeddings import Embedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingStats:
    running: int  # inputs in the forward now
    waiting: int  # requests with inputs still queued
    max_batch_size: int  # inputs per forward at most
    max_queue: int
    forwards: int  # forward passes run so far
    inputs: int  # inputs embedded so far
    requests: int  # requests answered so far
    largest_batch: int  # the most inputs one forward has held


@dataclass(eq=False)
class _Request:
    queued: int  # its inputs still in the queue
    left: int  # its inputs not embedded yet
    vectors: list[np.ndarray | None]
    done: asyncio.Future[None]
    waiting: bool = True  # counted in EmbeddingEngine._waiting
    gone: bool = False  # cancelled or failed: its queued inputs are dropped


@dataclass(eq=False)
class _Input:
    request: _Request
    index: int
    ids: list[int]


@dataclass
class _Counts:
    forwards: int = 0
    inputs: int = 0
    requests: int = 0
    largest_batch: int = 0
    running: int = 0


@dataclass(eq=False)
class EmbeddingEngine:
    """One loaded embedding model version, batching concurrent requests (module docstring)."""

    embedder: Embedder
    model_name: str
    model_version: int | None
    max_batch_inputs: int = 64
    max_batch_tokens: int = 16_384
    max_queue: int = 64  # requests waiting for a forward before 429
    batch_wait_s: float = 0.0
    _queue: deque[_Input] = field(default_factory=deque, init=False)
    _wake: asyncio.Event | None = field(default=None, init=False)
    _loop: asyncio.Task[None] | None = field(default=None, init=False)
    _waiting: int = field(default=0, init=False)  # requests with inputs still queued
    _stopped: bool = field(default=False, init=False)
    _counts: _Counts = field(default_factory=_Counts, init=False)

    @property
    def hidden_size(self) -> int:
        return self.embedder.hidden_size

    @property
    def context_length(self) -> int:
        return self.embedder.context_length

    @property
    def vocab_size(self) -> int:
        return self.embedder.vocab_size

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (thread-safe: the tokenizer, not the model)."""
        return self.embedder.encode_batch(texts)

    async def start(self) -> None:
        if self._loop is None:
            self._wake = asyncio.Event()
            self._loop = asyncio.create_task(self._run(), name=f"embed-{self.model_name}")

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Unit embeddings (N, H) float32 of checked, non-empty token ids, one row per input.
        Raises EngineBusy (429) with ``max_queue`` requests waiting, EngineStopped (503)
        once draining; cancelling the call drops its inputs not yet embedded."""
        import numpy as np

        if not inputs:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        if self._stopped or self._wake is None:
            raise EngineStopped(f"model {self.model_name} is not accepting requests")
        if self._waiting >= self.max_queue:
            raise EngineBusy(
                f"model {self.model_name} is busy ({self._waiting} requests waiting)",
                retry_after_s=1.0,
            )
        request = _Request(
            queued=len(inputs),
            left=len(inputs),
            vectors=[None] * len(inputs),
            done=asyncio.get_running_loop().create_future(),
        )
        self._waiting += 1
        self._queue.extend(_Input(request, i, ids) for i, ids in enumerate(inputs))
        self._wake.set()
        answered = False
        try:
            await request.done
            answered = True
        finally:
            if not answered:
                request.gone = True
                self._not_waiting(request)
        return np.stack([v for v in request.vectors if v is not None])

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; let queued requests finish, fail what is left at the deadline."""
        self._stopped = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle(), timeout=timeout_s)
        for item in self._queue:
            if not item.request.done.done():
                item.request.done.set_exception(
                    EngineStopped("the server is shutting down or swapping models")
                )
        self._queue.clear()
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    def stats(self) -> EmbeddingStats:
        c = self._counts
        return EmbeddingStats(
            running=c.running,
            waiting=self._waiting,
            max_batch_size=self.max_batch_inputs,
            max_queue=self.max_queue,
            forwards=c.forwards,
            inputs=c.inputs,
            requests=c.requests,
            largest_batch=c.largest_batch,
        )

    # ------------------------------------------------------------------ the loop

    async def _idle(self) -> None:
        while self._queue or self._counts.running:
            await asyncio.sleep(0.01)

    def _not_waiting(self, request: _Request) -> None:
        if request.waiting:
            request.waiting = False
            self._waiting -= 1

    def _take(self) -> list[_Input]:
        """Queued inputs for one forward, oldest first, within the batch limits (step 2)."""
        batch: list[_Input] = []
        longest = 0
        while self._queue and len(batch) < self.max_batch_inputs:
            item = self._queue[0]
            if item.request.gone:
                self._queue.popleft()
                continue
            wider = max(longest, len(item.ids))
            if batch and wider * (len(batch) + 1) > self.max_batch_tokens:
                break
            self._queue.popleft()
            batch.append(item)
            longest = wider
            item.request.queued -= 1
            if item.request.queued == 0:
                self._not_waiting(item.request)
        return batch

    async def _run(self) -> None:
        assert self._wake is not None
        idle = True
        while True:
            await self._wake.wait()
            if idle and self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)  # step 1: let requests meet
            batch = self._take()
            idle = not self._queue
            if idle:
                self._wake.clear()
            if not batch:
                continue
            self._counts.running = len(batch)
            try:
                vectors = await asyncio.to_thread(self.embedder.forward, [b.ids for b in batch])
            except Exception as exc:
                log.exception("embedding forward failed for %s", self.model_name)
                for item in batch:
                    item.request.gone = True  # its inputs still queued are dropped
                    if not item.request.done.done():
                        item.request.done.set_exception(exc)
                continue
            finally:
                c = self._counts
                c.running = 0
                c.forwards += 1
                c.inputs += len(batch)
                c.largest_batch = max(c.largest_batch, len(batch))
            for item, vector in zip(batch, vectors, strict=True):
                request = item.request
                request.vectors[item.index] = vector
                request.left -= 1
                if request.left == 0 and not request.done.done():
                    request.done.set_result(None)
                    self._counts.requests += 1

"""The plain data that crosses the engine's boundary.

Handlers (``serve/api``) and the batch runner talk to an engine through one small
interface (``protocol.TextEngine``): ``engine.submit(request)`` returns an async iterator
of :data:`Event` values (a :class:`PromptLogprobs` first when the request asks for its
prompt's log-probabilities, zero or more :class:`TokenDelta`, then exactly one
:class:`Finished`). Closing the iterator (``aclose()``, or the consuming task being
cancelled, as when a client disconnects) cancels the request; the engine frees its slot
within one decode step.

Nothing here imports torch, so the scheduler and the API can be tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from genloop.errors import GenloopError

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (validated by the API before they get here)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None  # same seed + same prompt + same params = same output
    stop: tuple[str, ...] = ()  # stop strings; the matched one is not part of the output
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS, which always stops
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus the top k
    # the prompt's own log-probabilities (echo with logprobs; lm-evaluation-harness's
    # loglikelihood): None: none; 0: each prompt token's; k: plus the top k at each position.
    # With it, max_tokens may be 0: the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None
    num_beams: int = 1  # > 1: beam search (not streamed)
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None  # time.monotonic() after which it finishes as "timeout"
    grammar: str | None = None  # llguidance grammar the completion must match (grammar.py)


@dataclass(frozen=True)
class TokenDelta:
    """One generated token of one request."""

    token_id: int
    text: str  # text added since the previous delta ("" while a character is incomplete)
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's log-probabilities (``SamplingParams.prompt_logprobs``), sent once, after
    the prompt is prefilled and before the first token: one entry per prompt token, each
    ``log p(prompt[i] | prompt[:i])`` from the model's fp32 ``log_softmax``. The first is None
    (nothing comes before it), as in OpenAI's legacy completions with ``echo``."""

    logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]  # the k likeliest at each position, by text


@dataclass(frozen=True)
class Finished:
    """The last event of every request."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion, stop string removed
    error: str | None = None  # set when reason == "error"


Event = TokenDelta | PromptLogprobs | Finished


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch_size: int
    max_queue: int


class EngineBusy(GenloopError):
    """The waiting queue is full: try again later (429 with Retry-After)."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStopped(GenloopError):
    """The engine is draining or stopped and admits nothing new (503)."""

    http_status = 503


class EngineObserver(Protocol):
    """Timing hooks the engine calls (``monitor.metrics.ServingMetrics`` implements them).

    Called from the engine's thread; implementations must be cheap and thread-safe.
    """

    def on_queued(self, model: str, version: int | None) -> None: ...

    def on_scheduled(self, model: str, version: int | None, queue_s: float) -> None: ...

    def on_first_token(self, model: str, version: int | None, ttft_s: float) -> None: ...

    def on_token(self, model: str, version: int | None, gap_s: float) -> None: ...

    def on_finished(
        self, model: str, version: int | None, finished: Finished, e2e_s: float
    ) -> None: ...

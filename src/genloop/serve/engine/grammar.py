"""Grammar-constrained decoding: each constrained sequence's tokens kept inside its grammar.

The grammar engine is llguidance (``LLMatcher``): the Rust engine behind vLLM's
``guidance`` structured-output backend. It was chosen over xgrammar and outlines-core
because it computes a token mask lazily, per step, in microseconds (an Earley parser over a
derivative-based lexer and a token trie: no grammar pre-compilation against the whole
vocabulary, so a new JSON schema costs milliseconds, not seconds), because it needs neither
torch nor transformers (xgrammar pins both, and triton), and because vLLM ships the same
version, so a grammar built here means the same thing on either engine. Grammars are
llguidance's Lark dialect (``%json {schema}`` embeds a JSON schema); ``serve/api/structured.py``
writes them from ``response_format`` and ``tools``.

Per engine (:class:`GrammarCompiler`): the tokenizer's byte-level vocabulary is read once
(``llguidance.hf.from_tokenizer`` hands the fast tokenizer's own ``tokenizer.json`` to the
Rust side, which undoes the byte-level BPE alphabet, ``Ġ`` → ``b" "``, and byte-fallback
tokens), and compiled grammars are kept in an LRU keyed by their text: a request deep-copies
its grammar's pristine matcher (a microsecond).

Per step (the engine's hook, :class:`ConstrainedRows`): the masks of the constrained rows
are computed together (``LLExecutor``, outside the GIL) into one bitmask, unpacked and
turned into an additive bias (0 or -inf, by ``log`` of the bits: branch-free, as a masked
fill over a mixed mask costs a branch misprediction per element, 0.6 ms a step for 16
rows of 8k tokens) on the worker thread, and added to those rows' logits only;
unconstrained rows, and batches without a constrained row, are not touched. After
sampling, each matcher consumes its row's token; the engine finishes the sequence when its
grammar has terminated (:attr:`Constraint.finished`), end-of-text token or not.

Budget. A model that wanders (an untrained one writes one long string) would run into
``max_tokens`` with half a JSON document. So, near the end of its budget, a constrained
sequence keeps at hand a short way to finish from where it is (``_closing_path``: close the
open string, arrays and objects, write the required properties still missing with their
smallest values, a byte at a time, then say those bytes in the vocabulary's tokens) and,
once that way needs all the tokens left, follows it; a token after which no way would fit
any more is swapped for the first of the way from before it (the matcher rolls back one
token). A sequence whose budget holds its grammar's shortest document thus ends with
``stop`` (a string perhaps cut short); one whose budget does not ends with ``length``, its
text not claimed to be valid. The way found is short, not proven shortest, and is watched
only within a window of the budget (``CLOSE_WINDOW``, or twice the shortest document): a
grammar whose one token can open more than that (deeply nested required objects) may
still end on ``length``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import llguidance
    import torch

    from genloop.serve.engine.sampling import Sampled

GRAMMAR_CACHE = 64  # compiled grammars kept per engine
CLOSE_MARGIN = 2  # tokens of slack when deciding that the budget calls for closing now
CLOSE_WINDOW = 64  # ... kept fresh once the budget is within this (or 2 shortest) of it
# what to prefer, one byte at a time, on the way to the end: close before opening, the
# smallest value before a bigger one (outside a string; inside one, its closing quote first)
_CLOSE_ORDER = b'}]",0fnt[{'
_REUSE = 3  # tokens of the last way that a sampled token may have taken
_IN_STRING_ORDER = b'"'


class GrammarError(GenloopError):
    """A grammar (a schema, a tool definition) the grammar engine refuses (400)."""


def check_grammar(grammar: str) -> list[str]:
    """Validate ``grammar`` without a tokenizer; the errors (empty: valid). Thread-safe and
    free of the GIL while llguidance works, so callers run it off the event loop."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return list(messages) if is_error else []


@dataclass
class _Compiled:
    matcher: llguidance.LLMatcher  # pristine: requests deep-copy it
    shortest: int | None  # tokens of the shortest document (None: none found in the limit)


class GrammarCompiler:
    """One engine's grammar side: its tokenizer for llguidance, compiled grammars (LRU)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the width of the model's logits
        self.eos_token_ids = sorted(int(i) for i in eos_token_ids)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Compiled] = OrderedDict()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._worker: ThreadPoolExecutor | None = None  # computes masks during forwards
        self._byte_tokens: dict[int, int] = {}  # byte value → its single-byte token id
        self._text_probes: list[int] = []  # bytes that only free text allows together
        self._close_order: list[int] = []
        self._string_order: list[int] = []
        self._fallback: list[int] = []

    # ------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """The byte-level vocabulary as llguidance reads it, built on first use (a fast
        tokenizer's JSON goes to the Rust side; about a second for 150k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build_tokenizer()
            return self._tokenizer

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        import llguidance
        import llguidance.hf

        tok = self._hf_tokenizer
        if getattr(tok, "backend_tokenizer", None) is None:
            raise GrammarError(
                "structured outputs need a fast (Rust) tokenizer, and this model's tokenizer "
                f"is {type(tok).__name__}; save the model with a tokenizer.json"
            )
        if len(tok) > self.vocab_size:
            raise GrammarError(
                f"the tokenizer has {len(tok)} tokens but the model's logits only "
                f"{self.vocab_size}: structured outputs cannot map one onto the other"
            )
        eos: list[int] | int | None = self.eos_token_ids or None
        ll = llguidance.hf.from_tokenizer(tok, n_vocab=self.vocab_size, eos_token=eos)
        self._executor = llguidance.LLExecutor()
        # single-byte tokens, for the shortest way to finish (byte-level BPE has all 256)
        for token in range(len(tok)):
            if ll.is_special_token(token):
                continue
            raw = ll.decode_bytes([token])
            if len(raw) == 1 and raw[0] not in self._byte_tokens:
                self._byte_tokens[raw[0]] = token
        byte_ids = self._byte_tokens
        self._text_probes = [byte_ids[b] for b in b"aZ }" if b in byte_ids]
        self._close_order = [byte_ids[b] for b in _CLOSE_ORDER if b in byte_ids]
        self._string_order = [byte_ids[b] for b in _IN_STRING_ORDER if b in byte_ids]
        self._fallback = [byte_ids[b] for b in sorted(byte_ids)]
        return ll

    # ------------------------------------------------------------------ grammars

    def compile(self, grammar: str) -> _Compiled:
        """The compiled ``grammar`` (from the LRU, or built now: milliseconds for a schema).
        Raises :class:`GrammarError` with llguidance's reason for one it refuses."""
        import llguidance

        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        ll = self.tokenizer
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar is invalid: {matcher.get_error()}")
        path = self._closing_path(matcher, limit=4096)
        compiled = _Compiled(matcher, None if path is None else len(path))
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > GRAMMAR_CACHE:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher over ``grammar`` for one request."""
        compiled = self.compile(grammar)
        return Constraint(self, compiled.matcher.deep_copy(), compiled.shortest)

    # ------------------------------------------------------------------ closing

    def _allowed(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        """(V,) bool: the tokens ``matcher`` allows next."""
        packed = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(packed, bitorder="little")[: self.vocab_size].astype(bool)

    def _closing_token(self, m: llguidance.LLMatcher) -> int:
        """The next token on a short way to the end of the grammar, one byte at a time,
        checked candidate by candidate (a fraction of a microsecond each), not by a mask;
        -1 when none of the closing bytes fits."""

        def ok(token: int) -> bool:
            return m.validate_tokens([token]) == 1

        in_text = all(ok(t) for t in self._text_probes)  # a JSON string, or free text
        for token in (*self._string_order, *self._close_order) if in_text else self._close_order:
            if ok(token):
                return token
        return -1

    def _fallback_token(self, m: llguidance.LLMatcher) -> int | None:
        """Any allowed token, single bytes first (the lowest)."""
        for token in self._fallback:
            if m.validate_tokens([token]) == 1:
                return token
        ids = np.flatnonzero(self._allowed(m))  # no single byte fits (a special token)
        return int(ids[0]) if ids.size else None

    def _closing_path(self, matcher: llguidance.LLMatcher, limit: int) -> list[int] | None:
        """The tokens of a short way from ``matcher``'s state to the end of its grammar (at
        most ``limit``; None when there is none that short). Forced stretches (a property
        name, the rest of ``true``) go in as llguidance's fast-forward tokens; the bytes
        found are then said in the vocabulary's fewer tokens where it has them."""
        m = matcher.deep_copy()
        path: list[int] = []
        end: list[int] = []
        while not m.is_stopped():
            if len(path) > 4 * limit + 64:  # bytes; far more than any tokenization fits
                return None
            if m.is_accepting() and self.eos_token_ids:
                end = self.eos_token_ids[:1]
                break
            token: int | None = self._closing_token(m)
            if token is not None and token < 0:  # a forced stretch (a property name, a tag)
                forced = m.compute_ff_tokens()
                if forced:
                    if not m.consume_tokens(forced):
                        return None
                    path += forced
                    continue
                token = self._fallback_token(m)
            if token is None or not m.consume_token(token):
                return None
            path.append(token)
        tokens = self.tokenizer.tokenize_bytes(self.tokenizer.decode_bytes(path))
        if len(tokens) < len(path) and matcher.validate_tokens(tokens) == len(tokens):
            path = tokens
        path += end
        return path if len(path) <= limit else None

    def ends(self, matcher: llguidance.LLMatcher, way: list[int]) -> bool:
        """Whether the tokens ``way`` take ``matcher`` to the end of its grammar."""
        eos = self.eos_token_ids
        if not eos:
            m = matcher.deep_copy()
            return m.consume_tokens(way) and m.is_stopped()
        tokens = way if way and way[-1] in eos else [*way, eos[0]]
        return matcher.validate_tokens(tokens) == len(tokens)

    # ------------------------------------------------------------------ batches

    def fill_masks(self, constraints: Sequence[Constraint]) -> np.ndarray:
        """(k, V) bool: the tokens each constraint allows next, computed by llguidance's
        executor outside the GIL (so it overlaps the model's forward, ``ConstrainedRows``)."""
        import llguidance.numpy as llnp

        assert self._executor is not None  # built with the tokenizer, before any matcher
        bitmask = llnp.allocate_token_bitmask(len(constraints), self.vocab_size)
        llnp.fill_next_token_bitmask_par(
            self._executor, [(c.matcher, i) for i, c in enumerate(constraints)], bitmask
        )
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        return bits[:, : self.vocab_size].view(bool)

    def fill_masks_soon(
        self, constraints: Sequence[Constraint]
    ) -> Future[tuple[np.ndarray, np.ndarray]]:
        """:meth:`fill_masks` and their additive bias (k, V) float32, 0 where allowed and
        -inf elsewhere, on the compiler's worker thread (numpy's ``log`` of the bits runs
        outside the GIL)."""
        with self._lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="genloop-grammar")
        return self._worker.submit(self._masks_and_bias, list(constraints))

    def _masks_and_bias(self, constraints: Sequence[Constraint]) -> tuple[np.ndarray, np.ndarray]:
        allowed = self.fill_masks(constraints)
        with np.errstate(divide="ignore"):
            return allowed, np.log(allowed.astype(np.float32))


class Constraint:
    """One sequence's grammar state: its matcher, and a way to the end near the budget."""

    def __init__(
        self, compiler: GrammarCompiler, matcher: llguidance.LLMatcher, shortest: int | None
    ) -> None:
        self.compiler = compiler
        self.matcher = matcher
        self._way: list[int] | None = None  # a way to the end from the current state
        self._known = shortest or 0  # the length of the last way found
        # how far from the budget a way to the end is kept at hand: one token can open a
        # new item or call, which lengthens the way by up to about a whole document
        self._window = CLOSE_MARGIN + max(CLOSE_WINDOW, 2 * self._known)
        self._hopeless = False  # no way to the end fits the budget (nor will it again)
        self.forced: list[int] = []  # closing: the tokens still to take, in order

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more: the sequence ends here."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def _near(self, remaining: int) -> bool:
        return remaining <= self._known + self._window

    def _find(self, remaining: int) -> list[int] | None:
        way = self.compiler._closing_path(self.matcher, limit=remaining)
        self._way, self._hopeless = way, way is None
        if way is not None:
            self._known = len(way)
        return way

    def _still_ends(self, way: list[int], remaining: int) -> bool:
        """Whether ``way`` (found in an earlier state) ends the grammar from this one, too,
        which spares a search inside a long string: llguidance checks it without moving
        (a microsecond or two); an end-of-text token after it is allowed only if it ends."""
        if len(way) > remaining:
            return False
        return self.compiler.ends(self.matcher, way)

    def close(self, remaining: int) -> int | None:
        """The token this step must take so that the grammar still ends within
        ``remaining`` tokens (this one included), or None: the model chooses."""
        if self.forced:
            return self.forced[0]
        if self._hopeless or not self._near(remaining):
            return None  # far from the budget (nothing to compute), or past saving
        way = self._way if self._way is not None else self._find(remaining)
        if way and len(way) + CLOSE_MARGIN >= remaining:
            self.forced = list(way)
            return way[0]
        return None

    def advance(self, token: int, remaining: int) -> int:
        """Consume the sampled ``token`` (``remaining`` counts it); returns the token taken.

        Near the budget, a token after which the grammar could no longer end in time is
        swapped for the first of a way to the end from before it (the matcher is rolled
        back one token), and that way is followed to its end.
        """
        if self.forced:
            if token == self.forced[0] and self.matcher.consume_token(token):
                self.forced.pop(0)
                self._way = list(self.forced)
                return token
            self.forced = []  # off the way (cannot happen under the mask)
        before, self._way = self._way, None
        if not self.matcher.consume_token(token):
            return token  # an error state: the engine fails the request with it
        if self._hopeless or not self._near(remaining - 1):
            return token
        if before is not None:
            # the way from before this token, or its rest when the token was its start
            for skip in range(min(_REUSE, len(before)) + 1):
                if self._still_ends(before[skip:], remaining - 1):
                    self._way = before[skip:]
                    return token
        if self._find(remaining - 1) is not None:
            return token
        # no way to the end fits after this token: take one from before it instead
        self.matcher.rollback(1)
        way = self._find(remaining)
        if not way or not self.matcher.consume_token(way[0]):
            if not self.matcher.is_error():
                self.matcher.consume_token(token)
            self._way, self._hopeless = None, True
            return token
        self.forced = way[1:]
        self._way = list(self.forced)
        return way[0]


# ------------------------------------------------------------------------ the step hook


class ConstrainedRows:
    """The constrained rows of one engine step: their masks computed while the model runs
    (:meth:`start`), applied to the logits before sampling (:meth:`mask`), the matchers
    advanced after (:meth:`advance`).

    ``rows[i]`` is the row of the step's logits (N, V) of ``constraints[i]``, which has
    ``remaining[i]`` tokens of budget left, this step's included.
    """

    def __init__(
        self, rows: list[int], constraints: list[Constraint], remaining: list[int]
    ) -> None:
        self.rows = rows
        self.constraints = constraints
        self.remaining = remaining
        self._masks: Future[tuple[np.ndarray, np.ndarray]] | None = None

    @staticmethod
    def find(
        seqs: Sequence[Any],
        constraint_of: Callable[[Any], Constraint | None],
        remaining_of: Callable[[Any], int],
    ) -> ConstrainedRows | None:
        """The constrained rows among ``seqs`` (one per logits row); None when there are
        none, so that a batch without one pays for nothing else."""
        found = [(i, c) for i, c in enumerate(map(constraint_of, seqs)) if c is not None]
        if not found:
            return None
        return ConstrainedRows(
            [i for i, _ in found], [c for _, c in found], [remaining_of(seqs[i]) for i, _ in found]
        )

    def start(self) -> None:
        """Start computing the masks (on another thread, outside the GIL): they depend only
        on the tokens taken so far, so they are ready by the time the logits are."""
        self._masks = self.constraints[0].compiler.fill_masks_soon(self.constraints)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (N, V) with -inf where each row's grammar forbids a token next (a new
        tensor: the runner's may be an inference tensor); a row whose budget calls for
        closing allows only the next token of its way to the end."""
        import torch

        constraints = self.constraints
        compiler = constraints[0].compiler
        if self._masks is None:
            self.start()
        assert self._masks is not None
        allowed, bias = self._masks.result()  # (k, V) bool, and 0 / -inf float32
        for i, c in enumerate(constraints):
            forced = c.close(self.remaining[i])
            if forced is not None and allowed[i, forced]:
                bias[i] = -np.inf
                bias[i, forced] = 0.0
            elif forced is not None:
                c.forced = []  # the mask disagrees with the way (cannot happen): it chooses
            if not allowed[i].any():  # a matcher in an error state allows nothing
                bias[i, compiler.eos_token_ids[:1] or [0]] = 0.0  # the engine says why
        extra = torch.from_numpy(bias[:, : logits.shape[1]]).to(logits.device, logits.dtype)
        if self.rows == list(range(logits.shape[0])):  # every row constrained
            return logits + extra
        index = torch.tensor(self.rows, device=logits.device)
        return logits.index_copy(0, index, logits.index_select(0, index).add_(extra))

    def advance(self, logits: torch.Tensor, picked: list[Sampled]) -> None:
        """Each row's matcher consumes its sampled token; where the budget made it swap
        the token, ``picked`` gets the swapped one (with its logprob, when asked for)."""
        import torch

        from genloop.serve.engine.sampling import Sampled

        for row, c, left in zip(self.rows, self.constraints, self.remaining, strict=True):
            choice = picked[row]
            taken = c.advance(choice.token_id, left)
            if taken != choice.token_id:
                logprob = None
                if choice.logprob is not None:
                    logprob = float(torch.log_softmax(logits[row].float(), dim=-1)[taken])
                picked[row] = Sampled(taken, logprob, choice.top)

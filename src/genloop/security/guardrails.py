"""Checks on every request and response: blocklists, prompt-injection flags, PII redaction
for logs, and a cut for runaway repetition.

A check never raises on odd input: it returns a :class:`Verdict` with ``flags`` (for the
request log) and, where the config says to refuse, ``refused`` with a ``message`` the
server sends back. What each check does:

* **Blocklists** (``blocklist_input``, ``blocklist_output``): whole words or phrases,
  case-insensitive, matched after Unicode NFKC folding with zero-width characters removed
  (so ``ＢＡＤ`` and ``b\\u200bad`` match ``bad``); "class" does not match "classic".
  ``on_violation: refuse`` refuses the prompt (or withholds the response); ``flag`` only
  flags it.
* **Prompt injection** (``injection_heuristics``): phrases typical of attempts to override
  instructions or extract the system prompt, and chat-template control tokens in user
  text. Heuristics catch the common forms and miss paraphrases, so they only ever flag,
  never refuse.
* **PII in logs** (``redact_pii_in_logs``): :meth:`Guardrails.redact` replaces emails,
  phone numbers, IPs, card numbers and secrets (``genloop.security.pii``) before text is logged.
* **Repetition** (``max_repetition``): :class:`RepetitionGuard` watches a stream of
  generated text and says when the same line, word n-gram (n ≤ 8) or short character
  pattern has repeated ``max_repetition`` times in a row.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from genloop.security import pii

if TYPE_CHECKING:
    from genloop.config import GuardrailsConfig

MAX_CHECKED_CHARS = 1_000_000  # longer texts are checked on their first million characters

# zero-width and invisible formatting characters used to split words past a filter
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u2060\ufeff"), None)


def normalize(text: str) -> str:
    """NFKC, invisible characters removed, case-folded: what blocklists match against."""
    return unicodedata.normalize("NFKC", text[:MAX_CHECKED_CHARS]).translate(_INVISIBLE).casefold()


@dataclass(frozen=True)
class Verdict:
    """``flags`` go to the request log; ``refused`` with ``message`` goes to the client."""

    flags: list[str] = field(default_factory=list)
    refused: bool = False
    message: str | None = None


_INJECTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE | re.MULTILINE))
    for name, pattern in (
        (
            "injection:override",
            r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?"
            r"\b(?:previous|prior|above|earlier|preceding|all|any|your|the|system)\b[^.\n]{0,20}?"
            r"\b(?:instructions?|prompts?|rules|directions|guidelines|context|messages?)\b",
        ),
        (
            "injection:exfiltration",
            r"\b(?:reveal|print|show|repeat|output|display|leak|tell me|what(?:'s| is| are))\b"
            r"[^.\n]{0,40}?\b(?:system|initial|original|hidden|secret)\s+"
            r"(?:prompt|instructions?|message|rules)\b"
            r"|\brepeat\b[^.\n]{0,30}?\b(?:words|text|everything)\s+(?:above|before)\b",
        ),
        (
            "injection:role",
            r"\byou\s+are\s+now\s+(?:in\s+)?(?:dan|developer\s+mode|jailbroken|unrestricted|"
            r"an?\s+unfiltered)\b|\b(?:enable|activate|enter)\s+(?:dan|developer|god)\s+mode\b"
            r"|\bdo\s+anything\s+now\b",
        ),
        (
            "injection:control_tokens",
            r"<\|(?:im_start|im_end|system|endoftext|begin_of_text|start_header_id|"
            r"eot_id)\|>|\[/?INST\]|<</?SYS>>|^\s*(?:###\s*)?system\s*:",
        ),
    )
)


def _blocklist_pattern(terms: list[str]) -> re.Pattern[str] | None:
    words = sorted({normalize(t).strip() for t in terms if t.strip()}, key=len, reverse=True)
    if not words:
        return None
    # a whole word or phrase: not preceded or followed by a word character
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)")


class Guardrails:
    """The configured checks, compiled once and shared by every request."""

    def __init__(self, cfg: GuardrailsConfig) -> None:
        self.cfg = cfg
        self._block_in = _blocklist_pattern(cfg.blocklist_input)
        self._block_out = _blocklist_pattern(cfg.blocklist_output)

    def check_input(self, text: str) -> Verdict:
        """Blocklist and injection checks on a prompt (all of a chat's user text)."""
        flags: list[str] = []
        if self.cfg.injection_heuristics:
            flags += injection_flags(text)
        if self._block_in is not None and self._block_in.search(normalize(text)):
            flags.append("blocklist:input")
            if self.cfg.on_violation == "refuse":
                return Verdict(
                    flags,
                    True,
                    "the request was refused: the prompt contains blocked content",
                )
        return Verdict(flags)

    def check_output(self, text: str) -> Verdict:
        """Blocklist check on a response (or the text streamed so far)."""
        if self._block_out is not None and self._block_out.search(normalize(text)):
            refuse = self.cfg.on_violation == "refuse"
            message = "the response was withheld: it contains blocked content" if refuse else None
            return Verdict(["blocklist:output"], refuse, message)
        return Verdict()

    def redact(self, text: str) -> str:
        """``text`` as it may be logged: PII replaced by placeholders (when configured)."""
        return pii.redact(text) if self.cfg.redact_pii_in_logs else text

    def repetition_guard(self) -> RepetitionGuard:
        """A fresh guard for one generated stream (it never cuts when the check is off)."""
        return RepetitionGuard(self.cfg.max_repetition)


def injection_flags(text: str) -> list[str]:
    """The names of the injection patterns ``text`` matches (empty: none)."""
    sample = unicodedata.normalize("NFKC", text[:MAX_CHECKED_CHARS]).translate(_INVISIBLE)
    return [name for name, pattern in _INJECTION_PATTERNS if pattern.search(sample)]


_WORD_RE = re.compile(r"\S+")
_MAX_NGRAM = 8
_MAX_CHAR_PERIOD = 16
_MIN_CHAR_SPAN = 256  # separators like '-' * 80 are ordinary; a pattern this long is not
_MAX_LINE = 4096  # lines are compared on at most their last this many characters


class RepetitionGuard:
    """Feed generated text as it streams; :meth:`feed` returns True once it runs away.

    Runaway means the same thing ``max_repetition`` times in a row: a non-blank line; a
    word n-gram (n ≤ 8, so "the the the…" and "I am sorry. I am sorry. …"); or, inside
    one long word, a pattern of up to 16 characters over 256+ characters ("abcabc…").
    ``max_repetition=None`` never cuts. Work per call is bounded by the size of the delta.
    """

    def __init__(self, max_repetition: int | None) -> None:
        if max_repetition is not None and max_repetition < 2:
            raise ValueError("max_repetition must be ≥ 2 (or None)")
        self.max_repetition = max_repetition
        self.cut = False
        self._line = ""  # the line being written
        self._last_line: str | None = None
        self._line_run = 0
        self._words: list[str] = []  # the most recent complete words
        self._partial = ""  # a word not finished yet (no whitespace after it)

    def feed(self, delta: str) -> bool:
        if self.cut or self.max_repetition is None or not delta:
            return self.cut
        k = self.max_repetition
        # lines
        parts = (self._line + delta).split("\n")
        self._line = parts.pop()[-_MAX_LINE:]
        for line in parts:
            key = line.strip()
            if not key:
                continue
            self._line_run = self._line_run + 1 if key == self._last_line else 1
            self._last_line = key
            if self._line_run >= k:
                self.cut = True
                return True
        # words: whatever follows the last whitespace may still grow
        text = self._partial + delta
        words = _WORD_RE.findall(text)
        if words and not text[-1].isspace():
            self._partial = words.pop()[-(_MAX_CHAR_PERIOD * max(k, _MIN_CHAR_SPAN) + 1) :]
        else:
            self._partial = ""
        keep = _MAX_NGRAM * k
        for word in words:
            self._words.append(word)
            if len(self._words) > 2 * keep:
                del self._words[:-keep]
            if self._ngram_loop(k):
                self.cut = True
                return True
        if len(self._partial) >= _MIN_CHAR_SPAN and _char_loop(self._partial, k):
            self.cut = True
        return self.cut

    def _ngram_loop(self, k: int) -> bool:
        w = self._words
        for n in range(1, _MAX_NGRAM + 1):
            if len(w) < n * k:
                break
            unit = w[-n:]
            if all(w[-(i + 1) * n : len(w) - i * n] == unit for i in range(1, k)):
                return True
        return False


def _char_loop(tail: str, k: int) -> bool:
    for p in range(1, _MAX_CHAR_PERIOD + 1):
        span = p * max(k, -(-_MIN_CHAR_SPAN // p))  # k repeats, and 256+ characters
        if len(tail) >= span and tail[-span:] == tail[-p:] * (span // p):
            return True
    return False

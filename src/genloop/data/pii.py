"""Find and redact personal data and credentials in text.

Kinds and their placeholders: ``email`` → ``<EMAIL>``, ``phone`` → ``<PHONE>``, ``ip`` →
``<IP>``, ``card`` → ``<CARD>``, ``secret`` → ``<SECRET>``. :func:`find_pii` answers where,
:func:`redact` replaces, :class:`RedactPII` is the data-preparation step; the monitor's
request logs and feedback curation reuse the first two.

Two properties matter and are tested: planted values of every kind never survive, and
ordinary prose and source code (versions like 3.11.7, dates, years, hex colours, slices
like ``a[1::2]``, ``127.0.0.1``) come out unchanged. So candidates are found by regexes
and then validated: IPs with :mod:`ipaddress`, cards with the Luhn check, phone numbers
by their digit count, tokens by their documented prefixes.

What is deliberately kept: loopback, unspecified, broadcast and netmask IPv4 addresses,
IPv6 loopback/unspecified and slice-like forms made of at most two decimal groups
(``1::2``); phone numbers written without separators or ``+``; ``key=value`` secrets
whose unquoted value has no digit (``token=next_token``) or is shorter than 8 characters.
Email local parts are taken from the characters ``A-Z a-z 0-9 . ! # $ % & * + ? ^ _ ~ -``;
an RFC 5322 address that also uses ``' = / ` { | }`` keeps the part before the last of
those (``o'<EMAIL>``), so a quote or ``=`` just before an address in code survives.

Speed: each kind costs one scan, skipped when a cheap substring test says the text cannot
contain it ('@' for emails, ':' for IPv6 …).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from genloop.data.records import Dropped, Record

PIIKind = Literal["email", "phone", "ip", "card", "secret"]
KINDS: tuple[PIIKind, ...] = ("email", "phone", "ip", "card", "secret")
PLACEHOLDERS: dict[str, str] = {k: f"<{k.upper()}>" for k in KINDS}

Span = tuple[int, int]

# ---------------------------------------------------------------------------- emails

_LOCAL_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.!#$%&*+?^_~-"
)
# After the '@': labels, then a TLD that starts with a letter (``com``, ``xn--p1ai``).
_DOMAIN_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])(?![A-Za-z0-9-])"
)


def _emails(text: str) -> Iterable[Span]:
    # Anchored on each '@' (rare) instead of a regex that would start at every letter.
    at = text.find("@")
    while at != -1:
        domain = _DOMAIN_RE.match(text, at + 1)
        if domain:
            start = at
            while start > 0 and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            if start < at:
                yield start, domain.end()
        at = text.find("@", at + 1)


# ---------------------------------------------------------------------- phone numbers

# One regex per shape, each starting with a literal or a digit class: the regex engine
# then skips ahead to candidate characters (a leading lookbehind would disable that, so the
# "not inside a longer token" checks come after the first character).
_PHONE_RES = (
    # +44 20 7946 0958, +1-555-123-4567, +1 (555) 123-4567, +15551234567
    re.compile(r"\+(?<![\w+]\+)\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}(?![\w(])"),
    # (555) 123-4567, (555)123-4567
    re.compile(r"\((?<![\w(]\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?![\w-]|\.\d)"),
    # 555-123-4567, 555.123.4567 (one separator throughout, so 3.11.7-like strings fail)
    re.compile(r"[0-9](?<![\w.+-][0-9])\d{2}(?P<sep>[-.])\d{3}(?P=sep)\d{4}(?![\w-]|\.\d)"),
)


def _phones(text: str) -> Iterable[Span]:
    for pattern in _PHONE_RES:
        for m in pattern.finditer(text):
            digits = sum(c.isdigit() for c in m.group())
            if 10 <= digits <= 15 or (m.group()[0] == "+" and 8 <= digits <= 15):
                yield m.span()


# ------------------------------------------------------------------------------- IPs

_IPV4_RE = re.compile(r"[0-9](?<![\w.][0-9])\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)")
# IPv6 is found from its colons (rare in pairs) and widened to the hex digits before them.
_IPV6_RE = re.compile(r":[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*(?:%[0-9A-Za-z_.-]+)?")
_HEX = frozenset("0123456789abcdefABCDEF")
_DECIMAL_GROUP_RE = re.compile(r"[0-9]{1,4}")


def _is_public_ipv4(address: ipaddress.IPv4Address) -> bool:
    if address.is_loopback or address.is_unspecified:
        return False
    bits = int(address)
    inverted = bits ^ 0xFFFFFFFF
    return bits == 0 or (inverted & (inverted + 1)) != 0  # netmasks: 1…10…0 are kept


def _ips(text: str) -> Iterable[Span]:
    if "." in text:
        for m in _IPV4_RE.finditer(text):
            try:
                address = ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            if _is_public_ipv4(address):
                yield m.span()
    if "::" in text or (":" in text and _IPV6_RE.search(text)):
        pos = 0
        while m := _IPV6_RE.search(text, pos):
            start, end = m.span()
            pos = end
            while start > m.start() - 4 and start > 0 and text[start - 1] in _HEX:
                start -= 1
            if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:.%"):
                continue
            if end < len(text) and (text[end].isalnum() or text[end] in "_:"):
                continue
            candidate = text[start:end]
            while candidate.endswith("."):  # a full stop after the address
                candidate = candidate[:-1]
                end -= 1
            if _is_public_ipv6(candidate):
                yield start, end


def _is_public_ipv6(candidate: str) -> bool:
    try:
        address = ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return False
    groups = [g for g in candidate.split("%")[0].split(":") if g]
    # 1::2, ::3: a slice far more often than an address
    return len(groups) > 2 or not all(_DECIMAL_GROUP_RE.fullmatch(g) for g in groups)


# ------------------------------------------------------------------------------ cards

_CARD_RE = re.compile(r"[2-6](?<![\w.,+-][2-6])\d{3}(?:[ -]?\d){9,15}(?!\d)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cards(text: str) -> Iterable[Span]:
    for m in _CARD_RE.finditer(text):
        candidate = m.group()
        # The longest prefix that ends at a group boundary and passes Luhn: a card followed
        # by another number ("4111 1111 1111 1111 2024") is still found.
        for end in range(len(candidate), 0, -1):
            if end < len(candidate) and candidate[end] not in " -":
                continue
            digits = candidate[:end].replace(" ", "").replace("-", "")
            if len(digits) < 13:
                break
            if len(digits) <= 19 and _luhn(digits):
                yield m.start(), m.start() + end
                break


# ---------------------------------------------------------------------------- secrets

# Tokens recognizable by their documented prefixes. All but JWTs (found apart, from their
# "eyJ") are runs of at least 15 characters from [A-Za-z0-9_-], so the text is scanned
# for such runs first (few in prose and code) and each run is matched at its start.
_RUN_RE = re.compile(r"[\w-](?<![\w-][\w-])[\w-]{14,}", re.ASCII)
_TOKEN_RE = re.compile(
    r"A(?:KIA|SIA|BIA|CCA|IDA|ROA|GPA|NPA|NVA|PKA)[0-9A-Z]{16}(?![0-9A-Za-z])"  # AWS key ids
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|gl_(?=[A-Za-z0-9_-]*[0-9-])[A-Za-z0-9_-]{20,}"  # genloop API keys
    r"|xox[abposre]-[A-Za-z0-9-]{10,}"  # Slack
    r"|[spr]k_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe
    r"|sk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}"  # OpenAI-style (sk-…, sk-proj-…)
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
)
_JWT_RE = re.compile(r"eyJ(?<![\w-]eyJ)[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]*", re.ASCII)
# The credentials of an HTTP Authorization header.
_AUTH_RE = re.compile(
    r"(?:[Bb]earer|BEARER|[Bb]asic|BASIC)[ \t]+"
    r"(?P<value>(?=[A-Za-z0-9._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{16,})"
)
_PEM_RE = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?"
    r"(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)

# password=…, "api_key": "…", SECRET_KEY: … — the value is redacted, the name is kept.
# Found from the occurrences of a few words in the lowercased text: a name is an
# identifier that ends with one of the names below, alone or after "_", "-" or ".".
_SECRET_HINTS = ("pass", "pwd", "secret", "token", "key", "credential")
_NAME_TAIL_RE = re.compile(r"[a-z0-9_.-]*(?=[\"']?[ \t]*[:=])")
_SECRET_NAME_RE = re.compile(
    r"(?:[a-z0-9_.-]*[_.-])?(?:pass(?:word|wd|phrase)|pwd|secret|token|credentials?|"
    r"(?:api|access|secret|private)[_-]?key|apikey)"
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_SECRET_VALUE_RE = re.compile(
    r"[\"']?[ \t]*[:=][ \t]*"
    r"(?:[bBrRuU]?(?P<q>[\"'])(?P<quoted>[^\"'\s]{8,})(?P=q)"
    r"|(?P<bare>(?=[\w+/=~!@#$%^&*-]*\d)[\w+/=~!@#$%^&*-]{8,}))"
)


def _secrets(text: str) -> Iterable[Span]:
    if "-----BEGIN" in text:
        for m in _PEM_RE.finditer(text):
            yield m.span()
    for m in _RUN_RE.finditer(text):
        token = _TOKEN_RE.match(text, m.start(), m.end())
        if token:
            yield token.span()
    if "eyJ" in text:
        for m in _JWT_RE.finditer(text):
            yield m.span()
    for m in _AUTH_RE.finditer(text):
        yield m.span("value")
    yield from _assignments(text)


def _assignments(text: str) -> Iterable[Span]:
    lowered = text.lower()
    if len(lowered) != len(text):  # a few characters lowercase to two; keep offsets exact
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    for hint in _SECRET_HINTS:
        i = lowered.find(hint)
        while i != -1:
            tail = _NAME_TAIL_RE.match(lowered, i + len(hint))
            i = lowered.find(hint, i + 1)
            if not tail:
                continue  # not followed by ":" or "="
            start, end = i, tail.end()
            start = tail.start() - len(hint)
            while start > 0 and lowered[start - 1] in _NAME_CHARS:
                start -= 1
            if _SECRET_NAME_RE.fullmatch(lowered, start, end):
                value = _SECRET_VALUE_RE.match(text, end)
                if value:
                    yield value.span("quoted") if value.group("quoted") else value.span("bare")


# ------------------------------------------------------------------------------ API

_FINDERS = {"email": _emails, "phone": _phones, "ip": _ips, "card": _cards, "secret": _secrets}


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in _FINDERS]
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; valid kinds: {', '.join(KINDS)}")
    return kinds


def find_pii(text: str, kinds: Sequence[str] = KINDS) -> list[tuple[str, Span]]:
    """Where ``text`` holds PII: ``[(kind, (start, end)), …]`` in text order, no overlaps.

    Where two findings overlap, the one that starts first (then the longer) wins.
    """
    found: list[tuple[int, int, str]] = []
    for kind in _check_kinds(kinds):
        found.extend((start, end, kind) for start, end in _FINDERS[kind](text))
    found.sort(key=lambda f: (f[0], -f[1]))
    out: list[tuple[str, Span]] = []
    last_end = -1
    for start, end, kind in found:
        if start >= last_end:
            out.append((kind, (start, end)))
            last_end = end
    return out


def redact(text: str, kinds: Sequence[str] = KINDS) -> str:
    """``text`` with each finding of :func:`find_pii` replaced by its placeholder."""
    spans = find_pii(text, kinds)
    if not spans:
        return text
    parts: list[str] = []
    pos = 0
    for kind, (start, end) in spans:
        parts += (text[pos:start], PLACEHOLDERS[kind])
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


class RedactPII:
    """Replace emails, phone numbers, IPs, card numbers and secrets with placeholders."""

    name = "pii"

    def __init__(self, kinds: Sequence[str] = KINDS) -> None:
        self.kinds = _check_kinds(kinds)

    def __call__(self, record: Record) -> Record | Dropped:
        if not record.text:
            return record
        text = redact(record.text, self.kinds)
        if text != record.text:
            record.text = text
        return record

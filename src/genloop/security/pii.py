"""Find and redact personal data and credentials in text.

Kinds and their placeholders: ``email`` → ``<EMAIL>``, ``phone`` → ``<PHONE>``, ``ip`` →
``<IP>``, ``card`` → ``<CARD>``, ``secret`` → ``<SECRET>``. :func:`find_pii` answers where,
:func:`redact` replaces. Request logs (the guardrails), feedback curation and data
preparation (the ``pii`` step, :class:`genloop.data.pii.RedactPII`) all use these two.

Two properties matter and are tested: planted values of every kind never survive, and
ordinary prose and source code (versions like 3.11.7, dates, years, hex colours, slices
like ``a[1::2]``, ``127.0.0.1``) come out unchanged. So candidates found by regexes are
validated: IPs with :mod:`ipaddress`, cards with the Luhn check, phone numbers by their
digit count, tokens by their documented prefixes.

Deliberately kept: IPv4 loopback, 0.0.0.0/8, netmasks and broadcast, and dotted quads
that read as section or version numbers (first part below 10 and every part below 100:
8.2.4.44, 2.7.2.2); IPv6 loopback/unspecified and slice-like forms of at most two decimal
groups (``1::2``); phone numbers without separators unless written ``+`` and 10–15
digits; ``name=value`` secrets whose unquoted value has no digit (``token=next_token``)
or that are shorter than 8 characters. Email local parts are taken from
``A-Z a-z 0-9 . ! # $ % & * + ? ^ _ ~ -``: an RFC 5322 address that also uses
``' = / ` { | }`` keeps what precedes the last of those (``o'<EMAIL>``), which is what
lets ``x='ann@example.com'`` keep its quote.

Speed: Python's regex engine skips ahead quickly only to a *literal* first character; a
pattern that starts with a class (``[0-9]``) or a lookbehind tests every position, ~10×
slower. So each pattern here starts with a literal where it can ('@', '+', '(', ':',
'A', 'g', …), the checks for "not inside a longer word" come after the first character,
and the patterns that must start with a digit share one scan.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from typing import Literal

PIIKind = Literal["email", "phone", "ip", "card", "secret"]
KINDS: tuple[PIIKind, ...] = ("email", "phone", "ip", "card", "secret")
PLACEHOLDERS: dict[str, str] = {k: f"<{k.upper()}>" for k in KINDS}

Span = tuple[int, int]
Finding = tuple[int, int, str]  # start, end, kind

# ---------------------------------------------------------------------------- emails

_LOCAL_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.!#$%&*+?^_~-"
)
_RFC_LOCAL_CHARS = _LOCAL_CHARS | frozenset("'=/`{|}")
# After the '@': labels, then a TLD of letters or punycode (``com``, ``xn--p1ai``), which
# keeps locale names like ``sd_IN@devanagari.UTF-8`` out.
_DOMAIN_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"(?:[A-Za-z]{2,63}|[Xx][Nn]--[A-Za-z0-9-]{1,59})(?![A-Za-z0-9-])"
)


def _emails(text: str) -> Iterator[Finding]:
    at = text.find("@")
    while at != -1:
        domain = _DOMAIN_RE.match(text, at + 1)
        if domain:
            start = at
            while start > 0 and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            if start == at:  # a local part made only of the rarer characters: take those
                while start > 0 and text[start - 1] in _RFC_LOCAL_CHARS:
                    start -= 1
                if text[start:at].strip("`") == "" and text[domain.end() : domain.end() + 1] == "`":
                    start = at  # ``@dataclasses.dataclass``: a decorator in code markup
            if start < at:
                yield start, domain.end(), "email"
        at = text.find("@", at + 1)


# -------------------------------------------------- numbers: IPv4, cards, phone numbers

# Everything that starts with a digit, in one scan: IPv4 (validated by ipaddress), card
# numbers of 13–19 digits starting 2–6 with single spaces or dashes (validated by Luhn),
# and 555-123-4567 / 555.123.4567 (one separator throughout, so 3.11.7 is no phone).
_DIGITS_RE = re.compile(
    r"[0-9](?:"
    r"(?<![\w.][0-9])(?P<ipv4>\d{0,2}(?:\.\d{1,3}){3})(?!\w|\.\d)"
    r"|(?<=[2-6])(?<![\w.,+-][2-6])(?P<card>\d{3}(?:[ -]?\d){9,15})(?!\d)"
    r"|(?<![\w.+-][0-9])(?P<phone>\d\d(?P<sep>[-.])\d{3}(?P=sep)\d{4})(?![\w-]|\.\d)"
    r")"
)
_PHONE_RES = (
    # +44 20 7946 0958, +1-555-123-4567, +1 (555) 123-4567, +15551234567
    re.compile(r"\+(?<![\w+]\+)\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){1,5}(?![\w(])"),
    # (555) 123-4567, (555)123-4567
    re.compile(r"\((?<!\w\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}(?![\w-]|\.\d)"),
)


def _numbers(text: str, kinds: Sequence[str]) -> Iterator[Finding]:
    for m in _DIGITS_RE.finditer(text):
        start = m.start()
        if m.group("ipv4") is not None:
            if "ip" in kinds and _is_public_ipv4(m.group()):
                yield start, m.end(), "ip"
        elif m.group("card") is not None:
            if "card" in kinds and (end := _card_end(m.group())):
                yield start, start + end, "card"
        elif "phone" in kinds:
            yield start, m.end(), "phone"
    if "phone" in kinds:
        for pattern in _PHONE_RES:
            for m in pattern.finditer(text):
                if _is_phone(m.group()):
                    yield m.start(), m.end(), "phone"


_SIGNED_NUMBER_RE = re.compile(r"\+\d+(?P<decimals>\.\d+)?")


def _is_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    compact = _SIGNED_NUMBER_RE.fullmatch(candidate)
    if compact:  # +15551234567 is a phone number, +35236450.6 a signed decimal
        return compact.group("decimals") is None and 10 <= digits <= 15
    return (8 if candidate[0] == "+" else 10) <= digits <= 15


def _is_public_ipv4(candidate: str) -> bool:
    try:
        address = ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    bits = int(address)
    if address.is_loopback or bits >> 24 == 0:  # 127/8, and 0/8 ("this network")
        return False
    parts = [int(p) for p in candidate.split(".")]
    if parts[0] < 10 and max(parts) < 100:
        return False  # 8.2.4.44, 2.7.2.2: a section or version number far more often
    inverted = bits ^ 0xFFFFFFFF
    return (inverted & (inverted + 1)) != 0  # netmasks (1…10…0) and broadcast are kept


def _card_end(candidate: str) -> int:
    """Length of the longest prefix of ``candidate`` that ends at a group boundary and is a
    Luhn-valid 13–19 digit number (so a card followed by a year is still found); else 0."""
    for end in range(len(candidate), 0, -1):
        if end < len(candidate) and candidate[end] not in " -":
            continue
        digits = candidate[:end].replace(" ", "").replace("-", "")
        if len(digits) < 13:
            return 0
        if len(digits) <= 19 and _luhn(digits):
            return end
    return 0


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ------------------------------------------------------------------------------ IPv6

# Found from its colons (two within five characters, rare in prose and code), then widened
# to the hex digits before them.
_IPV6_RE = re.compile(r":[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*(?:%[0-9A-Za-z_.-]+)?")
_HEX = frozenset("0123456789abcdefABCDEF")
_DECIMAL_GROUP_RE = re.compile(r"[0-9]{1,4}")


def _ipv6(text: str) -> Iterator[Finding]:
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
        while text[end - 1] == ".":  # a full stop after the address
            end -= 1
        if _is_public_ipv6(text[start:end]):
            yield start, end, "ip"


def _is_public_ipv6(candidate: str) -> bool:
    try:
        address = ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return False
    groups = [g for g in candidate.split("%")[0].split(":") if g]
    # 1::2, ::3 are slices far more often than addresses
    return len(groups) > 2 or not all(_DECIMAL_GROUP_RE.fullmatch(g) for g in groups)


# ---------------------------------------------------------------------------- secrets

# Tokens recognizable by their documented prefixes: one pattern per first literal. The
# number is how many characters of the token precede the match (the 's' of "sk_live_").
_TOKEN_RES = (
    (
        re.compile(
            r"A(?:KIA|SIA|BIA|CCA|IDA|ROA|GPA|NPA|NVA|PKA)[0-9A-Z]{16}(?![0-9A-Za-z])"  # AWS
            r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
        ),
        0,
    ),
    (
        re.compile(
            r"g(?:h[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
            r"|ithub_pat_[A-Za-z0-9_]{22,}"
            r"|lpat-[A-Za-z0-9_-]{20,}"  # GitLab
            # genloop API keys: 32+ characters, or 20+ with a digit or '-' (not GLSL's gl_*)
            r"|l_(?:[A-Za-z0-9_-]{32,}|(?=[A-Za-z0-9_-]*[0-9-])[A-Za-z0-9_-]{20,}))"
        ),
        0,
    ),
    (re.compile(r"xox[abposre]-[A-Za-z0-9-]{10,}"), 0),  # Slack
    (re.compile(r"hf_[A-Za-z0-9]{30,}"), 0),  # Hugging Face
    (re.compile(r"eyJ[\w-]{5,}\.eyJ[\w-]{5,}\.[\w-]*", re.ASCII), 0),  # JWTs
    (
        re.compile(
            r"k(?<=[spr]k)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe
            r"|k(?<=sk)-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}"  # OpenAI-style sk-…
        ),
        1,
    ),
    (
        re.compile(
            r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.DOTALL,
        ),
        0,
    ),
)
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

# Searched in the lowercased text (the engine cannot skip ahead for a case-insensitive
# pattern), then the value is read from the original at the same offsets.
_AUTH_RE = re.compile(r"b(?:earer|asic)[ \t]+")  # HTTP Authorization credentials
_AUTH_VALUE_RE = re.compile(r"(?=[A-Za-z0-9._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{16,}")

# password=…, "api_key": "…", SECRET_KEY: … — the value is redacted, the name is kept.
# A name is an identifier that ends with one of these, alone or after "_", "-" or ".";
# it is found from the occurrences of a few words in the lowercased text.
_SECRET_HINTS = ("pass", "pwd", "secret", "token", "key", "credential")
_NAME_TAIL_RE = re.compile(r"[a-z0-9_.-]*(?=[\"']?[ \t]*[:=])")
_SECRET_NAME_RE = re.compile(
    r"(?:[a-z0-9_.-]*[_.-])?(?:pass(?:word|wd|phrase)|pwd|secret|token|credentials?|"
    r"(?:api|access|secret|private)[_-]?key|apikey)"
)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
# A quoted value holds no spaces, and no <>[]{}| so that special tokens and templates
# (bos_token = "<|begin_of_text|>", token = "{token}") stay.
_SECRET_VALUE_RE = re.compile(
    r"[\"']?[ \t]*[:=][ \t]*"
    r"(?:[bBrRuU]?(?P<q>[\"'])(?P<quoted>[^\"'\s<>\[\]{}|]{8,})(?P=q)"
    r"|(?P<bare>(?=[\w+/=~!@#$%^&*-]*\d)[\w+/=~!@#$%^&*-]{8,}))"
)
# scheme://user:password@host — the password.
_URL_PASSWORD_RE = re.compile(r"://[^\s/:@]+:(?P<value>[^\s/@]+)@")


def _secrets(text: str) -> Iterator[Finding]:
    for pattern, back in _TOKEN_RES:
        for m in pattern.finditer(text):
            start = m.start() - back
            if start and text[start - 1] in _WORD_CHARS:
                continue  # inside a longer word
            yield start, m.end(), "secret"
    lowered = text.lower()
    if len(lowered) != len(text):  # a few characters lowercase to two; keep offsets exact
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    for m in _URL_PASSWORD_RE.finditer(text):
        yield m.start("value"), m.end("value"), "secret"
    for m in _AUTH_RE.finditer(lowered):
        value = _AUTH_VALUE_RE.match(text, m.end())
        if value:
            yield value.start(), value.end(), "secret"
    for hint in _SECRET_HINTS:
        i = lowered.find(hint)
        while i != -1:
            tail = _NAME_TAIL_RE.match(lowered, i + len(hint))
            start = i
            i = lowered.find(hint, i + 1)
            if not tail:
                continue  # not followed by ':' or '='
            while start > 0 and lowered[start - 1] in _NAME_CHARS:
                start -= 1
            if _SECRET_NAME_RE.fullmatch(lowered, start, tail.end()):
                value = _SECRET_VALUE_RE.match(text, tail.end())
                if value:
                    group = "quoted" if value.group("quoted") else "bare"
                    yield value.start(group), value.end(group), "secret"


# ------------------------------------------------------------------------------ API


_PRIORITY = {"secret": 0, "card": 1, "email": 2, "ip": 3, "phone": 4}


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple; a ValueError naming the valid kinds for an unknown one."""
    unknown = [k for k in kinds if k not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; valid kinds: {', '.join(KINDS)}")
    return tuple(kinds)


def find_pii(text: str, kinds: Sequence[str] = KINDS) -> list[tuple[str, Span]]:
    """Where ``text`` holds PII: ``[(kind, (start, end)), …]`` in text order, no overlaps.

    Findings that overlap are merged into one span (so no part of either survives), with
    the kind of the one that starts first (at the same start: secret, card, email, ip,
    phone).
    """
    kinds = check_kinds(kinds)
    found: list[Finding] = []
    if "email" in kinds and "@" in text:
        found += _emails(text)
    if "ip" in kinds or "card" in kinds or "phone" in kinds:
        found += _numbers(text, kinds)
    if "ip" in kinds and ":" in text:
        found += _ipv6(text)
    if "secret" in kinds:
        found += _secrets(text)
    found.sort(key=lambda f: (f[0], _PRIORITY[f[2]], -f[1]))
    out: list[tuple[str, Span]] = []
    for start, end, kind in found:
        if out and start < out[-1][1][1]:
            first_kind, (first_start, first_end) = out[-1]
            out[-1] = (first_kind, (first_start, max(first_end, end)))
        else:
            out.append((kind, (start, end)))
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

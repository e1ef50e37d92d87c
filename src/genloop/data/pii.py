"""The data-preparation step that redacts personal data and credentials in records.

What counts as PII, and how each kind is found and replaced, is
:mod:`genloop.security.pii`; request logs and feedback curation use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from genloop.data.records import Dropped, Record
from genloop.security.pii import KINDS, check_kinds, redact


class RedactPII:
    """Replace emails, phone numbers, IPs, card numbers and secrets with placeholders."""

    name = "pii"

    def __init__(self, kinds: Sequence[str] = KINDS) -> None:
        self.kinds = check_kinds(kinds)

    def __call__(self, record: Record) -> Record | Dropped:
        if not record.text:
            return record
        text = redact(record.text, self.kinds)
        if text != record.text:
            record.text = text
        return record

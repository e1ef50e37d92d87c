"""The ``pii`` data-preparation step (what it finds is tested in tests/security/test_pii.py)."""

from __future__ import annotations

import pickle

import pytest

from genloop.data.pii import RedactPII
from genloop.data.records import Record
from genloop.security.pii import redact


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="ssn"):
        RedactPII(kinds=("email", "ssn"))


def test_step() -> None:
    step = pickle.loads(pickle.dumps(RedactPII()))
    record = Record(id="1", source="t", text="ping me: x@example.org")
    out = step(record)
    assert isinstance(out, Record) and out.text == "ping me: <EMAIL>"
    same = Record(id="2", source="t", text="nothing here")
    original = same.text
    out = step(same)
    assert isinstance(out, Record) and out.text is original
    assert redact(redact("x@example.org")) == "<EMAIL>"

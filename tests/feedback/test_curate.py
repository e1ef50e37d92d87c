"""Curation on plain items: dedup, per-user caps, outliers, PII redaction."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from genloop.feedback.curate import Item, curate

_ids = itertools.count(1)
PROMPT = "Q: what colour is the sky over oslo? A:"


def item(
    user: str = "alice",
    *,
    rating: int = -1,
    correction: str | None = " blue.",
    response: str = " green.",
    prompt: Any = PROMPT,
) -> Item:
    return Item(
        id=next(_ids),
        user=f"user:{user}",
        user_id=user,
        rating=rating,
        status="pending",
        model_name="m",
        model_version=1,
        endpoint="completions",
        prompt=prompt,
        response=response,
        correction=correction,
        comment=None,
        created_at=datetime.now(UTC),
    )


def test_a_thousand_identical_corrections_from_one_user_count_once() -> None:
    rows = [item("mallory") for _ in range(1000)]
    kept, report = curate(rows, per_user_cap=20)
    assert len(kept) == 1 and kept[0].id == rows[0].id  # the earliest
    assert report.dropped == {"duplicate": 999} and report.kept == 1 and report.users == 1


def test_a_thousand_different_corrections_from_one_user_are_capped() -> None:
    rows = [item("mallory", prompt=f"Q: what is {i}? A:") for i in range(1000)]
    honest = [item(f"user{i}", prompt=f"Q: what is {i}? A:", correction=" ok.") for i in range(5)]
    kept, report = curate(rows + honest, per_user_cap=20)
    by_user = [it for it in kept if it.user == "user:mallory"]
    assert len(by_user) == 20 and report.dropped["user_cap"] == 980
    assert {it.id for it in by_user} == {it.id for it in rows[-20:]}  # the newest kept
    assert len(kept) == 25 and report.users == 6


def test_pii_is_redacted_in_every_text() -> None:
    rows = [
        item(
            prompt="mail ann@example.com: Q: sky? A:",
            response=" call +1 415 555 0100.",
            correction=" blue, card 4111 1111 1111 1111.",
        ),
        item(prompt=[{"role": "user", "content": "I am bob@example.org"}], correction="hi"),
    ]
    kept, report = curate(rows, per_user_cap=20)
    text = repr([(it.prompt, it.response, it.correction) for it in kept])
    for secret in ("ann@example.com", "555 0100", "4111", "bob@example.org"):
        assert secret not in text
    assert "<EMAIL>" in text and "<CARD>" in text and "<PHONE>" in text
    assert report.redacted == 2
    raw, _ = curate(rows, per_user_cap=20, redact_pii=False)
    assert "ann@example.com" in repr(raw[0].prompt)


def test_the_minority_side_of_a_vote_is_dropped() -> None:
    good = [item(f"u{i}", rating=1, correction=None, response=" blue.") for i in range(3)]
    bad = item("mallory", rating=-1, correction=None, response=" blue.")
    kept, report = curate([*good, bad], per_user_cap=20)
    assert bad.id not in {it.id for it in kept} and report.dropped["conflicting_votes"] == 1
    # one user voting many times is still one user
    spam = [item("mallory", rating=-1, correction=None, response=" blue.") for _ in range(50)]
    kept, report = curate([good[0], *spam], per_user_cap=20)
    assert kept == [] and report.dropped["conflicting_votes"] == 51  # a tie: both sides out


def test_a_correction_a_clear_majority_answered_otherwise_is_dropped() -> None:
    majority = [item(f"u{i}", correction=" blue.") for i in range(3)]
    poison = item("mallory", correction=" purple.")
    kept, report = curate([*majority, poison], per_user_cap=20)
    assert poison.id not in {it.id for it in kept}
    assert report.dropped == {"minority_correction": 1, "duplicate": 2}
    # two against one is no clear majority: both stay
    kept, report = curate([*majority[:2], poison], per_user_cap=20)
    assert poison.id in {it.id for it in kept}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (item(rating=-1, correction=" GREEN. "), "unchanged_correction"),
        (item(correction="x" * 16_001), "too_long"),
        (item(prompt=""), "no_logged_text"),
    ],
)
def test_rows_without_a_usable_signal_are_dropped(row: Item, reason: str) -> None:
    kept, report = curate([row], per_user_cap=20)
    assert kept == [] and report.dropped == {reason: 1}


def test_an_upvote_that_retypes_the_answer_is_an_upvote() -> None:
    kept, _ = curate([item(rating=1, correction=" green.")], per_user_cap=20)
    assert kept[0].correction is None and kept[0].chosen == " green." and kept[0].rejected is None

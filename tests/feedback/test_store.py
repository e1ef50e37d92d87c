"""Submitting, listing, showing and reviewing feedback rows in a real catalog."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from genloop.errors import NotFoundError
from genloop.feedback.store import (
    FeedbackError,
    count_feedback,
    get_feedback,
    list_feedback,
    review,
    submit_feedback,
)
from genloop.security.crypto import Cipher
from genloop.workspace import Workspace
from genloop.workspace.tables import AuditEvent, Feedback


def test_feedback_links_to_the_logged_request_and_is_encrypted(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    rid = log(model, "Q: what colour is the sky over oslo? A:", " green.", user_id="alice")
    fid = submit_feedback(
        ws, cipher, response_id=rid, rating=-1, correction=" blue.", comment="the sky is blue"
    )
    with ws.catalog.session() as s:
        row = s.get(Feedback, fid)
        assert row is not None and row.correction_enc is not None and row.comment_enc
        assert b"blue" not in row.correction_enc and b"sky" not in row.comment_enc
        assert row.status == "pending" and row.user_id is None  # neither client nor key named one
    info = get_feedback(ws, cipher, fid)
    assert info.model == model.ref and info.endpoint == "completions"
    assert info.prompt == "Q: what colour is the sky over oslo? A:" and info.response == " green."
    assert info.correction == " blue." and info.comment == "the sky is blue"
    assert info.rating == -1 and info.response_id == rid


def test_the_user_is_the_clients_else_the_keys(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    rid = log(model, "Q: what do cows drink? A:", " water.")
    by_client = submit_feedback(
        ws, cipher, response_id=rid, rating=1, user_id="u1", key_user_id="k"
    )
    by_key = submit_feedback(ws, cipher, response_id=rid, rating=1, key_user_id="k")
    assert get_feedback(ws, cipher, by_client).user_id == "u1"
    assert get_feedback(ws, cipher, by_key).user_id == "k"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rating": 0}, r"rating must be \+1 or -1"),
        ({"rating": True}, r"rating must be \+1 or -1"),
        ({"rating": 1, "correction": "x" * 32_001}, "correction is too long"),
        ({"rating": 1, "comment": "x" * 4_001}, "comment is too long"),
        ({"rating": 1, "user_id": "u" * 129}, "user is too long"),
        ({"rating": 1, "correction": 5}, "correction must be a string"),
    ],
)
def test_bad_submissions_are_422_and_store_nothing(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, kwargs: dict[str, Any], message: str
) -> None:
    model = new_model()
    rid = log(model, "Q: what do cats chase? A:", " mice.")
    with pytest.raises(FeedbackError, match=message) as err:
        submit_feedback(ws, cipher, response_id=rid, **kwargs)
    assert err.value.http_status == 422
    assert list_feedback(ws, model=model.name) == []


def test_an_unknown_response_id_is_404(ws: Workspace, cipher: Cipher) -> None:
    with pytest.raises(NotFoundError, match="no response with id") as err:
        submit_feedback(ws, cipher, response_id="cmpl-nope", rating=1)
    assert err.value.http_status == 404


def test_an_empty_correction_is_no_correction(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    rid = log(model, "Q: what do bees make? A:", " honey.")
    fid = submit_feedback(ws, cipher, response_id=rid, rating=1, correction="   ")
    assert get_feedback(ws, cipher, fid).correction is None


def test_list_filters_and_review_changes_status_all_or_nothing(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    ids = [
        submit_feedback(ws, cipher, response_id=log(model, f"Q: {i}? A:", " x."), rating=1)
        for i in range(3)
    ]
    listed = list_feedback(ws, model=model.name)
    assert [f.id for f in listed] == ids[::-1]  # newest first
    assert all(f.prompt is None and f.correction is None for f in listed)  # never decrypted

    with pytest.raises(NotFoundError, match="no feedback with id 999999"):
        review(ws, [ids[0], 999999], "approved")
    assert {f.status for f in list_feedback(ws, model=model.name)} == {"pending"}

    assert review(ws, ids[:2], "approved", actor="ann") == ids[:2]
    assert review(ws, [ids[2]], "rejected") == [ids[2]]
    assert review(ws, ids[:2], "approved") == []  # no change the second time
    assert [f.id for f in list_feedback(ws, model=model.name, status="approved")] == ids[1::-1]
    assert [f.id for f in list_feedback(ws, model=model.name, status="rejected")] == [ids[2]]
    counts = count_feedback(ws)
    assert counts["approved"] >= 2 and counts["rejected"] >= 1
    with ws.catalog.session() as s:
        event = s.scalars(
            select(AuditEvent).where(AuditEvent.actor == "ann").order_by(AuditEvent.id.desc())
        ).first()
        assert event is not None and event.action == "feedback.approve"
        assert event.details["ids"] == ids[:2]

    with pytest.raises(FeedbackError, match="unknown status"):
        list_feedback(ws, status="done")

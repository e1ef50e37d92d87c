"""Exports of real feedback rows: sft, dpo and jsonl dataset versions, and what they record."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlalchemy import select

from genloop.data.pairs import check_pair_row, read_pairs
from genloop.errors import GenloopError
from genloop.feedback.export import export_feedback
from genloop.feedback.store import review, submit_feedback
from genloop.security.crypto import Cipher
from genloop.workspace import Workspace
from genloop.workspace.tables import Feedback

SKY = "Q: what colour is the sky over oslo? A:"
CHAT = [{"role": "user", "content": "what colour is the sky?"}]


def feedback_on(
    ws: Workspace, cipher: Cipher, log: Any, model: Any, prompt: Any, response: str, **kw: Any
) -> int:
    user = kw.pop("user", "alice")
    rid = log(model, prompt, response)
    return submit_feedback(ws, cipher, response_id=rid, user_id=user, **kw)


def canon(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def rows_of(ws: Workspace, dataset: Any, kind: str) -> list[dict[str, Any]]:
    data_dir = ws.store.open_verified(dataset.artifact)
    return read_pairs(data_dir, "train", kind) + read_pairs(data_dir, "val", kind)


def test_sft_export_turns_corrections_and_upvotes_into_pairs(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    ids = [
        feedback_on(ws, cipher, log, model, SKY, " green.", rating=-1, correction=" blue."),
        feedback_on(ws, cipher, log, model, CHAT, "green", rating=-1, correction="blue", user="b"),
        feedback_on(ws, cipher, log, model, "Q: what do cows drink? A:", " water.", rating=1),
        feedback_on(ws, cipher, log, model, "Q: what do bees make? A:", " ink.", rating=-1),
    ]
    result = export_feedback(ws, cipher, "sft", model=model.name)
    assert result.dataset is not None and result.dataset.kind == "sft"
    assert result.dataset.name == f"{model.name}-feedback"
    rows = rows_of(ws, result.dataset, "sft")
    for row in rows:
        check_pair_row("sft", row)
    assert canon(rows) == canon(
        [
            {"prompt": SKY, "response": " blue.", "format": "completion"},
            {"messages": [*CHAT, {"role": "assistant", "content": "blue"}]},
            {"prompt": "Q: what do cows drink? A:", "response": " water.", "format": "completion"},
        ]
    )
    assert result.skipped == {"no_answer": 1}  # a downvote without a correction
    lineage = result.dataset.lineage
    assert lineage["feedback_ids"] == ids
    # keyed pseudonyms: no reader of the catalog can test them against guessed user ids
    assert lineage["feedback_user_hashes"] == sorted(
        [cipher.pseudonym("alice"), cipher.pseudonym("b")]
    )
    assert "alice" not in json.dumps(lineage)
    assert hashlib.sha256(b"alice").hexdigest()[:16] not in json.dumps(lineage)
    assert (
        ws.store.open_verified(result.dataset.artifact) / "tokenizer" / "tokenizer.json"
    ).is_file()
    with ws.catalog.session() as s:
        exported = s.scalars(select(Feedback.exported_to).where(Feedback.id.in_(ids))).all()
    assert set(exported) == {result.dataset.id}
    # the same feedback again is the same version
    assert export_feedback(ws, cipher, "sft", model=model.name).dataset == result.dataset


def test_dpo_export_pairs_the_good_answer_with_the_bad_one_for_each_prompt(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    feedback_on(ws, cipher, log, model, SKY, " green.", rating=-1, correction=" blue.")
    feedback_on(ws, cipher, log, model, SKY, " red.", rating=-1, user="b")
    feedback_on(ws, cipher, log, model, CHAT, "blue", rating=1, user="c")
    feedback_on(ws, cipher, log, model, CHAT, "green", rating=-1, user="d")
    feedback_on(ws, cipher, log, model, "Q: what do cows drink? A:", " water.", rating=1)
    result = export_feedback(ws, cipher, "dpo", model=f"{model.name}@production")
    assert result.dataset is not None and result.dataset.kind == "dpo"
    rows = rows_of(ws, result.dataset, "dpo")
    for row in rows:
        check_pair_row("dpo", row)
    assert canon(rows) == canon(
        [
            {"prompt": SKY, "chosen": " blue.", "rejected": " green.", "format": "completion"},
            {"prompt": SKY, "chosen": " blue.", "rejected": " red.", "format": "completion"},
            {"prompt": "what colour is the sky?", "chosen": "blue", "rejected": "green"},
        ]
    )  # the cows prompt has no rejected answer: no pair


def test_jsonl_export_holds_the_curated_rows_redacted(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    feedback_on(
        ws, cipher, log, model, "my mail is ann@example.com. Q: sky? A:", " green.",
        rating=-1, correction=" blue.", comment="ping me at ann@example.com",
    )  # fmt: skip
    result = export_feedback(ws, cipher, "jsonl", model=model.name, name="raw-feedback")
    assert result.dataset is not None and result.dataset.kind == "feedback"
    assert result.dataset.ref == "raw-feedback@1"
    path = ws.store.open_verified(result.dataset.artifact) / "feedback.jsonl"
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert "ann@example.com" not in json.dumps(row)
    assert (
        row["prompt"] == "my mail is <EMAIL>. Q: sky? A:" and row["comment"] == "ping me at <EMAIL>"
    )
    assert row["rating"] == -1 and row["correction"] == " blue." and row["model"] == model.ref
    assert result.report.redacted == 1


def test_one_user_posting_a_thousand_identical_corrections_adds_one_row(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    rid = log(model, SKY, " green.")
    for _ in range(1000):
        submit_feedback(
            ws, cipher, response_id=rid, rating=-1, correction=" purple.", user_id="eve"
        )
    feedback_on(ws, cipher, log, model, "Q: what do cows drink? A:", " water.", rating=1)
    result = export_feedback(ws, cipher, "sft", model=model.name, per_user_cap=5)
    assert result.dataset is not None
    assert result.report.input == 1001 and result.report.kept == 2
    assert result.report.dropped == {"duplicate": 999}
    assert result.rows == 2 and len(result.considered) == 1001


def test_review_required_exports_approved_rows_only(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    model = new_model()
    first = feedback_on(ws, cipher, log, model, SKY, " green.", rating=-1, correction=" blue.")
    feedback_on(ws, cipher, log, model, "Q: what do cows drink? A:", " water.", rating=1)
    with pytest.raises(GenloopError, match="no approved feedback about"):
        export_feedback(ws, cipher, "sft", model=model.name, review_required=True)
    review(ws, [first], "approved")
    result = export_feedback(ws, cipher, "sft", model=model.name, review_required=True)
    assert result.rows == 1 and result.considered == [first]


def test_pairs_need_one_model_to_take_the_tokenizer_from(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any
) -> None:
    a, b = new_model("several"), new_model("several")
    feedback_on(ws, cipher, log, a, SKY, " green.", rating=-1, correction=" blue.")
    feedback_on(ws, cipher, log, b, SKY, " green.", rating=-1, correction=" blue.")
    with pytest.raises(GenloopError, match="about several models"):
        export_feedback(ws, cipher, "sft")
    with pytest.raises(GenloopError, match="unknown export format 'csv'"):
        export_feedback(ws, cipher, "csv", model=a.name)

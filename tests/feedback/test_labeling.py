"""The labeling workflow's library: tasks, the queue, submissions, agreement and export.

The queue and submission tests run on both catalog backends (SQLite, PostgreSQL): the
refusal of a second label by the same person is the catalog's unique constraint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from genloop.data.pairs import import_rows, read_pairs
from genloop.data.tokenizer import train_bpe
from genloop.errors import ConflictError, NotFoundError
from genloop.feedback.labeling.agreement import kappa, pair_agreement, settle
from genloop.feedback.labeling.export import export_task
from genloop.feedback.labeling.queue import labels_of, next_item, progress, submit_label
from genloop.feedback.labeling.tasks import LabelError, create_task, get_task, list_tasks
from genloop.workspace import Workspace
from genloop.workspace.audit import list_events
from genloop.workspace.datasets import resolve_dataset
from genloop.workspace.tables import Label, LabelItem

REVIEWS = [
    ("a lovely quiet film", "pos"),
    ("dull and far too long", "neg"),
    ("the cast is wonderful", "pos"),
    ("I want my evening back", "neg"),
    ("a warm and funny story", "pos"),
    ("badly written and badly acted", "neg"),
    ("one of the best this year", "pos"),
    ("nothing happens at all", "neg"),
    ("sharp, kind and clever", "pos"),
    ("the plot makes no sense", "neg"),
]
# pos/neg of two annotators on the ten reviews: 8 agree, each says pos 5 times and neg 5
# times, so p_o = 0.8, p_e = 0.5·0.5 + 0.5·0.5 = 0.5 and κ = (0.8 − 0.5) / (1 − 0.5) = 0.6
ALICE = ["pos", "pos", "pos", "pos", "pos", "neg", "neg", "neg", "neg", "neg"]
BOB = ["pos", "pos", "pos", "pos", "neg", "neg", "neg", "neg", "neg", "pos"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [t for t, _ in REVIEWS] * 4
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1)


def review_task(ws: Workspace, tmp_path: Path, name: str = "reviews", **kw: Any) -> str:
    rows = [{"text": t, "id": f"r{i}"} for i, (t, _) in enumerate(REVIEWS)]
    create_task(
        ws,
        name,
        "classification",
        file=write_jsonl(tmp_path / f"{name}.jsonl", rows),
        labels=["pos", "neg"],
        **kw,
    )
    return name


# ---------------------------------------------------------------- queue and submission


def test_queue_gives_items_in_order_and_refuses_a_second_label(
    catalog_workspace: Workspace, tmp_path: Path
) -> None:
    ws = catalog_workspace
    task = review_task(ws, tmp_path)
    first = next_item(ws, task, "alice")
    assert first is not None and (first.position, first.payload) == (
        0,
        {"text": REVIEWS[0][0], "id": "r0"},
    )
    # nothing is reserved: asking again gives the same item until it is labeled
    assert next_item(ws, task, "alice") == first
    label = submit_label(ws, task, first.id, "alice", {"label": "pos"})
    assert (label.annotator, label.value, label.prelabel_accepted) == (
        "alice",
        {"label": "pos"},
        None,
    )

    with pytest.raises(ConflictError, match="already labeled by alice"):
        submit_label(ws, task, first.id, "alice", {"label": "neg"})
    assert [(lb.item_id, lb.value) for lb in labels_of(ws, task)] == [(first.id, {"label": "pos"})]

    second = next_item(ws, task, "alice")
    assert second is not None and second.position == 1
    # overlap 1: bob is not given the item alice labeled, unless he asks for a second opinion
    bob = next_item(ws, task, "bob")
    assert bob is not None and bob.position == 1
    again = next_item(ws, task, "bob", agreement=True)
    assert again is not None and again.id == first.id

    state = progress(ws, task, "bob")
    assert state["items"] == 10 and state["labels"] == 1 and state["labeled_items"] == 1
    assert state["complete_items"] == 1 and state["annotators"] == {"alice": 1}
    assert state["you"] == {"annotator": "bob", "labeled": 0, "remaining": 9}
    # the audit log names who labeled what, never the value
    events = list_events(ws, action="label.submit")
    assert [e["details"]["annotator"] for e in events] == ["alice"]
    assert "pos" not in json.dumps(events)


def test_with_overlap_two_annotators_go_through_the_same_items(
    catalog_workspace: Workspace, tmp_path: Path
) -> None:
    ws = catalog_workspace
    task = review_task(ws, tmp_path, overlap=2)
    for who in ("alice", "bob"):
        item = next_item(ws, task, who)
        assert item is not None and item.position == 0
        submit_label(ws, task, item.id, who, {"label": "pos"})
    item = next_item(ws, task, "carol")
    assert item is not None and item.position == 1  # item 0 has its two labels
    assert progress(ws, task)["complete_items"] == 1


def test_the_catalog_refuses_a_second_label_even_past_the_check(
    catalog_workspace: Workspace, tmp_path: Path
) -> None:
    """Two racing submissions both pass the read check; the unique constraint stops one."""
    ws = catalog_workspace
    task = review_task(ws, tmp_path)
    info = get_task(ws, task)
    with ws.catalog.session() as s:
        item_id = s.scalar(sa.select(LabelItem.id).where(LabelItem.task_id == info.id).limit(1))
        s.add(Label(item_id=item_id, task_id=info.id, annotator="alice", value={"label": "pos"}))
    with pytest.raises(DBIntegrityError), ws.catalog.session() as s:
        s.add(Label(item_id=item_id, task_id=info.id, annotator="alice", value={"label": "neg"}))
    assert len(labels_of(ws, task)) == 1


def test_bad_labels_are_refused_with_what_is_wrong(workspace: Workspace, tmp_path: Path) -> None:
    task = review_task(workspace, tmp_path)
    item = next_item(workspace, task, "alice")
    assert item is not None
    with pytest.raises(LabelError, match=r"label \"meh\" is not in the label set \(pos, neg\)"):
        submit_label(workspace, task, item.id, "alice", {"label": "meh"})
    with pytest.raises(LabelError, match=r'a classification label is \{"label"'):
        submit_label(workspace, task, item.id, "alice", "pos")
    with pytest.raises(NotFoundError, match="has no item 999999"):
        submit_label(workspace, task, 999999, "alice", {"label": "pos"})
    with pytest.raises(NotFoundError, match="no labeling task named 'nope'"):
        next_item(workspace, "nope", "alice")
    with pytest.raises(LabelError, match="annotator"):
        next_item(workspace, task, " ")
    # an item of another task is not this task's
    other = review_task(workspace, tmp_path, name="other")
    other_item = next_item(workspace, other, "alice")
    assert other_item is not None
    with pytest.raises(NotFoundError):
        submit_label(workspace, task, other_item.id, "alice", {"label": "pos"})
    assert labels_of(workspace, task) == []


def test_spans_and_preference_values_are_checked(workspace: Workspace, tmp_path: Path) -> None:
    create_task(
        workspace,
        "ner",
        "spans",
        file=write_jsonl(tmp_path / "ner.jsonl", [{"text": "Ada lives in Paris"}]),
        labels=["PER", "LOC"],
    )
    item = next_item(workspace, "ner", "alice")
    assert item is not None and item.payload["tokens"] == ["Ada", "lives", "in", "Paris"]
    with pytest.raises(LabelError, match="4 labels, one per token"):
        submit_label(workspace, "ner", item.id, "alice", {"labels": ["PER", "O"]})
    with pytest.raises(LabelError, match=r"\"ORG\" is not in the label set \(O, PER, LOC\)"):
        submit_label(workspace, "ner", item.id, "alice", {"labels": ["ORG", "O", "O", "O"]})
    submit_label(workspace, "ner", item.id, "alice", {"labels": ["PER", "O", "O", "LOC"]})

    rows = [{"prompt": "say hi", "a": "hi", "b": "hello", "choice": "b"}]
    create_task(workspace, "pref", "preference", file=write_jsonl(tmp_path / "pref.jsonl", rows))
    item = next_item(workspace, "pref", "alice")
    assert item is not None and item.prelabel == {"choice": "b"}
    with pytest.raises(LabelError, match='choice must be "a" or "b"'):
        submit_label(workspace, "pref", item.id, "alice", {"choice": "c"})
    assert submit_label(workspace, "pref", item.id, "alice", {"choice": "b"}).prelabel_accepted


# ---------------------------------------------------------------- agreement


def test_kappa_is_the_hand_computed_value(catalog_workspace: Workspace, tmp_path: Path) -> None:
    ws = catalog_workspace
    task = review_task(ws, tmp_path)
    for who, labels in (("alice", ALICE), ("bob", BOB)):
        for label in labels:
            item = next_item(ws, task, who, agreement=who == "bob")
            assert item is not None
            submit_label(ws, task, item.id, who, {"label": label})
    (pair,) = progress(ws, task)["agreement"]
    assert pair["annotators"] == ["alice", "bob"] and pair["items"] == 10
    assert pair["observed"] == pytest.approx(0.8)
    assert pair["kappa"] == pytest.approx(0.6)


def test_kappa_for_spans_counts_tokens_and_is_none_when_undefined() -> None:
    # 6 tokens, 5 agree: p_o = 5/6; alice PER 1, LOC 1, O 4; bob PER 1, O 5:
    # p_e = 1/6·1/6 + 1/6·0 + 4/6·5/6 = 21/36, κ = (30/36 − 21/36) / (15/36) = 0.6
    alice = {1: {"labels": ["PER", "O", "O"]}, 2: {"labels": ["O", "LOC", "O"]}}
    bob = {1: {"labels": ["PER", "O", "O"]}, 2: {"labels": ["O", "O", "O"]}, 3: {"labels": ["O"]}}
    pair = pair_agreement("spans", alice, bob)
    assert pair["items"] == 2 and pair["observed"] == pytest.approx(0.5)
    assert pair["kappa"] == pytest.approx(0.6)
    assert kappa(["a", "a"], ["a", "a"]) is None  # chance agreement is certain


def test_settling_takes_the_majority_and_leaves_ties_out() -> None:
    assert settle("classification", [{"label": "a"}, {"label": "b"}, {"label": "a"}]) == {
        "label": "a"
    }
    assert settle("classification", [{"label": "a"}, {"label": "b"}]) is None
    spans = [{"labels": ["PER", "O"]}, {"labels": ["PER", "LOC"]}, {"labels": ["O", "LOC"]}]
    assert settle("spans", spans) == {"labels": ["PER", "LOC"]}
    assert settle("caption", [{"text": "a cat "}, {"text": "a cat"}, {"text": "a dog"}]) == {
        "text": "a cat "
    }


# ---------------------------------------------------------------- export


def test_export_settles_labels_into_a_classification_dataset_with_lineage(
    workspace: Workspace, tmp_path: Path, tok_dir: Path
) -> None:
    task = review_task(workspace, tmp_path)
    votes = {"alice": ALICE, "bob": BOB, "carol": ALICE[:4]}  # carol labels four items
    for who, labels in votes.items():
        for label in labels:
            item = next_item(workspace, task, who, agreement=who != "alice")
            assert item is not None
            submit_label(workspace, task, item.id, who, {"label": label})
    result = export_task(workspace, task, tokenizer=tok_dir)
    # items 0-3: 3 votes; items 5-8: alice and bob agree; items 4 and 9: a tie
    assert result.counts == {
        "exported": 8,
        "unlabeled": 0,
        "too_few_labels": 0,
        "ties": 2,
        "identical": 0,
    }
    directory = workspace.store.open_verified(result.dataset.artifact)
    rows = read_pairs(directory, "train", "classification")  # what training reads
    assert len(rows) == 8 and result.dataset.kind == "classification"
    assert {(r["text"], r["label"]) for r in rows} == {
        (REVIEWS[i][0], ALICE[i]) for i in range(10) if i not in (4, 9)
    }
    assert {r["id"] for r in rows} == {f"reviews:{i}" for i in range(10) if i not in (4, 9)}
    lineage = resolve_dataset(workspace, "reviews-labels").lineage
    assert lineage["task"] == "reviews" and lineage["annotators"] == ["alice", "bob", "carol"]
    assert lineage["counts"]["ties"] == 2 and lineage["labels"] == 24
    pairs = {tuple(p["annotators"]): p for p in lineage["agreement"]}
    assert pairs[("alice", "bob")]["kappa"] == pytest.approx(0.6)
    # carol and alice said pos on the same four items: they agree, but κ is undefined
    assert pairs[("alice", "carol")] == {
        "annotators": ["alice", "carol"],
        "items": 4,
        "observed": 1.0,
        "kappa": None,
    }
    assert lineage["task_source"]["file"] == "reviews.jsonl"

    # at least three labels: only the four items carol labeled too
    strict = export_task(workspace, task, tokenizer=tok_dir, min_labels=3, name="strict")
    assert strict.counts["exported"] == 4 and strict.counts["too_few_labels"] == 6


def test_export_of_nothing_settled_says_so(
    workspace: Workspace, tmp_path: Path, tok_dir: Path
) -> None:
    task = review_task(workspace, tmp_path)
    with pytest.raises(LabelError, match=r"nothing to export from task reviews.*unlabeled 10"):
        export_task(workspace, task, tokenizer=tok_dir)
    item = next_item(workspace, task, "alice")
    assert item is not None
    submit_label(workspace, task, item.id, "alice", {"label": "pos"})
    with pytest.raises(LabelError, match="give --tokenizer"):
        export_task(workspace, task)


def test_preference_task_from_a_dpo_dataset_exports_dpo_rows(
    workspace: Workspace, tmp_path: Path, tok_dir: Path
) -> None:
    pairs = [
        {"prompt": f"describe {t}", "chosen": f"{t}, truly", "rejected": f"not {t}"}
        for t, _ in REVIEWS[:6]
    ]
    source = import_rows(
        workspace, write_jsonl(tmp_path / "dpo.jsonl", pairs), "prefs", "dpo", tokenizer_dir=tok_dir
    )
    task = create_task(workspace, "pick", "preference", dataset="prefs")
    assert task.source["dataset"] == source.ref and task.prelabel_source == "dataset"
    assert task.label_set == [] and task.items == 6
    flips = 0
    while (item := next_item(workspace, "pick", "alice")) is not None:
        assert item.prelabel is not None
        pre = item.prelabel["choice"]
        assert item.payload[pre].endswith(", truly")  # the pre-label is the dataset's chosen
        flips += pre == "b"
        # alice agrees with the dataset except on the first item
        pick = pre if item.position else {"a": "b", "b": "a"}[pre]
        submit_label(workspace, "pick", item.id, "alice", {"choice": pick})
    assert 0 < flips < 6  # A and B are not always in the dataset's order
    state = progress(workspace, "pick")
    assert state["prelabels"] == {"items": 6, "reviewed": 6, "accepted": 5, "accuracy": 5 / 6}
    # no tokenizer named: the source dataset's
    result = export_task(workspace, "pick")
    directory = workspace.store.open_verified(result.dataset.artifact)
    rows = read_pairs(directory, "train", "dpo")
    assert result.kind == "dpo" and len(rows) == 6
    by_id = {r["id"]: r for r in rows}
    assert by_id["pick:0"]["rejected"].endswith(", truly")  # alice's choice, not the dataset's
    assert all(by_id[f"pick:{i}"]["chosen"].endswith(", truly") for i in range(1, 6))


def test_spans_and_caption_tasks_export_token_classification_and_sft(
    workspace: Workspace, tmp_path: Path, tok_dir: Path
) -> None:
    create_task(
        workspace,
        "ner",
        "spans",
        file=write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Ada", "met", "Bob"]}]),
        labels=["PER"],
    )
    item = next_item(workspace, "ner", "alice")
    assert item is not None
    submit_label(workspace, "ner", item.id, "alice", {"labels": ["PER", "O", "PER"]})
    ner = export_task(workspace, "ner", tokenizer=tok_dir)
    rows = read_pairs(workspace.store.open_verified(ner.dataset.artifact), "train", ner.kind)
    assert ner.kind == "token_classification"
    assert rows == [{"tokens": ["Ada", "met", "Bob"], "labels": ["PER", "O", "PER"], "id": "ner:0"}]

    captions = [{"prompt": "Describe the film.", "text": "a lovely quiet flim"}]
    create_task(workspace, "cap", "caption", file=write_jsonl(tmp_path / "cap.jsonl", captions))
    item = next_item(workspace, "cap", "alice")
    assert item is not None and item.prelabel == {"text": "a lovely quiet flim"}
    label = submit_label(workspace, "cap", item.id, "alice", {"text": "a lovely quiet film"})
    assert label.prelabel_accepted is False
    cap = export_task(workspace, "cap", tokenizer=tok_dir)
    rows = read_pairs(workspace.store.open_verified(cap.dataset.artifact), "train", cap.kind)
    assert cap.kind == "sft"
    assert rows == [
        {"prompt": "Describe the film.", "response": "a lovely quiet film", "id": "cap:0"}
    ]


# ---------------------------------------------------------------- creating tasks


def test_a_classification_task_from_a_dataset_takes_its_labels_as_pre_labels(
    workspace: Workspace, tmp_path: Path, tok_dir: Path
) -> None:
    rows = [{"text": t, "label": lab} for t, lab in REVIEWS]
    import_rows(
        workspace,
        write_jsonl(tmp_path / "rows.jsonl", rows),
        "reviews",
        "classification",
        tokenizer_dir=tok_dir,
        val_fraction=0.3,
    )
    task = create_task(workspace, "audit", "classification", dataset="reviews@1")
    assert task.label_set == ["neg", "pos"] and task.items == 10  # both splits
    assert [t.name for t in list_tasks(workspace)] == ["audit"]
    item = next_item(workspace, "audit", "alice")
    assert item is not None
    assert item.prelabel == {"label": dict(REVIEWS)[item.payload["text"]]}
    assert submit_label(workspace, "audit", item.id, "alice", item.prelabel).prelabel_accepted


def test_creating_a_task_refuses_bad_input(
    workspace: Workspace, tmp_path: Path, tok_dir: Path
) -> None:
    review_task(workspace, tmp_path)
    with pytest.raises(ConflictError, match="a labeling task named 'reviews' exists"):
        review_task(workspace, tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "say hi"}])
    with pytest.raises(
        LabelError, match=r"p\.jsonl:1: a preference item needs two candidates.*--model"
    ):
        create_task(workspace, "p", "preference", file=prompts)
    with pytest.raises(LabelError, match="a caption task takes no label set"):
        create_task(workspace, "c", "caption", file=prompts, labels=["x"])
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "ok", "label": "pos"}, {"text": "x", "label": "meh"}]
    )
    with pytest.raises(
        LabelError, match=r"bad.jsonl:2: pre-label: label \"meh\" is not in the label set"
    ):
        create_task(workspace, "b", "classification", file=bad, labels=["pos", "neg"])
    with pytest.raises(LabelError, match="needs at least two labels"):
        create_task(
            workspace,
            "b",
            "classification",
            file=write_jsonl(tmp_path / "n.jsonl", [{"text": "x"}]),
        )
    import_rows(
        workspace,
        write_jsonl(tmp_path / "r.jsonl", [{"text": "x", "label": "y"}]),
        "reviews",
        "classification",
        tokenizer_dir=tok_dir,
        val_fraction=0.0,
    )
    with pytest.raises(
        LabelError,
        match=r"reviews@1 holds classification rows; a spans task reads token_classification",
    ):
        create_task(workspace, "s", "spans", dataset="reviews")
    with pytest.raises(LabelError, match="overlap must be 1 to 10"):
        review_task(workspace, tmp_path, name="o", overlap=0)
    assert [t.name for t in list_tasks(workspace)] == ["reviews"]

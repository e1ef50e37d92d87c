"""The pairs dataset contract: rows, splits, the tokenizer, refused rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from genloop.data.pairs import pairs_kind, read_pairs, write_pairs_dataset
from genloop.data.tokenizer import train_bpe
from genloop.errors import GenloopError
from genloop.workspace import Workspace

WORDS = ["red", "green", "blue", "cyan", "black", "white", "amber", "olive", "pink", "gold"]
SFT_ROWS = [{"prompt": f"colour of {w}?", "response": f"{w} is {w}"} for w in WORDS]
DPO_ROWS = [
    {"prompt": f"colour of {w}?", "chosen": f"{w} is {w}", "rejected": f"{w} is {v}"}
    for w, v in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True)
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"{r['prompt']} {r['response']}" for r in SFT_ROWS] * 4
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)


# ------------------------------------------------------------------------ the dataset


def test_a_pairs_dataset_holds_its_rows_splits_and_tokenizer(
    workspace: Workspace, tok_dir: Path
) -> None:
    info = write_pairs_dataset(
        workspace, "prefs", "dpo", iter(DPO_ROWS), tokenizer_dir=tok_dir, val_fraction=0.25
    )
    assert (info.kind, info.ref) == ("dpo", "prefs@1")
    root = workspace.store.open_verified(info.artifact)
    train = [json.loads(x) for x in (root / "pairs/train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (root / "pairs/val.jsonl").read_text().splitlines()]
    assert train and val and sorted(train + val, key=str) == sorted(DPO_ROWS, key=str)
    assert info.stats["splits"] == {"train": {"rows": len(train)}, "val": {"rows": len(val)}}
    assert (root / "tokenizer/tokenizer.json").read_bytes() == (
        tok_dir / "tokenizer.json"
    ).read_bytes()
    assert json.loads((root / "config.json").read_text())["kind"] == "dpo"

    # the same rows again are the same version; another split is another version
    again = write_pairs_dataset(
        workspace, "prefs", "dpo", DPO_ROWS, tokenizer_dir=tok_dir, val_fraction=0.25
    )
    assert again.id == info.id
    other = write_pairs_dataset(
        workspace, "prefs", "dpo", DPO_ROWS, tokenizer_dir=tok_dir, val_fraction=0.0
    )
    assert other.version == 2 and other.stats["splits"]["val"] == {"rows": 0}
    assert not (workspace.store.open_verified(other.artifact) / "pairs/val.jsonl").exists()


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("sft", {"prompt": "p"}, "row 1: missing response"),
        ("sft", {"prompt": "p", "response": 3}, "response must be a string"),
        ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ("sft", {"messages": [{"role": "user"}]}, "messages[0] must be an object"),
        ("dpo", {"prompt": "p", "chosen": "a"}, "missing rejected"),
        ("dpo", {"prompt": "p", "chosen": "a", "rejected": "a"}, "the same text"),
        ("sft", ["p", "r"], "expected a JSON object"),
        ("sft", {"prompt": "p", "response": "r", "meta": {1j}}, "not JSON-serializable"),
        ("classification", {"text": "a film"}, "missing label"),
        ("classification", {"text": " ", "label": "pos"}, "text is empty"),
        ("token_classification", {"tokens": ["a", "b"], "labels": ["O"]}, "2 tokens but 1"),
        ("token_classification", {"tokens": "a b", "labels": ["O"]}, "tokens must be a non-empty"),
        ("retrieval", {"query": "q", "positive": "p", "negative": 1}, "negative must be a str"),
    ],
)
def test_a_bad_row_is_refused_by_its_index(
    workspace: Workspace, tok_dir: Path, kind: Any, row: Any, message: str
) -> None:
    good = GOOD_ROWS[kind]
    with pytest.raises(GenloopError, match=message.replace("[", r"\[")):
        write_pairs_dataset(workspace, "bad", kind, [good, row], tokenizer_dir=tok_dir)
    assert workspace.store.keys("datasets") == []


GOOD_ROWS: dict[str, dict[str, Any]] = {
    "sft": SFT_ROWS[0],
    "dpo": DPO_ROWS[0],
    "classification": {"text": "a fine film", "label": "pos"},
    "token_classification": {"tokens": ["Ada", "wrote"], "labels": ["B-PER", "O"]},
    "retrieval": {"query": "who wrote it", "positive": "Ada wrote it", "negative": "rain"},
}


@pytest.mark.parametrize("kind", ["classification", "token_classification", "retrieval"])
def test_labeled_rows_make_a_dataset_of_their_kind(
    workspace: Workspace, tok_dir: Path, kind: Any
) -> None:
    info = write_pairs_dataset(
        workspace, f"rows-{kind.replace('_', '-')}", kind, [GOOD_ROWS[kind]], tokenizer_dir=tok_dir
    )
    data = workspace.store.open_verified(info.artifact)
    assert pairs_kind(data) == kind
    assert read_pairs(data, "train", kind) == [GOOD_ROWS[kind]]


def test_a_caller_may_split_the_rows_itself(workspace: Workspace, tok_dir: Path) -> None:
    info = write_pairs_dataset(
        workspace,
        "given",
        "sft",
        SFT_ROWS[:7],
        tokenizer_dir=tok_dir,
        val_rows=SFT_ROWS[7:],
        extra_stats={"augment": {"kept": 3}},
    )
    data = workspace.store.open_verified(info.artifact)
    assert read_pairs(data, "train", "sft") == SFT_ROWS[:7]
    assert read_pairs(data, "val", "sft") == SFT_ROWS[7:]
    assert info.config["split"] == "given" and info.stats["augment"] == {"kept": 3}
    assert info.stats["splits"] == {"train": {"rows": 7}, "val": {"rows": 3}}
    # the split is part of the content: the same rows split otherwise are another version
    other = write_pairs_dataset(
        workspace, "given", "sft", SFT_ROWS[:6], tokenizer_dir=tok_dir, val_rows=SFT_ROWS[6:]
    )
    assert other.version == 2

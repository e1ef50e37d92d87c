"""``genloop label``: create, next, submit (once), annotate, show, list and export."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genloop.data.pairs import read_pairs
from genloop.data.tokenizer import train_bpe
from genloop.workspace import init_workspace
from genloop.workspace.datasets import resolve_dataset

from ..conftest import run_genloop
from .test_cli import ok, one_line_error

ROWS = [
    {"text": "a lovely quiet film", "label": "pos"},
    {"text": "dull and far too long"},
    {"text": "the cast is wonderful"},
]


def genloop(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``python -m genloop ARGS`` in a subprocess, importing the genloop under test."""
    import genloop as package

    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    src = str(Path(package.__file__).resolve().parents[1])
    env |= {"GENLOOP_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1", "PYTHONPATH": src}
    return subprocess.run(
        [sys.executable, "-m", "genloop", *args],
        env=env,
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    init_workspace(tmp_path / "ws").close()
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path / "ws"


def test_create_next_and_submit_once_in_subprocesses(home: Path) -> None:
    file = str(home.parent / "reviews.jsonl")
    created = ok(
        genloop(
            "label",
            "create",
            "reviews",
            "-k",
            "classification",
            "-f",
            file,
            "--labels",
            "pos,neg",
            "--json",
            home=home,
        )
    )
    task = json.loads(created.stdout)
    assert (task["items"], task["label_set"], task["prelabel_source"]) == (
        3,
        ["pos", "neg"],
        "file",
    )

    nxt = json.loads(
        ok(genloop("label", "next", "reviews", "-a", "alice", "--json", home=home)).stdout
    )
    item = nxt["item"]
    assert item["position"] == 0 and item["prelabel"] == {"label": "pos"}

    submitted = ok(
        genloop(
            "label",
            "submit",
            "reviews",
            str(item["id"]),
            "--accept",
            "-a",
            "alice",
            "--json",
            home=home,
        )
    )
    assert json.loads(submitted.stdout)["prelabel_accepted"] is True

    again = genloop(
        "label", "submit", "reviews", str(item["id"]), "--label", "neg", "-a", "alice", home=home
    )
    assert "already labeled by alice; a second submission is refused" in one_line_error(again, 1)


def test_annotate_in_the_terminal_then_show_and_export(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = home.parent / "reviews.jsonl"
    assert (
        run_genloop(
            home,
            "label",
            "create",
            "reviews",
            "--kind",
            "classification",
            "--file",
            file,
            "--labels",
            "pos,neg",
        ).returncode
        == 0
    )

    shown = run_genloop(home, "label", "next", "reviews", "-a", "bob")
    assert "a lovely quiet film" in shown.stdout and "pre-label: pos" in shown.stdout
    assert "genloop label submit reviews" in shown.stdout

    # Enter accepts the pre-label of item 1; "2" is the second label (neg); q stops
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n2\nq\n"))
    annotated = run_genloop(home, "label", "annotate", "reviews", "-a", "bob")
    assert annotated.returncode == 0, annotated.output
    assert "2 labeled by bob; 1 left for you" in annotated.stdout

    bad = run_genloop(home, "label", "submit", "reviews", "3", "--label", "meh", "-a", "bob")
    assert bad.returncode == 1 and 'label "meh" is not in the label set (pos, neg)' in bad.stderr
    twice = run_genloop(home, "label", "submit", "reviews", "1", "--label", "pos", "--choice", "a")
    assert twice.returncode == 2 and "give the label one way" in twice.stderr

    state = json.loads(run_genloop(home, "label", "show", "reviews", "-a", "bob", "--json").stdout)
    progress = state["progress"]
    assert progress["annotators"] == {"bob": 2} and progress["you"]["remaining"] == 1
    assert progress["prelabels"] == {"items": 1, "reviewed": 1, "accepted": 1, "accuracy": 1.0}
    text = run_genloop(home, "label", "show", "reviews", "-a", "bob").stdout
    assert "1 of 1 accepted (accuracy 1.000)" in text

    listed = json.loads(run_genloop(home, "label", "list", "--json").stdout)
    assert [(t["name"], t["progress"]["labels"]) for t in listed] == [("reviews", 2)]

    tok = train_bpe(
        [r["text"] for r in ROWS] * 4, tmp_path / "tok", vocab_size=300, min_frequency=1
    )
    exported = run_genloop(home, "label", "export", "reviews", "--tokenizer", tok, "--json")
    assert exported.returncode == 0, exported.output
    result = json.loads(exported.stdout)
    assert (result["dataset"], result["kind"], result["rows"]) == (
        "reviews-labels@1",
        "classification",
        2,
    )
    assert result["counts"]["unlabeled"] == 1
    with init_workspace(home) as ws:
        info = resolve_dataset(ws, "reviews-labels")
        rows = read_pairs(ws.store.open_verified(info.artifact), "train", "classification")
    assert [(r["text"], r["label"]) for r in rows] == [
        (ROWS[0]["text"], "pos"),
        (ROWS[1]["text"], "neg"),
    ]
    assert info.lineage["annotators"] == ["bob"]


def test_annotate_refuses_kinds_it_does_not_handle(home: Path) -> None:
    spans = home.parent / "spans.jsonl"
    spans.write_text(json.dumps({"text": "Ada met Bob"}) + "\n")
    assert (
        run_genloop(
            home, "label", "create", "ner", "-k", "spans", "-f", spans, "-l", "PER"
        ).returncode
        == 0
    )
    out = run_genloop(home, "label", "annotate", "ner", "-a", "bob")
    assert out.returncode == 2 and "annotate is for classification and preference" in out.stderr

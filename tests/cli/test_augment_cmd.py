"""``genloop augment text`` as a user runs it: the real command in a subprocess, on a
workspace holding imported rows and a tiny causal LM; bad input is one line, no traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from genloop.data.pairs import import_rows, write_pairs_dataset
from genloop.data.tokenizer import train_bpe
from genloop.workspace import init_workspace, registry

from ..serve.conftest import build_model
from .test_data_cmd import genloop, ok, one_line_error

WORDS = {"lovely": "pos", "bright": "pos", "clever": "pos", "warm": "pos"}
WORDS |= {"dull": "neg", "cold": "neg", "flat": "neg", "weak": "neg"}
ROWS = [
    {"text": f"The film felt {w} and the cast made every scene {w} too", "label": y}
    for w, y in WORDS.items()
]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with ``reviews`` (imported classification rows), ``tags``
    (token classification) and ``tiny`` (a causal LM)."""
    root = tmp_path_factory.mktemp("cli")
    home = root / "ws"
    ws = init_workspace(home)
    try:
        tok = train_bpe([r["text"] for r in ROWS] * 4, root / "tok", vocab_size=300)
        (root / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
        import_rows(ws, root / "reviews.jsonl", "reviews", "classification", tokenizer_dir=tok)
        tagged = [{"tokens": ["Paris", "is", "big"], "labels": ["LOC", "O", "O"]}]
        write_pairs_dataset(ws, "tags", "token_classification", tagged, tokenizer_dir=tok)
        registry.register_model(ws, "tiny", "causal_lm", build_model(root / "lm", tok, seed=0))
    finally:
        ws.close()
    return home


def test_eda_writes_an_augmented_version(home: Path) -> None:
    out = ok(
        genloop("augment", "text", "reviews", "--method", "eda", "-n", "2", "--json", home=home)
    )
    result = json.loads(out)
    stats = result["version"]["stats"]["augment"]
    assert result["version"]["ref"] == "reviews-augmented@1" and result["source"] == "reviews@1"
    assert stats["generated"] == 2 * stats["source_rows"] == result["generated"]
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["generated"]
    assert result["version"]["lineage"]["method"] == "eda"

    args = ("augment", "text", "reviews", "-m", "eda", "--seed", "3", "--name", "more")
    line = ok(genloop(*args, home=home)).strip()
    assert line.startswith("dataset more@1 (classification): ") and "from reviews@1" in line
    found = re.search(r"eda generated (\d+), kept (\d+), dropped: ", line)
    assert found and int(found[1]) == stats["source_rows"] >= int(found[2]) > 0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["text", "nosuch", "-m", "eda"], 1, "no dataset named 'nosuch'"),
        (["text", "tags", "-m", "eda"], 1, "eda can't augment a token_classification dataset"),
        (["text", "reviews", "-m", "synonyms", "--model", "tiny"], 1, "tiny@1 is a causal_lm"),
        (["text", "reviews", "-m", "paraphrase"], 2, "paraphrase needs a teacher"),
        (
            ["text", "reviews", "-m", "self-instruct", "--teacher", "tiny"],
            1,
            "self-instruct writes instruction/response rows, so it needs an sft dataset",
        ),
        (
            [
                "text",
                "reviews",
                "-m",
                "paraphrase",
                "--upstream",
                "ftp://h",
                "--upstream-model",
                "m",
            ],
            2,
            "--upstream must be an http(s) URL",
        ),
        # the short form of 'augment images' still reaches it
        (["tiny", "--per-class", "1"], 1, "tiny@1 is a causal_lm model; augment needs an image"),
    ],
)
def test_bad_input_is_one_clear_line(home: Path, args: list[str], code: int, message: str) -> None:
    assert message in one_line_error(genloop("augment", *args, home=home), code)

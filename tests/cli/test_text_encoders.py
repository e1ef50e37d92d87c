"""From a JSON Lines file of labeled rows to a trained, evaluated classifier, as a user runs
it (docs/text-encoders.md): import a local BERT checkpoint, import the rows with its
tokenizer, fine-tune a classification head on it, evaluate it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from genloop.workspace import Workspace, registry

from ..conftest import PROSE, run_genloop

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("one_torch_thread", "no_report_plots"),
]


def tiny_bert(out: Path) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM with a WordPiece tokenizer, as save_pretrained
    writes them (random weights, fixed seed)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    words = sorted(set(PROSE.split()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "great", "awful", "."]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reviews(path: Path, n: int = 160) -> Path:
    """Rows {"text", "label"}: a sentence of the fixture prose that says great or awful."""
    rng = random.Random(0)
    words = PROSE.split()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.choice(["great", "awful"])
            text = [rng.choice(words) for _ in range(5)]
            text.insert(rng.randrange(6), label)
            f.write(json.dumps({"text": " ".join(text) + " .", "label": label}) + "\n")
    return path


def test_labeled_rows_to_a_trained_classifier(workspace: Workspace, tmp_path: Path) -> None:
    source = tiny_bert(tmp_path / "tiny-bert")
    ran = run_genloop(workspace, "models", "import", source)
    assert ran.returncode == 0, ran.stderr
    assert "imported tiny-bert@1: BertForMaskedLM (masked_lm)" in ran.stdout
    assert "model.base_model: tiny-bert@1" in ran.stdout  # what to do next

    rows = reviews(tmp_path / "reviews.jsonl")
    ran = run_genloop(
        workspace, "data", "import", rows, "--kind", "classification", "--name", "reviews",
        "--tokenizer", "tiny-bert@1",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "dataset reviews@1 (classification): 160 rows" in ran.stdout

    spec = {
        "name": "sentiment",
        "model": {"family": "masked_lm", "base_model": "tiny-bert@1"},
        "train": {
            "objective": "classification",
            "dataset": "reviews",
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 3,
            "max_steps": 40,
            "batch_size": 16,
            "eval_every": 20,
            "eval_batches": 2,
            "checkpoint_every": 40,
            "device": "cpu",
        },
    }
    config = tmp_path / "sentiment.yaml"
    config.write_text(yaml.safe_dump(spec), encoding="utf-8")
    ran = run_genloop(workspace, "train", config)
    assert ran.returncode == 0, ran.stderr
    assert "registered model sentiment@1" in ran.stdout
    info = registry.resolve(workspace, "sentiment@1")
    assert info.family == "masked_lm" and info.parent == "tiny-bert@1"
    saved = json.loads(
        (registry.artifact_path(workspace, "sentiment@1") / "config.json").read_text()
    )
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert saved["id2label"] == {"0": "awful", "1": "great"}

    ran = run_genloop(workspace, "eval", "sentiment", "--json")
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    assert record["suites"] == ["classification"]
    assert record["metrics"]["accuracy"] > 0.9  # the label is a word of the text
    assert record["metrics"]["accuracy_ci_low"] <= record["metrics"]["accuracy"]

    ran = run_genloop(workspace, "generate", "sentiment", "-p", "hello")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "generates no text; embed a file with --embed" in ran.stderr

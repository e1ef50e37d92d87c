"""Model-assisted pre-labels from tiny models registered in a workspace.

The classifiers are random 2-layer, 32-wide BERTs with a sequence or a token
classification head, saved in the Hugging Face layout of a ``masked_lm`` model version
(``genloop.json`` names the family and the task); the generator is a random 2-layer Llama.
Their predictions are arbitrary, so each test compares the pre-labels with the model's
own prediction computed independently, one item at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from genloop.data.tokenizer import TOKENIZER_FILES, load_hf_tokenizer, train_bpe
from genloop.feedback.labeling.prelabel import PrelabelError
from genloop.feedback.labeling.queue import next_item, progress, submit_label
from genloop.feedback.labeling.tasks import LabelError, create_task, get_task
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.tables import LabelItem

from ..serve.conftest import CORPUS, build_model

TEXTS = ["the cat sat on the mat", "rain fell on the town", "hello there", "def add(a, b)"]
TOKENS = [t.split() for t in TEXTS]
PROMPTS = ["The cat", "Rain fell", "Hello"]


def save_classifier(out: Path, tok_dir: Path, head: str, labels: list[str]) -> Path:
    import torch
    import transformers

    tok = load_hf_tokenizer(tok_dir)
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"BertFor{head}")(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    task = "sequence_classification" if head == "SequenceClassification" else "token_classification"
    (out / "genloop.json").write_text(json.dumps({"family": "masked_lm", "task": task}))
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """``sentiment`` (a sequence classifier), ``ner`` (a token classifier) and ``lm``."""
    root = tmp_path_factory.mktemp("prelabel")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    workspace = init_workspace(root / "ws")
    cls = save_classifier(root / "cls", tok, "SequenceClassification", ["neg", "pos"])
    ner = save_classifier(root / "ner", tok, "TokenClassification", ["O", "PER", "LOC"])
    registry.register_model(workspace, "sentiment", "masked_lm", cls)
    registry.register_model(workspace, "tagger", "masked_lm", ner)
    registry.register_model(workspace, "lm", "causal_lm", build_model(root / "lm", tok, seed=0))
    yield workspace
    workspace.close()


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items(ws: Workspace, task: str) -> list[tuple[int, dict[str, Any], Any]]:
    """(id, payload, pre-label) of each item of ``task``, in order."""
    info = get_task(ws, task)
    with ws.catalog.session() as s:
        rows = s.scalars(
            sa.select(LabelItem).where(LabelItem.task_id == info.id).order_by(LabelItem.position)
        ).all()
        return [(r.id, r.payload, r.prelabel) for r in rows]


def test_a_classifier_pre_labels_and_its_accuracy_is_reported(
    ws: Workspace, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    file = jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    task = create_task(ws, "sent", "classification", file=file, model="sentiment")
    assert task.label_set == ["neg", "pos"]  # the model's labels
    assert task.prelabel_source == "model:sentiment@1"
    path = registry.artifact_path(ws, "sentiment")
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = load_hf_tokenizer(path)
    got = items(ws, "sent")
    for (_id, payload, prelabel), text in zip(got, TEXTS, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits
        assert payload == {"text": text}
        assert prelabel == {"label": ["neg", "pos"][int(logits.argmax())]}

    # accept the first pre-label, correct the second: half were right
    for accept in (True, False):
        item = next_item(ws, "sent", "alice")
        assert item is not None and item.prelabel is not None
        label = item.prelabel["label"]
        value = label if accept else {"neg": "pos", "pos": "neg"}[label]
        assert (
            submit_label(ws, "sent", item.id, "alice", {"label": value}).prelabel_accepted is accept
        )
    pre = progress(ws, "sent")["prelabels"]
    assert pre == {"items": 4, "reviewed": 2, "accepted": 1, "accuracy": 0.5}


def test_a_token_classifier_pre_labels_each_token(ws: Workspace, tmp_path: Path) -> None:
    """Each word gets the tag the model gives its first piece, read as the family reads
    words in training and evaluation (``masked_lm.predict_tags``)."""
    from genloop.models.masked_lm import load_masked_lm, predict_tags

    file = jsonl(tmp_path / "tokens.jsonl", [{"tokens": t} for t in TOKENS])
    task = create_task(ws, "tags", "spans", file=file, model="tagger")
    assert task.label_set == ["PER", "LOC"]  # O is implicit
    model, tok = load_masked_lm(registry.artifact_path(ws, "tagger"))
    want = predict_tags(model, tok, TOKENS)
    got = [prelabel for _id, _payload, prelabel in items(ws, "tags")]
    assert got == [{"labels": tags} for tags in want]
    assert all(len(t) == len(w) for t, w in zip(want, TOKENS, strict=True))


def test_a_generator_writes_both_candidates_and_caption_drafts(
    ws: Workspace, tmp_path: Path
) -> None:
    from genloop.evaluate.generate import generate_texts, load_model_for_eval

    file = jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    task = create_task(ws, "pick", "preference", file=file, model="lm", max_new_tokens=8)
    assert task.source["model"] == "lm@1" and task.source["prelabel_settings"]["b"] == {
        "temperature": 1.0,
        "seed": 1,
    }
    model, tok = load_model_for_eval(registry.artifact_path(ws, "lm"))
    kw: dict[str, Any] = {"max_new_tokens": 8, "batch_size": 16}
    a = generate_texts(model, tok, PROMPTS, temperature=0.7, seed=0, **kw)
    b = generate_texts(model, tok, PROMPTS, temperature=1.0, seed=1, **kw)
    got = items(ws, "pick")
    assert [p["a"] for _, p, _ in got] == [x.strip() for x in a]
    assert [p["b"] for _, p, _ in got] == [x.strip() for x in b]
    assert any(p["a"] != p["b"] for _, p, _ in got)
    assert all(pre is None and p["format"] == "completion" for _, p, pre in got)

    task = create_task(ws, "draft", "caption", file=file, model="lm", max_new_tokens=8)
    greedy = generate_texts(model, tok, PROMPTS, temperature=0.0, **kw)
    assert [pre for _, _, pre in items(ws, "draft")] == [
        {"text": x.strip()} if x.strip() else None for x in greedy
    ]


def test_a_model_that_cannot_pre_label_the_kind_is_refused(ws: Workspace, tmp_path: Path) -> None:
    file = jsonl(tmp_path / "t.jsonl", [{"text": "hello there", "prompt": "hi"}])
    with pytest.raises(PrelabelError, match=r"from a sequence classifier.*lm@1 is a causal_lm"):
        create_task(ws, "x", "classification", file=file, model="lm", labels=["a", "b"])
    with pytest.raises(
        PrelabelError, match=r"generated by a text model.*sentiment@1 is a masked_lm"
    ):
        create_task(ws, "x", "caption", file=file, model="sentiment")
    with pytest.raises(LabelError, match=r"label \"neg\" is not in the label set \(x, y\)"):
        create_task(ws, "x", "classification", file=file, model="sentiment", labels=["x", "y"])


def test_chosen_candidates_export_to_dpo_rows_that_train(ws: Workspace, tmp_path: Path) -> None:
    from genloop.config import GenloopConfig
    from genloop.feedback.labeling.export import export_task
    from genloop.train.loop import train

    file = jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    create_task(ws, "duel", "preference", file=file, model="lm", max_new_tokens=8)
    while (item := next_item(ws, "duel", "alice")) is not None:
        submit_label(ws, "duel", item.id, "alice", {"choice": "b" if item.position else "a"})
    result = export_task(ws, "duel")  # the rows take the generator's tokenizer
    assert result.kind == "dpo" and result.rows + result.counts["identical"] == len(PROMPTS)
    cfg = GenloopConfig.model_validate(
        {
            "name": "lm-dpo",
            "model": {"base_model": "lm"},
            "train": {
                "objective": "dpo",
                "dataset": result.dataset.ref,
                "max_steps": 2,
                "warmup_steps": 1,
                "batch_size": 2,
                "eval_every": 2,
                "checkpoint_every": 2,
                "device": "cpu",
            },
        }
    )
    train(ws, cfg)
    trained = registry.resolve(ws, "lm-dpo")
    assert trained.dataset_version_id == result.dataset.id

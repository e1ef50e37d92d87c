"""masked_lm training: dynamic masking (its statistics, whole words), then the real loop on a
2-layer, 32-wide encoder: MLM pretraining on the fixture corpus, a classifier and a tagger
fine-tuned on labeled rows from it, and the errors a user meets on the way."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genloop.config import GenloopConfig
from genloop.data.tokenizer import DEFAULT_SPECIAL_TOKENS, load_hf_tokenizer
from genloop.errors import GenloopError
from genloop.train.families import TrainingData, get_builder
from genloop.train.loop import TrainResult, train
from genloop.train.masking import Masking, mask_tokens, masking_for, word_starts
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import PROSE, write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = [*DEFAULT_SPECIAL_TOKENS, "<|mask|>"]
ANIMALS = ("cat", "dog", "birds", "children")
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}


# ------------------------------------------------------------------------------ masking


def masking(p: float = 0.15, *, words: bool = False) -> Masking:
    """A 1000-token vocabulary: ids 0-3 special, 4 the mask; id % 3 == 0 starts a word."""
    special = np.zeros(1000, dtype=bool)
    special[:5] = True
    starts = np.arange(1000) % 3 == 0 if words else None
    return Masking(mask_id=4, special=special, probability=p, word_start=starts)


def test_masking_follows_bert_80_10_10_and_never_touches_special_tokens() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(64, 512))
    ids[:, 0], ids[:, -1], ids[:, 100] = 0, 1, 2  # cls, sep, eos: never masked
    inputs, labels = mask_tokens(ids, np.random.default_rng(1), masking())
    chosen = labels != -100
    assert not chosen[:, [0, 100, 511]].any()
    assert (inputs[:, [0, 100, 511]] == ids[:, [0, 100, 511]]).all()
    assert (labels[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    n = chosen.sum()
    assert abs(n / (64 * 509) - 0.15) < 0.01
    masked = (inputs == 4) & chosen
    unchanged = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~unchanged
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(replaced.sum() / n - 0.1) < 0.015  # a random draw equal to the token: 1 in 995
    assert abs(unchanged.sum() / n - 0.1) < 0.015
    assert inputs[replaced].min() >= 5  # random replacements are never special tokens


def test_masks_are_new_each_draw_and_the_same_for_the_same_seed() -> None:
    ids = np.random.default_rng(0).integers(5, 1000, size=(4, 64))
    a = mask_tokens(ids, np.random.default_rng([0, 0, 7, 0]), masking())
    b = mask_tokens(ids, np.random.default_rng([0, 0, 7, 0]), masking())
    c = mask_tokens(ids, np.random.default_rng([0, 0, 8, 0]), masking())
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_every_sequence_gets_a_target_and_an_all_special_one_none() -> None:
    ids = np.array([[0, 7, 8, 1], [0, 1, 2, 3]])
    for seed in range(20):
        _, labels = mask_tokens(ids, np.random.default_rng(seed), masking(0.01))
        assert (labels[0] != -100).sum() >= 1 and (labels[1] == -100).all()


def test_whole_word_masking_masks_every_piece_of_a_chosen_word() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(32, 256))
    ids[:, 0] = 0
    m = masking(words=True)
    _, labels = mask_tokens(ids, np.random.default_rng(1), m)
    assert m.word_start is not None
    chosen_words = total_words = 0
    for row, row_labels in zip(ids, labels, strict=True):
        # words: a start token (or the token after cls) and the non-start tokens after it
        bounds = [j for j in range(1, len(row)) if m.word_start[row[j]] or j == 1] + [len(row)]
        for a, b in itertools.pairwise(bounds):
            hit = row_labels[a:b] != -100
            assert hit.all() or not hit.any(), (a, b, row_labels[a:b])
            chosen_words += int(hit.all())
            total_words += 1
    assert abs(chosen_words / total_words - 0.15) < 0.02


def test_word_starts_read_the_vocabulary_style() -> None:
    assert word_starts(["Ġthe", "own", "Ċ", "x"]).tolist() == [True, False, True, False]
    assert word_starts(["the", "##s", "[CLS]"]).tolist() == [True, False, True]
    assert word_starts(["▁the", "s"]).tolist() == [True, False]


def test_masking_of_a_bpe_knows_its_special_tokens(tmp_path: Path) -> None:
    from genloop.data.tokenizer import train_bpe

    tok = load_hf_tokenizer(
        train_bpe([PROSE] * 3, tmp_path / "t", vocab_size=300, special_tokens=SPECIALS)
    )
    m = masking_for(tok, tok.mask_token_id, 0.15, whole_word=True)
    assert m.special[: len(SPECIALS)].all() and m.special.sum() == len(SPECIALS)
    assert m.word_start is not None and m.word_start[tok.convert_tokens_to_ids("Ġthe")]


# ----------------------------------------------------------------------- the training loop


def labeled_rows(n: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Classification rows (is an animal named, and which) and tagged rows (animals are
    B-ANIMAL) drawn from the fixture prose."""
    rng = random.Random(seed)
    words = PROSE.split()
    texts: list[dict[str, str]] = []
    tagged: list[dict[str, Any]] = []
    for _ in range(n):
        picked = [rng.choice(words) for _ in range(6)]
        animal = next((w for w in picked if w in ANIMALS), "none")
        texts.append({"text": " ".join(picked), "label": "none" if animal == "none" else "animal"})
        tagged.append(
            {"tokens": picked, "labels": ["B-ANIMAL" if w in ANIMALS else "O" for w in picked]}
        )
    return texts, tagged


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with ``prose`` (text with a mask token in its BPE) and, in its tokenizer,
    the labeled rows ``topics`` (classification), ``tags`` (token classification) and
    ``pairs`` (retrieval)."""
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.pairs import write_pairs_dataset
    from genloop.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("encoders")
    workspace = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "prose",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    tokenizer = TokenizerConfig(vocab_size=320, seq_len=32, special_tokens=SPECIALS)
    version, _ = prepare_dataset(workspace, data, tokenizer)
    tok_dir = workspace.store.open_verified(version.artifact) / "tokenizer"
    texts, tagged = labeled_rows(240, 0)
    write_pairs_dataset(workspace, "topics", "classification", texts, tokenizer_dir=tok_dir)
    write_pairs_dataset(workspace, "tags", "token_classification", tagged, tokenizer_dir=tok_dir)
    pairs = [{"query": t["text"], "positive": t["text"].upper()} for t in texts[:40]]
    write_pairs_dataset(workspace, "pairs", "retrieval", pairs, tokenizer_dir=tok_dir)
    yield workspace
    workspace.close()


def config(
    name: str, objective: str, dataset: str, *, steps: int = 30, **model: Any
) -> GenloopConfig:
    return GenloopConfig.model_validate(
        {
            "name": name,
            "model": {"family": "masked_lm", **model},
            "train": {
                "objective": objective,
                "dataset": dataset,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 3,
                "max_steps": steps,
                "batch_size": 16,
                "eval_every": steps // 2,
                "eval_batches": 2,
                "checkpoint_every": steps,
                "device": "cpu",
            },
        }
    )


def falls(result: TrainResult) -> None:
    first, last = np.mean(result.history[:3]), np.mean(result.history[-3:])
    assert last < 0.8 * first, (first, last)


@pytest.fixture(scope="module")
def pretrained(ws: Workspace) -> TrainResult:
    """30 steps of MLM pretraining with whole-word masking."""
    cfg = config("enc", "mlm", "prose", **TINY)
    cfg.train.whole_word_mask = True
    return train(ws, cfg)


def test_mlm_pretraining_lowers_the_loss_and_saves_a_masked_lm(
    ws: Workspace, pretrained: TrainResult
) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    falls(pretrained)
    assert "val_loss" in pretrained.metrics
    info = pretrained.model
    assert info is not None and info.family == "masked_lm"
    assert info.config["model"]["task"] == "mlm"
    path = registry.artifact_path(ws, info.ref)
    model = AutoModelForMaskedLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "BertForMaskedLM" and tok.mask_token == "<|mask|>"


def test_a_classifier_fine_tuned_from_the_pretrained_encoder(
    ws: Workspace, pretrained: TrainResult
) -> None:
    from genloop.models.masked_lm import load_masked_lm, predict_labels

    assert pretrained.model is not None
    ref = pretrained.model.ref
    result = train(ws, config("topic", "classification", "topics", steps=60, base_model=ref))
    falls(result)
    assert result.model is not None and result.model.parent == pretrained.model.ref
    path = registry.artifact_path(ws, result.model.ref)
    saved = json.loads((path / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert saved["id2label"] == {"0": "animal", "1": "none"}  # sorted from the data
    model, tok = load_masked_lm(path)
    assert set(predict_labels(model, tok, ["the cat sat on the mat", "a quiet river"])) <= {
        "animal",
        "none",
    }


def test_a_modernbert_tagger_trains_from_scratch(ws: Workspace) -> None:
    result = train(
        ws,
        config(
            "tagger",
            "token_classification",
            "tags",
            masked_lm={"architecture": "modernbert"},
            **TINY,
        ),
    )
    falls(result)
    assert result.model is not None
    path = registry.artifact_path(ws, result.model.ref)
    saved = json.loads((path / "config.json").read_text())
    assert saved["architectures"] == ["ModernBertForTokenClassification"]
    assert saved["id2label"] == {"0": "B-ANIMAL", "1": "O"}


def test_an_objective_needs_a_dataset_of_its_kind(ws: Workspace) -> None:
    with pytest.raises(
        GenloopError,
        match=r"objective is classification, but dataset prose@1 is for mlm.*--kind classification",
    ):
        train(ws, config("wrong", "classification", "prose", **TINY))
    with pytest.raises(
        GenloopError, match=r"objective is mlm, but dataset topics@1 is for classification"
    ):
        train(ws, config("wrong", "mlm", "topics", **TINY))


def test_a_validation_label_the_training_rows_lack_is_an_error(
    ws: Workspace, pretrained: TrainResult
) -> None:
    from genloop.data.pack import assign_split
    from genloop.data.pairs import write_pairs_dataset

    def split(row: dict[str, str]) -> str:  # as write_pairs_dataset assigns it
        return assign_split(json.dumps(row, sort_keys=True), 0.1, 0.0, 0)

    texts, _ = labeled_rows(60, 1)
    rows = ({"label": "weather", "text": f"rain {i}"} for i in range(1000))
    odd = next(row for row in rows if split(row) == "val")
    assert pretrained.model is not None
    tok_dir = registry.artifact_path(ws, pretrained.model.ref)
    write_pairs_dataset(ws, "odd", "classification", [*texts, odd], tokenizer_dir=tok_dir)
    with pytest.raises(
        GenloopError,
        match=r"odd@1 val row \d+: label 'weather' is not one the model predicts \(animal, none\)",
    ):
        train(ws, config("odd", "classification", "odd", **TINY))


def test_pretraining_without_a_mask_token_names_the_fix(
    tmp_path: Path, workspace: Workspace
) -> None:
    from genloop.data.tokenizer import train_bpe

    (tmp_path / "tokens").mkdir()
    tok_dir = train_bpe([PROSE] * 3, tmp_path / "tokenizer", vocab_size=300)
    data = TrainingData(ref="plain@1", dir=tmp_path, tokenizer_dir=tok_dir, seq_len=32)
    m = config("x", "mlm", "plain", **TINY).model
    with pytest.raises(
        GenloopError,
        match=r'dataset plain@1 has no mask token.*add "<\|mask\|>" to tokenizer.special_tokens',
    ):
        get_builder("masked_lm").build_model(workspace, m, data, torch.device("cpu"))
    with pytest.raises(
        ValueError, match=r'needs a mask token: add "<\|mask\|>" to tokenizer.special_tokens'
    ):
        GenloopConfig.model_validate(
            {
                "data": {"name": "d", "sources": [{"type": "files", "paths": ["x"]}]},
                "model": {"family": "masked_lm"},
                "train": {"objective": "mlm"},
            }
        )


def test_retrieval_rows_build_the_bare_encoder_for_the_embedding_objective(
    ws: Workspace, pretrained: TrainResult
) -> None:
    from genloop.models.masked_lm import task_of
    from genloop.workspace.datasets import resolve_dataset

    dataset = ws.store.open_verified(resolve_dataset(ws, "pairs").artifact)
    data = TrainingData(ref="pairs@1", dir=dataset, tokenizer_dir=dataset / "tokenizer", seq_len=32)
    builder = get_builder("masked_lm")
    assert pretrained.model is not None
    for m in (
        config("e", "embedding", "pairs", **TINY).model,
        config("e", "embedding", "pairs", base_model=pretrained.model.ref).model,
    ):
        model, model_config, _ = builder.build_model(ws, m, data, torch.device("cpu"))
        assert task_of(model) == "embedding" and type(model).__name__ == "BertModel"
        assert model.base_model is model  # what the contrastive objective calls
        assert model_config["task"] == "embedding"
        assert not any(p.requires_grad for p in model.pooler.parameters())  # unused: frozen


def test_an_embedding_model_trains_contrastively_and_is_evaluated_by_retrieval(
    ws: Workspace, pretrained: TrainResult
) -> None:
    """The whole path: the pretrained encoder fine-tuned on retrieval rows through the loop,
    saved as an embedding model, embedded by the serving loader and scored by its default
    suite (retrieval, beside TF-IDF)."""
    from genloop.evaluate.run import evaluate_model
    from genloop.models.embeddings import load_embedder

    assert pretrained.model is not None
    cfg = config("emb", "embedding", "pairs", steps=40, base_model=pretrained.model.ref)
    result = train(ws, cfg)
    falls(result)
    assert result.model is not None and result.model.family == "masked_lm"
    path = registry.artifact_path(ws, result.model.ref)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BertModel"]
    embedder = load_embedder(path)
    vectors = embedder.embed(["the cat sat", "THE CAT SAT", "a quiet river"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ids = embedder.tokenizer("a cat")["input_ids"]  # framed as the family trains: cls … sep
    assert ids[0] == embedder.tokenizer.cls_token_id and ids[-1] == embedder.tokenizer.sep_token_id
    record = evaluate_model(ws, result.model.ref, dataset="pairs", device="cpu")
    assert record.suite == "retrieval"  # an embedding model's default suite
    assert 0.0 <= record.metrics["mrr"] <= 1.0  # type: ignore[operator]
    assert "tfidf_mrr" in record.metrics


def test_mlm_batches_resume_exactly_and_validation_masks_stay_fixed(
    ws: Workspace, pretrained: TrainResult
) -> None:
    from genloop.models.masked_lm import load_masked_lm
    from genloop.workspace.datasets import resolve_dataset

    assert pretrained.model is not None
    encoder, tok = load_masked_lm(registry.artifact_path(ws, pretrained.model.ref))
    dataset = ws.store.open_verified(resolve_dataset(ws, "prose").artifact)
    data = TrainingData("prose@1", dataset, dataset / "tokenizer", seq_len=32)
    t = config("enc", "mlm", "prose").train
    objective = get_builder("masked_lm").make_objective(t, data, encoder, torch.device("cpu"))
    stream = objective.train_batches(0)
    first = [next(stream) for _ in range(6)]
    resumed = next(objective.train_batches(5))  # as --resume at micro-step 5 starts
    for key in ("input_ids", "labels"):
        assert torch.equal(resumed[key], first[5][key])
        assert not torch.equal(first[4][key], first[5][key])  # a new mask each batch
    a, b = objective.val_batches(2), objective.val_batches(2)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b, strict=True))
    ids = first[0]["input_ids"]
    assert ids.shape == (16, 32) and (ids[:, 0] == tok.cls_token_id).all()  # cls + 31 tokens

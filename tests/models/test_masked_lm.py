"""The masked_lm family: BERT and ModernBERT encoders under each head, saved in the Hugging
Face layout that plain transformers loads, the head swap that turns a pretrained encoder
into a classifier, predictions, the mask-token errors, and importing a local checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.data.tokenizer import DEFAULT_SPECIAL_TOKENS, load_hf_tokenizer, train_bpe
from genloop.errors import ConfigError, GenloopError
from genloop.models import Family, get_family
from genloop.models import masked_lm as mlm
from genloop.models.masked_lm import FAMILY

from ..conftest import PROSE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIALS = [*DEFAULT_SPECIAL_TOKENS, "<|mask|>"]
LABELS = ["negative", "neutral", "positive"]
TAGS = ["B-ANIMAL", "I-ANIMAL", "O"]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Byte-level BPE tokenizers of the fixture prose: ``mask`` has ``<|mask|>``,
    ``plain`` the default special tokens only."""
    root = tmp_path_factory.mktemp("tok")
    texts = [PROSE, *(f"{PROSE} {i}" for i in range(20))]
    return {
        "mask": train_bpe(texts, root / "mask", vocab_size=320, special_tokens=SPECIALS),
        "plain": train_bpe(texts, root / "plain", vocab_size=320),
    }


def tiny(architecture: str, task: str, **extra: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide encoder over the 320-token vocabulary."""
    config: dict[str, Any] = {
        "architecture": architecture,
        "task": task,
        "vocab_size": 320,
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "context_length": 64,
        "pad_token_id": 1,
        "cls_token_id": 0,
        "sep_token_id": 0,
    }
    if task == "mlm":
        config["mask_token_id"] = 5
    if task == "sequence_classification":
        config["labels"] = LABELS
    if task == "token_classification":
        config["labels"] = TAGS
    return {**config, **extra}


def build(architecture: str, task: str, **extra: Any) -> Any:
    torch.manual_seed(0)
    return FAMILY.build(tiny(architecture, task, **extra)).eval()


def test_the_family_satisfies_the_protocol() -> None:
    family = get_family("masked_lm")
    assert isinstance(family, Family) and family.name == "masked_lm"


@pytest.mark.parametrize(
    ("preset", "parameters"), [("tiny", 5_462_784), ("small", 29_949_440), ("base", 92_342_528)]
)
def test_preset_sizes_are_the_documented_ones(preset: str, parameters: int) -> None:
    config = {"preset": preset, "vocab_size": 8192, "mask_token_id": 5}
    with torch.device("meta"):  # counted without allocating
        model = FAMILY.build(config)
    assert FAMILY.num_parameters(model) == parameters
    assert f"{parameters:,}" in (mlm.__doc__ or "")


TASK_CLASSES = {
    "mlm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "embedding": "AutoModel",
}


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
@pytest.mark.parametrize("task", list(TASK_CLASSES))
def test_every_task_saves_a_checkpoint_plain_transformers_loads(
    tmp_path: Path, tok_dirs: dict[str, Path], architecture: str, task: str
) -> None:
    import transformers

    model = build(architecture, task)
    assert mlm.task_of(model) == task
    out = FAMILY.save(model, tmp_path / "m", tokenizer_dir=tok_dirs["mask"], extra={"k": 1})
    assert json.loads((out / "genloop.json").read_text()) == {
        "family": "masked_lm",
        "task": task,
        "k": 1,
    }
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == architecture and mlm.artifact_task(out) == task
    if task in mlm.HEAD_TASKS:
        names = LABELS if task == "sequence_classification" else TAGS
        assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
        assert config["label2id"] == {n: i for i, n in enumerate(names)}

    loaded = getattr(transformers, TASK_CLASSES[task]).from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.mask_token == "<|mask|>" and tok.model_max_length == 64
    enc = tok(["the cat sat", "birds sang in the tall trees"], padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tok.cls_token_id).all()  # framed: cls … sep
    with torch.no_grad():
        ours, theirs = model(**enc), loaded(**enc)
    key = "last_hidden_state" if task == "embedding" else "logits"
    torch.testing.assert_close(getattr(ours, key), getattr(theirs, key))
    again = FAMILY.load(out)
    assert type(again) is type(model) and mlm.model_labels(again) == mlm.model_labels(model)


def test_the_saved_tokenizer_encodes_as_the_framed_one_in_memory(
    tmp_path: Path, tok_dirs: dict[str, Path]
) -> None:
    out = FAMILY.save(build("bert", "mlm"), tmp_path / "m", tokenizer_dir=tok_dirs["mask"])
    framed = mlm.frame_tokenizer(load_hf_tokenizer(tok_dirs["mask"]), 64)
    _, saved = mlm.load_masked_lm(out)
    texts = ["the cat sat on the mat", "a quiet river " * 40]
    assert mlm.encode_texts(framed, texts, 64)["input_ids"].tolist() == (
        mlm.encode_texts(saved, texts, 64)["input_ids"].tolist()
    )
    ids = mlm.encode_texts(saved, texts, 64)["input_ids"]
    assert ids.shape == (2, 64) and ids[1, -1] == saved.sep_token_id  # cut before its sep


def test_a_masked_lm_without_a_mask_token_names_the_fix(
    tmp_path: Path, tok_dirs: dict[str, Path]
) -> None:
    config = tiny("bert", "mlm")
    del config["mask_token_id"]
    with pytest.raises(ConfigError, match=r'needs mask_token_id.*add "<\|mask\|>" to tokenizer'):
        FAMILY.build(config)
    with pytest.raises(GenloopError, match=r"has no mask token.*tokenizer.special_tokens"):
        FAMILY.save(build("bert", "mlm"), tmp_path / "m", tokenizer_dir=tok_dirs["plain"])
    # a classifier reads no mask token: the same tokenizer is fine for it
    classifier = build("bert", "sequence_classification")
    FAMILY.save(classifier, tmp_path / "c", tokenizer_dir=tok_dirs["plain"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"labels": ["pos"]}, "at least 2 labels, the data has 1 \\(pos\\)"),
        ({"labels": ["a", "a"]}, "labels has duplicates"),
        ({"task": "ner"}, "unknown masked_lm task 'ner'"),
        ({"architecture": "gpt"}, "unknown masked_lm architecture 'gpt' \\(architectures: bert"),
        ({"n_kv_head": 2}, "unknown masked_lm setting 'n_kv_head'"),
        ({"n_embd": 33}, "n_embd \\(33\\) must be divisible by n_head \\(2\\)"),
        ({"pad_token_id": 400}, "pad_token_id 400 is outside the vocabulary \\(320\\)"),
    ],
)
def test_bad_configs_name_the_key(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FAMILY.build({**tiny("bert", "sequence_classification"), **extra})


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
def test_our_loss_is_transformers_own(architecture: str) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 320, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    mlm_labels = torch.full_like(ids, -100)
    mlm_labels[:, 3] = ids[:, 3]
    mlm_labels[0, 5] = ids[0, 5]
    tags = torch.randint(0, 3, (3, 12), generator=gen).masked_fill(mask == 0, -100)
    cases = {
        "mlm": mlm_labels,
        "sequence_classification": torch.tensor([0, 2, 1]),
        "token_classification": tags,
    }
    for task, labels in cases.items():
        model = build(architecture, task)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        with torch.no_grad():
            theirs = model(**batch).loss
            ours = mlm.masked_lm_loss(model, batch)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(GenloopError, match="contrastive objective"):
        mlm.masked_lm_loss(build(architecture, "embedding"), {"input_ids": ids, "labels": ids})


def test_the_loss_of_a_wrapped_model_is_the_same() -> None:
    """Under a wrapper (torch.compile here; DDP alike) the model runs whole, its task read
    from the model inside; on a plain one only the masked positions reach the head."""
    model = build("bert", "mlm")
    ids = torch.randint(6, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 4] = ids[:, 4]
    batch = {"input_ids": ids, "labels": labels}
    wrapped = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            mlm.masked_lm_loss(wrapped, batch), mlm.masked_lm_loss(model, batch)
        )


def test_with_task_moves_the_encoder_under_a_fresh_head() -> None:
    pretrained = build("bert", "mlm")
    classifier = mlm.with_task(pretrained, "sequence_classification", LABELS)
    assert mlm.task_of(classifier) == "sequence_classification"
    assert mlm.model_labels(classifier) == LABELS
    base = pretrained.base_model.state_dict()
    for name, tensor in classifier.base_model.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(tensor, base[name]), name
    # the same task and labels: the model itself, head and all
    assert mlm.with_task(classifier, "sequence_classification", LABELS) is classifier
    # other labels: a fresh head, never the old one read under new names
    relabeled = mlm.with_task(classifier, "sequence_classification", ["no", "yes"])
    assert relabeled.classifier.out_features == 2
    back = mlm.with_task(relabeled, "mlm")  # and back to an MLM head (new, untrained)
    assert mlm.task_of(back) == "mlm" and mlm.model_labels(back) == []


def test_predictions_are_label_names_per_text_and_per_word(tok_dirs: dict[str, Path]) -> None:
    tok = mlm.frame_tokenizer(load_hf_tokenizer(tok_dirs["mask"]), 64)
    texts = ["the cat sat", "dogs ran in the park", "x"]
    classifier = build("modernbert", "sequence_classification")
    probs = mlm.class_probabilities(classifier, tok, texts)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    assert set(mlm.predict_labels(classifier, tok, texts)) <= set(LABELS)

    tagger = build("bert", "token_classification", context_length=16)
    rows = [["the", "cat", "sat"], ["a", "green", "river"] * 8]  # the second overflows 16
    tags = mlm.predict_tags(tagger, tok, rows)
    assert [len(t) for t in tags] == [3, 24] and set(tags[0]) <= set(TAGS)
    ids, firsts = mlm.encode_words(tok, rows[1], 16)
    assert len(ids) <= 16 and firsts.count(-1) > 0
    assert all(t == "O" for t, p in zip(tags[1], firsts, strict=True) if p < 0)
    with pytest.raises(GenloopError, match="not a token classifier"):
        mlm.predict_tags(classifier, tok, rows)


def test_words_are_tokenized_as_in_running_text(tok_dirs: dict[str, Path]) -> None:
    tok = mlm.frame_tokenizer(load_hf_tokenizer(tok_dirs["mask"]), 64)
    words = ["the", "cat", "sat", "on", "the", "mat"]
    ids, firsts = mlm.encode_words(tok, words, 64)
    assert ids == tok(" ".join(words))["input_ids"]
    assert firsts[0] == 1 and firsts == sorted(firsts)


# ---------------------------------------------------------------------------- importing


def bert_tokenizer(out: Path) -> None:
    """A small WordPiece tokenizer as BERT ships one ([CLS], [SEP], [MASK], ## pieces)."""
    from transformers import BertTokenizer

    words = sorted(set(PROSE.split()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##ing"]
    vocab += [*"abcdefghijklmnopqrstuvwxyz.", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(out)


def test_a_local_bert_or_modernbert_checkpoint_imports_as_masked_lm(
    tmp_path: Path, tok_dirs: dict[str, Path]
) -> None:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ModernBertConfig,
        ModernBertForMaskedLM,
    )

    from genloop.models.importer import import_checkpoint
    from genloop.models.pretrained import inspect_checkpoint
    from genloop.workspace import init_workspace, registry

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    bert_dir, modern_dir = tmp_path / "tiny-bert-sst", tmp_path / "tiny-modernbert"
    bert_tokenizer(bert_dir)
    vocab = len(load_hf_tokenizer(bert_dir))
    BertForSequenceClassification(
        BertConfig(vocab_size=vocab, intermediate_size=64, id2label={0: "neg", 1: "pos"}, **sizes)
    ).save_pretrained(bert_dir)
    ModernBertForMaskedLM(
        ModernBertConfig(
            vocab_size=320,
            intermediate_size=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
            cls_token_id=0,
            sep_token_id=0,
            **sizes,
        )
    ).save_pretrained(modern_dir)
    load_hf_tokenizer(tok_dirs["mask"]).save_pretrained(modern_dir)

    assert inspect_checkpoint(bert_dir).family == "masked_lm"
    ws = init_workspace(tmp_path / "ws")
    try:
        bert = import_checkpoint(ws, bert_dir)
        modern = import_checkpoint(ws, modern_dir)
        assert (bert.ref, bert.family) == ("tiny-bert-sst@1", "masked_lm")
        assert bert.config["import"]["architecture"] == "BertForSequenceClassification"
        assert modern.config["import"]["architecture"] == "ModernBertForMaskedLM"
        model, tok = mlm.load_masked_lm(registry.artifact_path(ws, bert.ref))
        assert mlm.task_of(model) == "sequence_classification"
        assert mlm.model_labels(model) == ["neg", "pos"] and tok.mask_token == "[MASK]"
        assert mlm.predict_labels(model, tok, ["the cat sat"])[0] in ("neg", "pos")
        encoder, _ = mlm.load_encoder(registry.artifact_path(ws, modern.ref))
        assert type(encoder).__name__ == "ModernBertModel"
    finally:
        ws.close()


@pytest.mark.parametrize(
    ("architectures", "family", "says"),
    [
        (["BertLMHeadModel"], "causal_lm", None),  # a decoder head stays a causal LM
        (["BertForPreTraining"], "masked_lm", None),  # MLM + NSP heads: the MLM weights load
        (["BertForQuestionAnswering"], None, "BertForQuestionAnswering is a bert head"),
    ],
)
def test_which_bert_heads_import_as_what(
    tmp_path: Path, architectures: list[str], family: str | None, says: str | None
) -> None:
    from transformers import BertConfig, BertForMaskedLM

    from genloop.models.pretrained import UnsupportedArchitectureError, inspect_checkpoint

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "architectures": architectures}))
    if says is not None:
        with pytest.raises(UnsupportedArchitectureError, match=says):
            inspect_checkpoint(tmp_path)
        return
    info = inspect_checkpoint(tmp_path)
    assert info.family == family
    expected = "BertForMaskedLM" if architectures == ["BertForPreTraining"] else architectures[0]
    assert info.architecture == expected


def test_a_bpe_with_a_mask_token_names_it_and_bert_documents_end_with_sep(
    tmp_path: Path, tok_dirs: dict[str, Path]
) -> None:
    from genloop.data.tokenizer import eos_token_id, load_tokenizer

    assert load_hf_tokenizer(tok_dirs["mask"]).mask_token == "<|mask|>"
    assert load_hf_tokenizer(tok_dirs["plain"]).mask_token is None
    bert_tokenizer(tmp_path / "bert")
    tok = load_tokenizer(tmp_path / "bert")
    assert eos_token_id(tmp_path / "bert", tok) == tok.token_to_id("[SEP]")

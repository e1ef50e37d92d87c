"""Synonyms from a masked LM's input embeddings: a tiny BERT whose embeddings are set so
that known words are neighbours, saved as a ``masked_lm`` model directory."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from genloop.data.augment_text import eda_edit
from genloop.data.tokenizer import TOKENIZER_FILES, load_hf_tokenizer, train_bpe
from genloop.errors import GenloopError
from genloop.models.synonyms import check_masked_lm, load_neighbours

CORPUS = [
    "she was happy and glad and cheerful at the party",
    "he felt sad and gloomy when the rain came down",
    "the table and the chair stood near the window",
    "a happy dog and a cheerful cat played in the garden",
] * 10


def token(tok: object, word: str) -> int:
    ids = tok.encode(" " + word, add_special_tokens=False)  # type: ignore[attr-defined]
    assert len(ids) == 1, (word, ids)
    return int(ids[0])


def save_masked_lm(out: Path, tok_dir: Path, place: dict[str, str] | None = None) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM on ``tok_dir``'s tokenizer, saved in the layout
    of the masked_lm family; its random input embeddings are then set so that "glad" and
    "cheerful" are next to "happy", and a special token and a mid-word piece sit exactly on
    it (they must never come back as synonyms)."""
    from transformers import BertConfig, BertForMaskedLM

    tok = load_hf_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
        )
    )
    emb = model.get_input_embeddings().weight
    happy = token(tok, "happy")
    # a piece with no leading space ("appy"): only ever inside or at the start of a text
    piece = next(i for i in range(len(tok)) if (t := tok.decode([i])).isalpha() and len(t) > 1)
    with torch.no_grad():
        emb.normal_()  # random directions: in 32 dimensions, far from each other
        emb[token(tok, "glad")] = emb[happy] + 0.1 * torch.randn(32)  # cosine ≈ 0.995
        emb[token(tok, "cheerful")] = emb[happy] + 0.4 * torch.randn(32)  # ≈ 0.93
        emb[tok.pad_token_id] = emb[happy]
        emb[piece] = emb[happy] * 2  # the same direction: cosine 1
    model.save_pretrained(out)  # safetensors
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    (out / "genloop.json").write_text(json.dumps({"family": "masked_lm"}))
    return out


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    tok_dir = train_bpe(CORPUS, root / "tok", vocab_size=400, min_frequency=1)
    return save_masked_lm(root / "model", tok_dir)


def test_the_nearest_whole_words_are_the_synonyms(mlm_dir: Path) -> None:
    neighbours = load_neighbours(mlm_dir, k=2)
    assert neighbours("happy") == ["glad", "cheerful"]  # not itself, the pad or the piece
    assert neighbours("Happy") == ["glad", "cheerful"]  # case folds to the known word
    assert neighbours("glad")[0] == "happy"
    assert all(len(w) > 1 and w.isalpha() for w in neighbours.words)
    assert neighbours("zebra") == []  # not one whole-word token: no synonyms
    assert load_neighbours(mlm_dir, k=5, min_similarity=0.999)("happy") == []

    # EDA's replace edit through them (k=1: always "glad"), keeping case and punctuation
    one = load_neighbours(mlm_dir, k=1)
    text = eda_edit("Happy, I said.", "replace", 0.5, random.Random(0), one)
    assert text == "Glad, I said."


def test_only_a_masked_lm_gives_synonyms(mlm_dir: Path, tmp_path: Path) -> None:
    check_masked_lm(mlm_dir, "mine")
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(GenloopError, match="LlamaForCausalLM model, not a masked LM"):
        check_masked_lm(causal, "causal")
    (causal / "genloop.json").write_text(json.dumps({"family": "causal_lm"}))
    with pytest.raises(GenloopError, match="causal is a causal_lm, not a masked LM"):
        load_neighbours(causal, what="causal")
    bare = tmp_path / "bare"  # the HF layout without genloop.json counts by its architecture
    shutil.copytree(mlm_dir, bare)
    (bare / "genloop.json").unlink()
    check_masked_lm(bare, "bare")
    with pytest.raises(GenloopError, match=r"no config\.json"):
        check_masked_lm(tmp_path, "empty")

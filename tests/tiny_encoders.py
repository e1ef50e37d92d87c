"""Tiny BERT-style masked LMs for the embedding tests, built here with transformers.

A byte-level BPE (``genloop.data.tokenizer.train_bpe``) with a mask token, a 2-layer,
32-wide ``BertForMaskedLM`` on it, saved in the Hugging Face layout with a ``genloop.json``
naming the ``masked_lm`` family, as a masked_lm model version looks. The retrieval rows
pair each query with a document that shares no word with it (``ANIMALS[i]`` →
``THINGS[i]``), so an untrained encoder finds them at chance and training must learn them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ANIMALS = [
    "cat",
    "dog",
    "fox",
    "owl",
    "bee",
    "ant",
    "cow",
    "pig",
    "hen",
    "elk",
    "yak",
    "eel",
    "bat",
    "ram",
    "emu",
    "gnu",
    "ape",
    "boar",
    "crab",
    "deer",
    "duck",
    "frog",
    "goat",
    "hare",
]
THINGS = [
    "spoon",
    "brick",
    "lamp",
    "chair",
    "pencil",
    "rope",
    "drum",
    "kettle",
    "mirror",
    "sock",
    "wheel",
    "ladder",
    "bucket",
    "candle",
    "hammer",
    "basket",
    "violin",
    "anchor",
    "blanket",
    "button",
    "carpet",
    "feather",
    "glove",
    "helmet",
]
MASK = "<|mask|>"


def retrieval_rows(negatives: bool = False) -> list[dict[str, Any]]:
    """One row per animal: ``which {animal}`` → ``a {thing} here`` (a hard negative: the
    thing of the animal half the list away)."""
    rows: list[dict[str, Any]] = []
    for i, (animal, thing) in enumerate(zip(ANIMALS, THINGS, strict=True)):
        row: dict[str, Any] = {"query": f"which {animal}", "positive": f"a {thing} here"}
        if negatives:
            row["negative"] = f"a {THINGS[(i + len(THINGS) // 2) % len(THINGS)]} here"
        rows.append(row)
    return rows


def encoder_tokenizer(out: Path) -> Path:
    """A BPE tokenizer over the rows' words with a mask token (transformers layout)."""
    from genloop.data.tokenizer import DEFAULT_SPECIAL_TOKENS, load_hf_tokenizer, train_bpe

    texts = [f"{r['query']} {r['positive']}" for r in retrieval_rows()] * 4
    train_bpe(
        texts, out, vocab_size=320, min_frequency=1, special_tokens=(*DEFAULT_SPECIAL_TOKENS, MASK)
    )
    tok = load_hf_tokenizer(out)
    tok.mask_token = MASK
    tok.save_pretrained(out)
    return out


def build_bert(
    out: Path, tokenizer_dir: Path, *, seed: int = 0, task: str = "mlm", context: int = 64
) -> Path:
    """A random 2-layer, 32-wide BertForMaskedLM on ``tokenizer_dir``, saved at ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from genloop.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=context,
        pad_token_id=tok.pad_token_id,
    )
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "genloop.json").write_text(json.dumps({"family": "masked_lm", "task": task}))
    return out


def recall_at_1(queries: Any, documents: Any) -> float:
    """The share of queries (N, D) whose nearest document (N, D) by dot product is theirs."""
    import numpy as np

    sims = np.asarray(queries) @ np.asarray(documents).T
    return float((sims.argmax(axis=1) == np.arange(len(sims))).mean())

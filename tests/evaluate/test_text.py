"""Text suites: BLEU and ROUGE against hand-computed values, perplexity against exp(mean CE),
continuation pairs, and generation that repeats itself for the same model and seed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genloop.errors import GenloopError
from genloop.evaluate.generate import generate_texts, load_model_for_eval
from genloop.evaluate.text import (
    continuation_pairs,
    evaluate_generation,
    generation_metrics,
    perplexity,
)

CORPUS = [
    "The cat sat on the mat.\nThe dog ran in the park.\nA bird sang in the tree.\n",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Rain fell on the quiet town, and the river rose slowly through the night.\n",
] * 10


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genloop.data.tokenizer import train_bpe

    return train_bpe(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from genloop.data.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    from genloop.models.family import get_family

    torch.manual_seed(0)
    config = {
        "preset": "tiny",
        "vocab_size": len(tokenizer),
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "context_length": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return get_family("causal_lm").build(config).eval()


# ------------------------------------------------------------------------------ BLEU


def test_bleu_of_one_pair_matches_the_hand_computation() -> None:
    # Lowercase words and spaces only: sacrebleu's 13a tokenizer leaves them as they are.
    hyp = "the quick brown fox jumps over the dog"  # 8 words
    ref = "the quick brown fox jumped over the lazy dog"  # 9 words
    # clipped n-gram matches / hypothesis n-grams:
    #   1: the×2 quick brown fox over dog = 7/8     2: the quick, quick brown, brown fox,
    #   over the = 4/7     3: the quick brown, quick brown fox = 2/6     4: the quick brown
    #   fox = 1/5;  brevity penalty exp(1 - r/c) with c = 8 < r = 9
    precisions = [7 / 8, 4 / 7, 2 / 6, 1 / 5]
    expected = 100 * math.exp(1 - 9 / 8) * math.exp(sum(map(math.log, precisions)) / 4)
    result = generation_metrics([hyp], [ref])
    assert result.metrics["bleu"] == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(37.71, abs=0.01)
    # every n-gram order matches, so smoothing plays no part in the sentence score
    assert result.per_sample["sentence_bleu"] == [pytest.approx(expected, abs=1e-9)]


def test_corpus_bleu_sums_counts_over_pairs() -> None:
    hyps = ["the quick brown fox jumps over the dog", "hello there my friend"]
    refs = ["the quick brown fox jumped over the lazy dog", "hello there my good friend"]
    # pair 2: 1-grams 4/4, 2-grams (hello there, there my) 2/3, 3-grams 1/2, 4-grams 0/1
    precisions = [(7 + 4) / (8 + 4), (4 + 2) / (7 + 3), (2 + 1) / (6 + 2), (1 + 0) / (5 + 1)]
    c, r = 8 + 4, 9 + 5
    expected = 100 * math.exp(1 - r / c) * math.exp(sum(map(math.log, precisions)) / 4)
    result = generation_metrics(hyps, refs)
    assert result.metrics["bleu"] == pytest.approx(expected, abs=1e-9)
    # sentence BLEU of pair 2 is smoothed (no 4-gram matches), yet below a perfect score
    assert 0 < result.per_sample["sentence_bleu"][1] < 100
    assert result.metrics["sentence_bleu"] == pytest.approx(
        np.mean(result.per_sample["sentence_bleu"])
    )
    assert "13a" in result.settings["bleu_signature"]


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_f1_matches_the_hand_computation() -> None:
    pred = "The cat sat on the mat."  # tokens: the cat sat on the mat (case, "." dropped)
    ref = "A cat was sitting on the mat"  # tokens: a cat was sitting on the mat
    f1 = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    # ROUGE-1: overlap the(min 2,1) cat on mat = 4; P = 4/6, R = 4/7
    # ROUGE-2: overlap "on the", "the mat" = 2; P = 2/5, R = 2/6
    # ROUGE-L: LCS cat on the mat = 4; P = 4/6, R = 4/7
    result = generation_metrics([pred], [ref])
    assert result.metrics["rouge1"] == pytest.approx(f1(4 / 6, 4 / 7)) == pytest.approx(8 / 13)
    assert result.metrics["rouge2"] == pytest.approx(f1(2 / 5, 2 / 6)) == pytest.approx(4 / 11)
    assert result.metrics["rougeL"] == pytest.approx(8 / 13)
    assert result.per_sample["rouge1"] == [pytest.approx(8 / 13)]


def test_rouge_needs_no_nltk_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty NLTK data path: any attempt to use downloaded data would fail here.
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    result = generation_metrics(["one two three"], ["one two four"])
    assert result.metrics["rouge1"] == pytest.approx(2 / 3)


def test_exact_match_and_lengths() -> None:
    preds = ["a b", " the answer \n", "no"]
    refs = ["a b", "the answer", "yes it is"]
    result = generation_metrics(preds, refs)
    assert result.per_sample["exact_match"] == [1.0, 1.0, 0.0]
    assert result.metrics["exact_match"] == pytest.approx(2 / 3)
    assert result.metrics["pred_words_mean"] == pytest.approx((2 + 2 + 1) / 3)
    assert result.metrics["ref_words_mean"] == pytest.approx((2 + 2 + 3) / 3)
    assert result.metrics["pred_chars_mean"] == pytest.approx((3 + 13 + 2) / 3)
    assert result.metrics["ref_chars_mean"] == pytest.approx((3 + 10 + 9) / 3)
    assert result.metrics["length_ratio"] == pytest.approx(5 / 7)
    for key, values in result.per_sample.items():  # what comparison relies on
        assert result.metrics[key] == pytest.approx(float(np.mean(values)))


def test_predictions_and_references_must_pair_up() -> None:
    with pytest.raises(GenloopError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"])
    with pytest.raises(GenloopError, match="no predictions"):
        generation_metrics([], [])


# ------------------------------------------------------------------------ perplexity


def write_split(directory: Path, vocab_size: int, n_tokens: int, split: str = "test") -> None:
    from genloop.data.pack import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(directory, split, vocab_size=vocab_size, shard_tokens=50) as w:
        for size in rng.integers(5, 30, size=n_tokens // 15):
            w.add(rng.integers(0, vocab_size, size=int(size)))


def test_perplexity_is_exp_of_the_mean_cross_entropy(model: Any, tmp_path: Path) -> None:
    vocab = model.config.vocab_size
    write_split(tmp_path, vocab, 400)
    from genloop.data.pack import TokenDataset

    ds = TokenDataset(tmp_path, "test", seq_len=16)
    x = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    y = torch.from_numpy(np.stack([ds[i][1] for i in range(len(ds))]))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    result = perplexity(model, tmp_path, "test", 16, batch_size=3)
    assert result.suite == "perplexity"
    assert result.metrics["nll"] == pytest.approx(expected, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert len(result.per_sample["nll"]) == len(ds) == result.settings["windows"]
    assert result.settings["tokens"] == 16 * len(ds)
    assert np.mean(result.per_sample["nll"]) == pytest.approx(result.metrics["nll"])
    assert not model.training

    capped = perplexity(model, tmp_path, "test", 16, max_windows=4)
    n = len(ds)
    picked = [(j * n) // 4 for j in range(4)]  # spread over the split
    assert capped.per_sample["nll"] == pytest.approx([result.per_sample["nll"][i] for i in picked])


def test_perplexity_refuses_a_foreign_vocabulary(model: Any, tmp_path: Path) -> None:
    write_split(tmp_path, model.config.vocab_size + 100, 100)
    with pytest.raises(GenloopError, match="not this model's tokenizer"):
        perplexity(model, tmp_path, "test", 8)
    with pytest.raises(GenloopError, match="longer than the model's context"):
        perplexity(model, tmp_path, "test", 1000)


# ------------------------------------------------------------------ continuation pairs


def write_docs(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def test_continuation_pairs_cut_at_line_boundaries(tmp_path: Path) -> None:
    docs = write_docs(
        tmp_path / "test.jsonl",
        [
            "line one\nline two\nline three\nline four\nline five\n",
            "x",  # too short to give a pair: skipped
            "one long line of prose without any break at all in it",
        ],
    )
    pairs = continuation_pairs(docs, None, prefix_chars=30, cont_chars=21, seed=0)
    assert pairs[0] == ("line one\nline two\n", "line three\nline four\n")
    # the prefix takes at most half the document (25 and 27 characters here); with no
    # line break within the budget, the cut falls before the last space
    assert pairs[1] == ("one long line of prose", " without any break")
    assert len(pairs) == 2


def test_continuation_pairs_are_deterministic_and_nested(tmp_path: Path) -> None:
    texts = [f"document {i} starts here\nand goes on {i} more\nthen ends\n" for i in range(40)]
    docs = write_docs(tmp_path / "test.jsonl", texts)
    ten = continuation_pairs(docs, 10, 30, 30, seed=1)
    assert ten == continuation_pairs(docs, 10, 30, 30, seed=1)
    assert len(ten) == 10
    twenty = continuation_pairs(docs, 20, 30, 30, seed=1)
    assert set(ten) <= set(twenty)  # a smaller n picks a subset
    assert ten != continuation_pairs(docs, 10, 30, 30, seed=2)
    assert all(p.endswith("\n") and r.strip() for p, r in ten)


def test_a_malformed_document_line_is_named(tmp_path: Path) -> None:
    docs = tmp_path / "test.jsonl"
    docs.write_text('{"id": "a", "text": "fine\\ntext\\n"}\n{"id": "b"}\n')
    with pytest.raises(GenloopError, match=r"test\.jsonl:2: .*\"text\""):
        continuation_pairs(docs, 5, 10, 10)


# ------------------------------------------------------------------------ generation


PROMPTS = ["The cat", "def add(a, b):\n", "Rain fell on the quiet", "A"]


def test_greedy_generation_returns_the_continuation_only(model: Any, tokenizer: Any) -> None:
    texts = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    assert len(texts) == len(PROMPTS)
    # the same prompt alone (no padding) gives the same greedy continuation
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_sampling_repeats_for_the_same_seed(model: Any, tokenizer: Any) -> None:
    kw: dict[str, Any] = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95, "batch_size": 2}
    torch.manual_seed(123)
    before = torch.rand(3)
    first = generate_texts(model, tokenizer, PROMPTS, seed=7, **kw)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(before, torch.rand(3)) and torch.equal(after, torch.rand(3))  # untouched
    assert first == generate_texts(model, tokenizer, PROMPTS, seed=7, **kw)
    assert first != generate_texts(model, tokenizer, PROMPTS, seed=8, **kw)


def test_stop_strings_cut_the_continuation(model: Any, tokenizer: Any) -> None:
    full = generate_texts(model, tokenizer, PROMPTS[:1], max_new_tokens=12)[0]
    assert len(full) > 2
    stop = full[2:4]
    cut = generate_texts(model, tokenizer, PROMPTS[:1], max_new_tokens=12, stop=[stop])[0]
    assert cut == full[: full.find(stop)]


def test_generation_refuses_impossible_settings(model: Any, tokenizer: Any) -> None:
    with pytest.raises(GenloopError, match="context length"):
        generate_texts(model, tokenizer, ["a"], max_new_tokens=64)
    with pytest.raises(GenloopError, match="top_p"):
        generate_texts(model, tokenizer, ["a"], max_new_tokens=4, top_p=0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_evaluating_twice_gives_the_same_numbers(
    model: Any, tokenizer: Any, tmp_path: Path, tokenizer_dir: Path, temperature: float
) -> None:
    from genloop.models.pretrained import save_hf_dir

    save_hf_dir(model, tmp_path / "model", family="causal_lm", tokenizer_dir=tokenizer_dir)
    docs = write_docs(tmp_path / "test.jsonl", CORPUS[:6])
    pairs = continuation_pairs(docs, 6, prefix_chars=40, cont_chars=40, seed=0)
    kw: dict[str, Any] = {"max_new_tokens": 10, "temperature": temperature, "seed": 3}

    results = []
    for _ in range(2):  # load afresh each time, as two `genloop eval` runs would
        loaded, tok = load_model_for_eval(tmp_path / "model")
        assert not loaded.training
        results.append(evaluate_generation(loaded, tok, pairs, batch_size=4, **kw).to_dict())
    assert results[0] == results[1]
    first = results[0]
    assert first["suite"] == "generation"
    assert first["settings"]["seed"] == 3 and first["settings"]["temperature"] == temperature
    assert first["settings"]["decoding"] == ("greedy" if temperature == 0 else "sampling")
    assert len(first["samples"]) == 5 and first["samples"][0]["prompt"] == pairs[0][0]
    assert all(math.isfinite(v) for v in first["metrics"].values())

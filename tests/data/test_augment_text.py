"""EDA edits, the filters every generated row passes, and the lineage a row carries."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from genloop.data.augment_text import (
    RougeFilter,
    RowFilter,
    augmented_field,
    eda_copies,
    eda_edit,
    generated_row,
    row_sha256,
)
from genloop.errors import GenloopError

TEXT = "The quiet river carries smooth stones past the old mill every spring morning"
SYNONYMS = {"river": ["stream"], "stones": ["pebbles"], "quiet": ["calm", "still"]}


def synonyms(word: str) -> list[str]:
    return SYNONYMS.get(word.lower(), [])


def test_each_edit_does_what_it_says() -> None:
    words = TEXT.split()
    swapped = eda_edit(TEXT, "swap", 0.1, random.Random(1)).split()
    assert Counter(swapped) == Counter(words) and swapped != words  # the same words, moved

    deleted = eda_edit(TEXT, "delete", 0.3, random.Random(1)).split()
    assert 1 <= len(deleted) < len(words)
    it = iter(words)
    assert all(w in it for w in deleted)  # a subsequence: the rest keep their order

    inserted = eda_edit(TEXT, "insert", 0.2, random.Random(1), synonyms).split()
    extra = Counter(inserted) - Counter(words)
    assert sum(extra.values()) == len(inserted) - len(words) == 2  # ⌊0.2 · 13⌋ insertions
    assert set(extra) <= {"stream", "pebbles", "calm", "still"}

    echoed = eda_edit(TEXT, "insert", 0.1, random.Random(1)).split()  # no synonyms: echoes
    assert len(echoed) == len(words) + 1 and Counter(echoed) - Counter(words) <= Counter(words)

    # ⌊0.5 · 4⌋ = 2 replacements, of the words that have synonyms; punctuation and case kept
    replaced = eda_edit("Quiet dark deep river!", "replace", 0.5, random.Random(0), synonyms)
    assert replaced in ("Calm dark deep stream!", "Still dark deep stream!")


def test_edits_are_seeded_and_spread_over_the_edits() -> None:
    first = eda_copies(TEXT, 4, 0.2, seed=7, ops=("swap", "delete", "insert"))
    assert first == eda_copies(TEXT, 4, 0.2, seed=7, ops=("swap", "delete", "insert"))
    assert first != eda_copies(TEXT, 4, 0.2, seed=8, ops=("swap", "delete", "insert"))
    assert {op for op, _, _ in first[:3]} == {"swap", "delete", "insert"}
    for op, seed, text in first:  # the recorded seed rebuilds the copy
        assert eda_edit(TEXT, op, 0.2, random.Random(seed)) == text
    with pytest.raises(GenloopError, match="needs synonyms"):
        eda_edit(TEXT, "replace", 0.2, random.Random(0))


def test_the_filter_drops_by_reason_against_the_source_and_earlier_rows() -> None:
    source = [TEXT, "A completely different sentence about baking bread in a warm kitchen"]
    checks = RowFilter(source, min_chars=10, max_chars=200)
    verdicts = [
        checks.reason(text)
        for text in [
            "the QUIET river carries smooth  stones past the old mill every spring morning",
            "short",
            "",
            "x" * 201,
            "############ ok",
            "Fresh snow covers the hills while the village sleeps under grey clouds",
            "Fresh snow covers the hills while the village sleeps under grey clouds",
            "fresh snow covers the hills while the village sleeps under grey clouds today",
        ]
    ]
    assert verdicts == [
        "duplicate",  # the source's text up to case and spaces
        "too_short",
        "empty",
        "too_long",
        "symbols",
        None,
        "duplicate",  # the row kept just before
        "near_duplicate",
    ]
    checks.drop("teacher_error")
    assert checks.passed == 1
    assert checks.dropped == {
        "duplicate": 2,
        "too_short": 1,
        "empty": 1,
        "too_long": 1,
        "symbols": 1,
        "near_duplicate": 1,
        "teacher_error": 1,
    }


def test_rouge_l_drops_instructions_too_close_to_the_pool() -> None:
    rouge = RougeFilter(["Write a short poem about the sea.", "Translate this sentence."])
    score, match = rouge.most_similar("write a short poem about the ocean")
    assert score == pytest.approx(6 / 7) and match == "Write a short poem about the sea."
    assert not rouge.is_novel("Write a short poem about the ocean")  # 0.86 ≥ 0.7
    assert rouge.is_novel("List three uses of a paperclip.")
    assert not rouge.is_novel("List three uses of a paperclip")  # now in the pool
    # words of any script count (rouge-score's own tokenizer keeps only ASCII ones)
    greek = RougeFilter(["γράψε ένα ποίημα για τη θάλασσα"])
    assert greek.most_similar("γράψε ένα μικρό ποίημα για τη θάλασσα")[0] > 0.9
    with pytest.raises(GenloopError, match="threshold"):
        RougeFilter([], threshold=0.0)


def test_a_generated_row_names_its_source() -> None:
    source = {"id": "r7", "text": "good film", "label": "pos", "meta": {"from": "web"}}
    row = generated_row(source, "text", "fine film", {"method": "eda", "seed": 3})
    assert row == {
        "text": "fine film",
        "label": "pos",
        "meta": {
            "from": "web",
            "augment": {
                "method": "eda",
                "seed": 3,
                "source_id": "r7",
                "source_sha256": row_sha256(source),
            },
        },
    }
    assert source["text"] == "good film" and "augment" not in source["meta"]  # not touched
    assert augmented_field("sft", "eda") == "prompt"
    with pytest.raises(GenloopError, match="token_classification dataset: an edit moves words"):
        augmented_field("token_classification", "eda")

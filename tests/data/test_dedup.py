from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
from datasketch import MinHash

from genloop.data.dedup import (
    ExactDedup,
    NearDedup,
    exact_key,
    minhash_signature,
    shingle_hashes,
)

VOCAB = [f"w{i}" for i in range(500)] + ["data", "model", "train", "loss", "token", "batch"]


def document(seed: int, n_words: int = 200) -> str:
    rng = random.Random(seed)
    words = [rng.choice(VOCAB) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines)


def test_exact_key() -> None:
    assert exact_key("hello world") == exact_key("  hello world\n")
    assert exact_key("hello world") != exact_key("hello  world")
    assert len(exact_key("x")) == 16
    assert exact_key("\ud800 lone surrogate") == exact_key("\ud800 lone surrogate")


def test_exact_dedup_drops_repeats() -> None:
    dedup = ExactDedup()
    texts = ["a b c", "d e f", "a b c", "  d e f ", "g"]
    dupes = [dedup.seen_before(exact_key(t)) for t in texts]
    assert dupes == [False, False, True, True, False]
    assert len(dedup) == 3


def test_signature_matches_datasketch() -> None:
    text = document(1)
    ours = minhash_signature(text, num_perm=64, seed=7)
    reference = MinHash(num_perm=64, seed=7, hashfunc=int)
    reference.update_batch(shingle_hashes(text).tolist())
    assert ours.dtype == np.uint32 and ours.shape == (64,)
    np.testing.assert_array_equal(ours, reference.hashvalues)


def test_signature_is_the_same_in_another_process() -> None:
    # Workers compute signatures; they must agree with each other (no per-process seeds).
    text = document(3)
    code = (
        "import sys; from genloop.data.dedup import minhash_signature as m; "
        "sys.stdout.write(m(sys.stdin.read()).tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert out == minhash_signature(text).tobytes().hex()


def test_shingles_are_words_or_characters() -> None:
    assert len(shingle_hashes("a b c d e f g")) == 3  # word 5-grams
    assert len(shingle_hashes("Hello   World\n", 5)) == len(shingle_hashes("hello world", 5))
    assert len(shingle_hashes("one two")) == len("one two") - 4  # character 5-grams
    assert len(shingle_hashes("hi")) == 1
    assert len(shingle_hashes("   ")) == 0


def test_near_duplicate_with_one_word_changed_is_caught() -> None:
    original = document(10)
    words = original.split(" ")
    words[100] = "changed"
    edited = " ".join(words)
    assert edited != original
    near = NearDedup(threshold=0.85)
    assert not near.is_duplicate("a", minhash_signature(original))
    assert near.duplicate_of("b", minhash_signature(edited)) == "a"
    assert len(near) == 1  # duplicates are not indexed


def test_different_documents_are_kept() -> None:
    near = NearDedup(threshold=0.85)
    verdicts = [near.is_duplicate(str(i), minhash_signature(document(100 + i))) for i in range(30)]
    assert not any(verdicts)
    assert len(near) == 30
    # an exact repeat is a near duplicate too
    assert near.is_duplicate("again", minhash_signature(document(100)))


def test_short_texts_use_character_shingles() -> None:
    near = NearDedup(threshold=0.5)
    assert not near.is_duplicate("a", minhash_signature("the quick brownfox"))
    assert near.is_duplicate("b", minhash_signature("the quick brownfox!"))
    assert not near.is_duplicate("c", minhash_signature("lorem ipsum dolor"))

"""Token shards: split assignment, write → read round trips, windows and exact resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from genloop.data.pack import ShardWriter, TokenDataset, assign_split, token_dtype
from genloop.errors import GenloopError, IntegrityError, NotFoundError


def write_docs(directory: Path, docs: list[np.ndarray], vocab_size: int = 1000, **kw: int) -> None:
    with ShardWriter(directory, "train", vocab_size=vocab_size, **kw) as w:
        for d in docs:
            w.add(d)


def random_docs(n: int, seed: int = 0, vocab_size: int = 1000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=rng.integers(1, 40)) for _ in range(n)]


def test_split_assignment_is_deterministic_and_proportional() -> None:
    ids = [f"doc-{i}" for i in range(20_000)]
    first = [assign_split(i, 0.1, 0.05, seed=3) for i in ids]
    assert first == [assign_split(i, 0.1, 0.05, seed=3) for i in ids]
    counts = Counter(first)
    assert abs(counts["val"] / len(ids) - 0.1) < 0.01
    assert abs(counts["test"] / len(ids) - 0.05) < 0.01
    # Another seed shuffles the assignment; a bigger val only takes documents from train.
    assert first != [assign_split(i, 0.1, 0.05, seed=4) for i in ids]
    for i, before in zip(ids, first, strict=True):
        after = assign_split(i, 0.2, 0.05, seed=3)
        assert after == before or (before, after) == ("train", "val")
    with pytest.raises(ValueError):
        assign_split("x", 0.6, 0.4, seed=0)


def test_round_trip_across_shard_boundaries(tmp_path: Path) -> None:
    docs = random_docs(50)
    write_docs(tmp_path, docs, shard_tokens=17)
    stream = np.concatenate(docs)
    index = json.loads((tmp_path / "train.json").read_text())
    assert index["num_tokens"] == len(stream) and index["num_docs"] == len(docs)
    assert len(index["shards"]) == -(-len(stream) // 17)
    assert all(s["tokens"] == 17 for s in index["shards"][:-1])
    ds = TokenDataset(tmp_path, "train", seq_len=8)
    assert ds.num_tokens == len(stream)
    assert np.array_equal(ds.tokens(0, ds.num_tokens), stream)
    for d, doc in enumerate(docs):
        assert np.array_equal(ds.document(d), doc)
    assert np.array_equal(ds.tokens(15, 40), stream[15:40])


def test_dtype_follows_the_vocabulary(tmp_path: Path) -> None:
    assert token_dtype(8192) == np.dtype("<u2")
    assert token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == np.dtype("<u4")
    big = [np.array([0, 70_000, 150_000, 3])]
    write_docs(tmp_path, big, vocab_size=151_000)
    assert json.loads((tmp_path / "train.json").read_text())["dtype"] == "uint32"
    assert (tmp_path / "train_00000.bin").stat().st_size == 4 * 4
    assert TokenDataset(tmp_path, "train", 2).tokens(0, 4).tolist() == [0, 70_000, 150_000, 3]


def test_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", vocab_size=10) as w, pytest.raises(ValueError):
        w.add(np.array([3, 10]))


def test_windows_tile_the_stream(tmp_path: Path) -> None:
    docs = random_docs(30, seed=1)
    write_docs(tmp_path, docs, shard_tokens=50)
    stream = np.concatenate(docs)
    ds = TokenDataset(tmp_path, "train", seq_len=16)
    assert len(ds) == (len(stream) - 1) // 16
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    n = len(ds) * 16
    assert np.array_equal(np.concatenate(xs), stream[:n])
    assert np.array_equal(np.concatenate(ys), stream[1 : n + 1])
    x, y = ds[-1]
    assert x.dtype == y.dtype == np.int64 and x.shape == (16,)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_batches_resume_exactly_and_cover_each_epoch(tmp_path: Path) -> None:
    write_docs(tmp_path, random_docs(80, seed=2), shard_tokens=64)
    ds = TokenDataset(tmp_path, "train", seq_len=8)
    n = len(ds)
    full = list(itertools.islice(ds.batches(batch_size=5, seed=7), 40))
    resumed = list(itertools.islice(ds.batches(batch_size=5, seed=7, start_step=13), 27))
    for (x1, y1), (x2, y2) in zip(full[13:], resumed, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    # The first epoch visits every window once; a new seed gives another order.
    windows = {tuple(ds[i][0]) for i in range(n)}
    seen = [tuple(row) for x, _ in full for row in x][:n]
    assert set(seen) == windows and len(windows) == n
    other = next(ds.batches(batch_size=5, seed=8))
    assert not np.array_equal(other[0], full[0][0])


def test_ranks_split_each_global_batch(tmp_path: Path) -> None:
    write_docs(tmp_path, random_docs(40, seed=3))
    ds = TokenDataset(tmp_path, "train", seq_len=4)
    single = next(ds.batches(batch_size=6, seed=1))[0]
    r0 = next(ds.batches(batch_size=3, seed=1, rank=0, world_size=2))[0]
    r1 = next(ds.batches(batch_size=3, seed=1, rank=1, world_size=2))[0]
    assert np.array_equal(np.concatenate([r0, r1]), single)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        TokenDataset(tmp_path, "val", seq_len=4)
    write_docs(tmp_path / "tiny", [np.array([1, 2])])
    with pytest.raises(GenloopError, match="too few"):
        next(TokenDataset(tmp_path / "tiny", "train", seq_len=4).batches(2, seed=0))
    with pytest.raises(GenloopError, match="already written"):
        ShardWriter(tmp_path / "tiny", "train", vocab_size=10)
    (tmp_path / "tiny" / "train_00000.bin").write_bytes(b"\0")
    with pytest.raises(IntegrityError):
        TokenDataset(tmp_path / "tiny", "train", seq_len=1)


def test_an_empty_split_is_valid(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "test", vocab_size=10):
        pass
    ds = TokenDataset(tmp_path, "test", seq_len=4)
    assert len(ds) == 0 and ds.num_docs == 0 and ds.tokens(0, 0).size == 0


def test_a_failed_write_leaves_no_index(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "train", vocab_size=10) as w:
        w.add(np.array([1, 2, 3]))
        raise RuntimeError("boom")
    assert not (tmp_path / "train.json").exists()

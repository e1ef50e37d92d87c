"""Token shards: documents' ids packed into memory-mapped files, split by document.

Layout of one split (``train``, ``val`` or ``test``) in a directory::

    train.json          index: dtype, token and document counts, the shard list
    train_00000.bin     raw little-endian ids (uint16, or uint32 for vocabularies > 65,536)
    train_00001.bin     … each ``shard_tokens`` ids long except the last
    train_docs.bin      int64 little-endian document offsets into the stream (docs + 1 entries)

The shards are pieces of one stream (a document may straddle two); every document ends with
the end-of-document id. Nothing is pickled: a reader needs the JSON and numpy only. The
index is written last (after an fsync of the data), so a split is complete when it exists.

Training reads the stream as windows of ``seq_len + 1`` tokens (``x`` = the first
``seq_len``, ``y`` = the last ``seq_len``): window ``i`` starts at ``i * seq_len``.
``TokenDataset.batches`` visits the windows in a shuffled order fixed by a seed, one
permutation per epoch, and starts at any step, so training resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from genloop.errors import GenloopError, IntegrityError, NotFoundError
from genloop.workspace.manifest import fsync_dir

Split = Literal["train", "val", "test"]
FORMAT = "genloop-tokens"
FORMAT_VERSION = 1


def assign_split(doc_id: str, val: float, test: float, seed: int) -> Split:
    """The split of a document, from a hash of its id: stable across runs and when
    documents are added; raising ``val`` only moves documents from train to val."""
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"val ({val}) and test ({test}) must be ≥ 0 and sum to less than 1")
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64  # uniform in [0, 1)
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The smallest little-endian unsigned type that holds every id."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, not {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _fsync_close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class ShardWriter:
    """Append documents' ids to a split's shards; ``close`` writes the index.

    Memory stays flat: ids go straight to the open shard file, offsets to the docs file.
    """

    def __init__(
        self, out_dir: Path, split: str, vocab_size: int, shard_tokens: int = 2**26
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, not {shard_tokens}")
        if not split.isidentifier():
            raise ValueError(f"split name {split!r} must be a plain identifier (train, val …)")
        self.out_dir = out_dir
        self.split = split
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.num_tokens = 0
        self.num_docs = 0
        self._shards: list[dict[str, Any]] = []
        self._shard: Any = None  # the open shard file
        self._closed = False
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / f"{split}.json").exists():
            raise GenloopError(f"{out_dir}: split {split!r} is already written")
        self._docs = (out_dir / f"{split}_docs.bin").open("wb")
        self._docs.write(np.zeros(1, dtype="<i8").tobytes())

    def add(self, tokens: np.ndarray) -> None:
        """Append one document (its ids, end-of-document id included)."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got {tokens.min()}..{tokens.max()}"
            )
        data = tokens.astype(self.dtype, copy=False)
        while data.size:
            if self._shard is None or self._shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self._shards[-1]["tokens"]
            piece, data = data[:room], data[room:]
            self._shard.write(piece.tobytes())
            self._shards[-1]["tokens"] += int(piece.size)
        self.num_tokens += int(tokens.size)
        self.num_docs += 1
        self._docs.write(np.array([self.num_tokens], dtype="<i8").tobytes())

    def _next_shard(self) -> None:
        if self._shard is not None:
            _fsync_close(self._shard)
        name = f"{self.split}_{len(self._shards):05d}.bin"
        self._shard = (self.out_dir / name).open("wb")
        self._shards.append({"file": name, "tokens": 0})

    def close(self) -> dict[str, Any]:
        """Flush and fsync everything, then write the index; returns the index."""
        if self._closed:
            raise ValueError("ShardWriter is already closed")
        self._closed = True
        if self._shard is not None:
            _fsync_close(self._shard)
        _fsync_close(self._docs)
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "split": self.split,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "shard_tokens": self.shard_tokens,
            "shards": self._shards,
            "docs": f"{self.split}_docs.bin",
        }
        tmp = self.out_dir / f"{self.split}.json.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out_dir / f"{self.split}.json")
        fsync_dir(self.out_dir)
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:  # leave no index: the split stays visibly incomplete
            self._closed = True
            for f in (self._shard, self._docs):
                if f is not None:
                    f.close()


def read_index(directory: Path, split: str) -> dict[str, Any]:
    path = directory / f"{split}.json"
    if not path.is_file():
        raise NotFoundError(f"{directory}: no token split {split!r} ({path.name} is missing)")
    index: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise IntegrityError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} index")
    return index


class TokenDataset:
    """Read-only, memory-mapped view of a split for next-token prediction.

    ``ds[i]`` is window ``i``: ``(x, y)``, int64 arrays of shape ``(seq_len,)`` with
    ``y[t] = x[t + 1]``; windows tile the stream (``len(ds) = (num_tokens - 1) // seq_len``).
    Arrays are numpy; ``torch.from_numpy`` makes tensors without a copy.
    """

    def __init__(self, directory: Path, split: str, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, not {seq_len}")
        index = read_index(directory, split)
        self.directory = directory
        self.split = split
        self.seq_len = seq_len
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.vocab_size: int = index["vocab_size"]
        self.num_tokens: int = index["num_tokens"]
        self.num_docs: int = index["num_docs"]
        self._shards: list[np.memmap[Any, np.dtype[Any]]] = []
        for shard in index["shards"]:
            path = directory / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise IntegrityError(f"{path}: missing or not {expected} bytes as the index says")
            self._shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        sizes = [len(s) for s in self._shards]
        # starts[k] = offset of shard k in the stream; starts[-1] = num_tokens
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        if int(self._starts[-1]) != self.num_tokens:
            raise IntegrityError(f"{directory}/{split}.json: shard sizes do not add up")
        docs_path = directory / index["docs"]
        if not docs_path.is_file() or docs_path.stat().st_size != 8 * (self.num_docs + 1):
            raise IntegrityError(f"{docs_path}: missing or not {self.num_docs + 1} offsets")
        # doc_offsets[d] : doc_offsets[d + 1] is document d in the stream
        self.doc_offsets: np.ndarray = np.memmap(docs_path, dtype="<i8", mode="r")

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Stream positions ``start:stop`` (a copy, in the stored dtype), across shards."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range {start}:{stop} outside 0:{self.num_tokens}")
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self._starts[k])
            hi = min(stop, int(self._starts[k + 1])) - int(self._starts[k])
            parts.append(self._shards[k][lo:hi])
            start += hi - lo
            k += 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i %= n
        w = self.tokens(i * self.seq_len, (i + 1) * self.seq_len + 1).astype(np.int64)
        return w[:-1], w[1:]

    def document(self, d: int) -> np.ndarray:
        """Document ``d``'s ids (end-of-document id included), for SFT and evaluation."""
        if not 0 <= d < self.num_docs:
            raise IndexError(f"document {d} out of range for {self.num_docs} documents")
        return self.tokens(int(self.doc_offsets[d]), int(self.doc_offsets[d + 1]))

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The window order of one epoch: a permutation fixed by (seed, epoch)."""
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def batches(
        self,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless ``(x, y)`` batches of shape ``(batch_size, seq_len)``, int64.

        Step ``s`` takes positions ``[s·B·W, (s+1)·B·W)`` of the concatenated epoch orders
        (B = batch_size, W = world_size; an epoch boundary may fall inside a batch) and rank
        ``r`` keeps its ``B`` of them, so every rank sees different windows and
        ``batches(..., start_step=k)`` yields exactly what the uninterrupted run yielded
        from step ``k`` on (at the same world size).
        """
        n = len(self)
        if n == 0:
            raise GenloopError(
                f"split {self.split!r} has {self.num_tokens} tokens: too few for one window "
                f"of {self.seq_len + 1}"
            )
        if batch_size < 1 or start_step < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size ≥ 1, start_step ≥ 0 and 0 ≤ rank < world_size; got "
                f"{batch_size}, {start_step}, {rank}, {world_size}"
            )
        per_step = batch_size * world_size
        pos = start_step * per_step + rank * batch_size
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        while True:
            idx = np.empty(batch_size, dtype=np.int64)
            for j in range(batch_size):
                e, k = divmod(pos + j, n)
                if e != epoch:
                    epoch, perm = e, self.order(seed, e)
                idx[j] = perm[k]
            x = np.empty((batch_size, self.seq_len), dtype=np.int64)
            y = np.empty((batch_size, self.seq_len), dtype=np.int64)
            for j, i in enumerate(idx):
                x[j], y[j] = self[int(i)]
            yield x, y
            pos += per_step

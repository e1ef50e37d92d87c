"""The per-record half of data preparation, run in worker processes.

Kept apart from ``prepare.py`` so a worker imports only the steps (no catalog, no
SQLAlchemy): workers start in a fraction of a second. ``process_chunk`` runs the steps on
a chunk of records and computes the dedup keys; the main process keeps the global dedup
state. ``ordered_map`` fans chunks out to a pool in order, with bounded memory.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from genloop.data.records import Dropped, Record

if TYPE_CHECKING:
    from genloop.config import DataConfig

CHUNK_RECORDS = 64
# Imported once by the forkserver, so every worker it forks starts with them loaded.
PRELOAD = [
    "genloop.data.steps",
    "genloop.data.clean",
    "genloop.data.dedup",
    "genloop.data.pii",
    "genloop.data.code",
    "genloop.data.images",
]


@dataclass
class Steps:
    """What every worker runs on each record; plain data so it pickles to the workers."""

    steps: list[Any]
    exact: bool
    near: bool
    num_perm: int
    shingle_size: int
    binary: bool  # dedup on record.data (images) instead of record.text


@dataclass
class Outcome:
    record: Record | None
    dropped: Dropped | None = None
    step: str = ""
    exact_key: bytes | None = None
    signature: Any = None


@dataclass
class StepCounts:
    seen: int = 0
    changed: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def merge(self, other: StepCounts) -> None:
        self.seen += other.seen
        self.changed += other.changed
        self.dropped.update(other.dropped)


def build_steps(cfg: DataConfig) -> Steps:
    from genloop.data import clean, code, pii

    steps: list[Any] = []
    if cfg.kind == "images":
        from genloop.data.images import CleanCaption, DecodeImage

        # Captions are cleaned like short texts (no document filters), then PII-redacted.
        steps.append(CleanCaption(form=cfg.clean.normalize, lowercase=cfg.clean.lowercase))
        if cfg.pii.enabled:
            steps.append(pii.RedactPII(kinds=tuple(cfg.pii.kinds)))
        steps.append(DecodeImage(size=cfg.images.size, channels=cfg.images.channels))
        return Steps(
            steps, exact=cfg.dedup.exact, near=False, num_perm=0, shingle_size=0, binary=True
        )
    c = cfg.clean
    steps.append(
        clean.Normalize(
            form=c.normalize, strip_whitespace=c.strip_whitespace, lowercase=c.lowercase
        )
    )
    if c.remove_stopwords:
        steps.append(clean.RemoveStopwords())
    if cfg.kind == "code":
        if cfg.code.require_parse:
            steps.append(code.RequireParse())
        if cfg.code.strip_license_header:
            steps.append(code.StripLicenseHeader())
        if cfg.code.format:
            steps.append(code.FormatCode())
    steps.append(
        clean.QualityFilter(
            min_chars=c.min_chars,
            max_chars=c.max_chars,
            max_repetition_ratio=c.max_repetition_ratio,
            max_symbol_ratio=c.max_symbol_ratio,
        )
    )
    if cfg.pii.enabled:
        steps.append(pii.RedactPII(kinds=tuple(cfg.pii.kinds)))
    return Steps(
        steps,
        exact=cfg.dedup.exact,
        near=cfg.dedup.near,
        num_perm=cfg.dedup.num_perm,
        shingle_size=cfg.dedup.shingle_size,
        binary=False,
    )


_WORKER_STEPS: Steps | None = None


def init_worker(steps: Steps) -> None:
    global _WORKER_STEPS
    _WORKER_STEPS = steps


def process_chunk(
    records: list[Record], steps: Steps | None = None
) -> tuple[list[Outcome], dict[str, StepCounts]]:
    """Run the per-record steps and compute dedup keys for one chunk (in a worker).

    Each step runs over the records still in the chunk before the next step starts; a step
    with a ``batch(records) -> list[Record | Dropped]`` method gets them all in one call
    (``code.FormatCode`` runs one formatter process per chunk), the others record by record.
    Steps are independent per record, so the order changes no output.
    """
    from genloop.data.dedup import exact_key, minhash_signature

    pipeline = steps or _WORKER_STEPS
    assert pipeline is not None
    counts = {s.name: StepCounts() for s in pipeline.steps}
    out = [Outcome(record) for record in records]
    alive = list(range(len(records)))  # indices of the records no step has dropped
    current = list(records)
    for step in pipeline.steps:
        if not alive:
            break
        c = counts[step.name]
        before = [(current[i].text, current[i].data) for i in alive]
        batch = getattr(step, "batch", None)
        results = batch([current[i] for i in alive]) if batch else [step(current[i]) for i in alive]
        still: list[int] = []
        for i, old, result in zip(alive, before, results, strict=True):
            c.seen += 1
            if isinstance(result, Dropped):
                c.dropped[result.reason] += 1
                kept = current[i] if result.quarantine else None
                out[i] = Outcome(kept, dropped=result, step=step.name)
                continue
            current[i] = result
            if (result.text, result.data) != old:  # compares by identity first: cheap
                c.changed += 1
            still.append(i)
        alive = still
    for i in alive:
        record = out[i].record = current[i]
        if pipeline.binary:
            if pipeline.exact and record.data is not None:
                # the same image with another caption is another example
                h = hashlib.blake2b(record.data, digest_size=16)
                if record.text is not None:
                    h.update(b"\0caption\0" + record.text.encode("utf-8"))
                out[i].exact_key = h.digest()
        else:
            text = record.text or ""
            if pipeline.exact:
                out[i].exact_key = exact_key(text)
            if pipeline.near:
                out[i].signature = minhash_signature(
                    text, num_perm=pipeline.num_perm, shingle_size=pipeline.shingle_size
                )
    return out, counts


def chunks(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def ordered_map(
    fn: Callable[[list[Record]], Any],
    chunks: Iterable[list[Record]],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> Iterator[Any]:
    """``map`` over worker processes, in order, with a bounded number of chunks in flight
    (``Executor.map`` would read the whole input first and break flat memory)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=initializer, initargs=initargs
    ) as pool:
        window: list[Future[Any]] = []
        for chunk in chunks:
            window.append(pool.submit(fn, chunk))
            if len(window) >= 4 * workers:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()

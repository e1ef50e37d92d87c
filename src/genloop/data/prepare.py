"""``genloop data prepare``: sources → cleaned, deduplicated, split, tokenized dataset version.

The main flow, top to bottom:

1. build the sources and hash their inputs together with the config; if this dataset
   already has a version with that hash, return it (nothing is redone);
2. stream records from the sources in chunks to worker processes, which run the
   per-record steps (normalize, filters, code checks, PII redaction, image decoding) and
   compute dedup keys; the main process keeps the global dedup state (exact keys, MinHash
   LSH), assigns each document to train/val/test by its id, and writes it out;
3. train a byte-level BPE tokenizer on the training split (or copy an existing one), then
   tokenize in parallel and pack memory-mapped token shards per split; for captioned
   images, train the tokenizer on the training captions only (caption-conditioned
   families tokenize captions themselves);
4. write statistics, a dataset card, samples and the quarantine file, and register the
   artifact as the next dataset version.

Memory stays flat: records stream, only dedup keys and signatures are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from genloop.data.records import Quarantined, Record
from genloop.data.steps import (
    CHUNK_RECORDS,
    StepCounts,
    build_steps,
    chunks,
    init_worker,
    ordered_map,
    process_chunk,
)
from genloop.errors import GenloopError
from genloop.workspace.datasets import (
    DatasetVersionInfo,
    find_by_hash,
    register_dataset_version,
)
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.sources import Source

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the artifact layout or the steps' behaviour changes (2: ruff format)
ProgressFn = Callable[[str, int], None]  # (stage, items just done)


# ------------------------------------------------------------------------- the main flow


def input_hash(
    cfg: DataConfig,
    tok: TokenizerConfig | None,
    sources: list[Source],
    tokenizer_dir: Path | None = None,
) -> str:
    """sha256 of the config (less ``workers``, which changes no output), the sources'
    contents and, for a pretrained tokenizer, its files."""
    from genloop.data.sources import local

    h = hashlib.sha256()
    h.update(f"genloop-data-v{FORMAT_VERSION}\n".encode())
    h.update(json.dumps(cfg.model_dump(mode="json", exclude={"workers"}), sort_keys=True).encode())
    h.update(json.dumps(tok.model_dump(mode="json") if tok else None, sort_keys=True).encode())
    for src in sources:
        h.update(src.fingerprint().encode())
    if tokenizer_dir is not None:
        h.update(local.fingerprint({"kind": "tokenizer"}, local.walk(tokenizer_dir)).encode())
    return h.hexdigest()


def dataset_digest(
    cfg: DataConfig, tokenizer: TokenizerConfig | None = None, *, root: Path | None = None
) -> str:
    """The input hash :func:`prepare_dataset` would give ``cfg`` (the version's identity)."""
    from genloop.data.sources import build_source

    sources = [build_source(spec.model_dump(), root=root) for spec in cfg.sources]
    pretrained = None
    if tokenizer is not None and tokenizer.kind == "pretrained":
        assert tokenizer.path is not None
        pretrained = _pretrained_dir(tokenizer.path, root)
    return input_hash(cfg, tokenizer, sources, pretrained)


def prepare_dataset(
    ws: Workspace,
    cfg: DataConfig,
    tokenizer: TokenizerConfig | None = None,
    *,
    root: Path | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[DatasetVersionInfo, bool]:
    """Build (or find) the dataset version for ``cfg``; returns it and whether it was new.

    Relative paths in the sources and a pretrained tokenizer's ``path`` are taken from
    ``root`` (the config file's folder, for a config read from a file), else the working
    folder.
    """
    from genloop.data.sources import build_source

    started = time.perf_counter()
    workers = workers or cfg.workers or os.cpu_count() or 1
    sources = [build_source(spec.model_dump(), root=root) for spec in cfg.sources]
    pretrained = None
    if tokenizer is not None and tokenizer.kind == "pretrained":
        assert tokenizer.path is not None
        pretrained = _pretrained_dir(tokenizer.path, root)
    # 1. same inputs + same config → the same version, nothing redone
    digest = input_hash(cfg, tokenizer, sources, pretrained)
    existing = find_by_hash(ws, cfg.name, digest)
    if existing is not None:
        log.debug("dataset %s is unchanged: reusing version %s", cfg.name, existing.version)
        return existing, False

    with ws.store.scratch() as work:
        stats = _clean_and_split(cfg, sources, work, workers, progress)
        if tokenizer is not None and cfg.kind != "images":
            stats["tokenizer"] = _tokenize(tokenizer, pretrained, work, workers, progress, stats)
        elif tokenizer is not None:
            captions = _train_captions(work)
            if captions:
                stats["tokenizer"] = _caption_tokenizer(tokenizer, pretrained, work, captions)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        lineage = {"sources": [s.describe() for s in sources]}
        config = {
            "data": cfg.model_dump(mode="json"),
            "tokenizer": tokenizer.model_dump(mode="json") if tokenizer else None,
        }
        (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        def publish(staging: Path) -> None:
            # Hard links, not moves: if another writer takes this version number first,
            # publish runs again and needs every file still in place.
            (work / "card.md").write_text(_card(cfg.name, digest, config, stats, lineage, work))
            shutil.copytree(work, staging, copy_function=_link_or_copy, dirs_exist_ok=True)

        info = register_dataset_version(
            ws,
            cfg.name,
            digest,
            publish,
            kind=cfg.kind,
            config=config,
            stats=stats,
            lineage=lineage,
        )
    return info, True


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the scratch folder is on the store's filesystem: no copy
    except OSError:
        shutil.copy2(src, dst)


def _clean_and_split(
    cfg: DataConfig,
    sources: list[Source],
    work: Path,
    workers: int,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    from genloop.data.dedup import ExactDedup, NearDedup
    from genloop.data.pack import assign_split

    steps = build_steps(cfg)
    counts = {s.name: StepCounts() for s in steps.steps}
    exact = ExactDedup() if steps.exact else None
    near = (
        NearDedup(threshold=cfg.dedup.threshold, num_perm=cfg.dedup.num_perm)
        if steps.near
        else None
    )
    quarantine_counts: Counter[str] = Counter()
    dedup_counts: Counter[str] = Counter()
    splits: dict[str, dict[str, int]] = {}
    read = 0
    samples: list[dict[str, Any]] = []
    out_files: dict[str, TextIO] = {}
    image_out: dict[str, list[Record]] = {}
    (work / "docs").mkdir()
    quarantine = (work / "quarantine.jsonl").open("w", encoding="utf-8")

    def records() -> Iterator[Record]:
        nonlocal read
        for src in sources:
            for item in src.records():
                if isinstance(item, Quarantined):
                    quarantine_counts[item.reason] += 1
                    _quarantine(
                        quarantine, item.id, item.source, "source", item.reason, item.detail
                    )
                    continue
                read += 1
                yield item

    chunked = chunks(records(), CHUNK_RECORDS)
    if workers <= 1:
        results: Iterator[Any] = (process_chunk(c, steps) for c in chunked)
    else:
        results = ordered_map(process_chunk, chunked, workers, init_worker, (steps,))
    try:
        for outcomes, chunk_counts in results:
            for name, c in chunk_counts.items():
                counts[name].merge(c)
            for o in outcomes:
                if o.dropped is not None:
                    if o.dropped.quarantine and o.record is not None:
                        _quarantine(
                            quarantine,
                            o.record.id,
                            o.record.source,
                            o.step,
                            o.dropped.reason,
                            o.dropped.detail,
                        )
                    continue
                rec = o.record
                assert rec is not None
                if exact is not None and o.exact_key is not None and exact.seen_before(o.exact_key):
                    dedup_counts["duplicate"] += 1
                    continue
                if (
                    near is not None
                    and o.signature is not None
                    and near.is_duplicate(f"{rec.source}:{rec.id}", o.signature)
                ):
                    dedup_counts["near_duplicate"] += 1
                    continue
                split = assign_split(
                    f"{rec.source}:{rec.id}", cfg.split.val, cfg.split.test, cfg.split.seed
                )
                s = splits.setdefault(split, {"documents": 0, "bytes": 0})
                s["documents"] += 1
                if cfg.kind == "images":
                    s["bytes"] += len(rec.data or b"")
                    image_out.setdefault(split, []).append(rec)
                else:
                    text = rec.text or ""
                    s["bytes"] += len(text.encode("utf-8"))
                    f = out_files.get(split)
                    if f is None:
                        f = out_files[split] = (work / "docs" / f"{split}.jsonl").open(
                            "w", encoding="utf-8"
                        )
                    f.write(
                        json.dumps(
                            {"id": rec.id, "text": text, "label": rec.label, "meta": rec.meta},
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                if len(samples) < cfg.sample_records:
                    samples.append(_sample(rec))
            if progress:
                progress("clean", len(outcomes))
    finally:
        for f in out_files.values():
            f.close()
        quarantine.close()
    if cfg.kind == "images":
        from genloop.data.images import class_names, write_image_dataset

        # one class list over every split, so a class missing from one shifts no ids
        classes = class_names(r.label for recs in image_out.values() for r in recs)
        for split_name, recs in image_out.items():
            write_image_dataset(recs, work / "images" / split_name, classes=classes)
    with (work / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")

    steps_report = [
        {
            "name": name,
            "seen": c.seen,
            "kept": c.seen - sum(c.dropped.values()),
            "changed": c.changed,
            "dropped": dict(c.dropped),
        }
        for name, c in counts.items()
    ]
    drops: Counter[str] = Counter()
    drops.update(quarantine_counts)
    for c in counts.values():
        drops.update(c.dropped)
    drops.update(dedup_counts)
    return {
        "records_read": read,
        "quarantined_at_source": dict(quarantine_counts),
        "steps": steps_report,
        "dedup": {"exact": dedup_counts["duplicate"], "near": dedup_counts["near_duplicate"]},
        "drops": dict(drops),
        "splits": splits,
        "documents": sum(s["documents"] for s in splits.values()),
        "bytes": sum(s["bytes"] for s in splits.values()),
    }


def _quarantine(f: TextIO, rid: str, source: str, stage: str, reason: str, detail: str) -> None:
    f.write(
        json.dumps(
            {"id": rid, "source": source, "stage": stage, "reason": reason, "detail": detail[:500]},
            ensure_ascii=False,
        )
        + "\n"
    )


def _sample(rec: Record, max_chars: int = 2000) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rec.id, "source": rec.source, "label": rec.label, "meta": rec.meta}
    if rec.text is not None:
        out["text"] = rec.text[:max_chars]
    return out


def _iter_texts(path: Path) -> Iterator[str]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def _pretrained_dir(path: Path, root: Path | None) -> Path:
    from genloop.data.sources.local import resolve_user_path
    from genloop.data.tokenizer import tokenizer_file

    directory = resolve_user_path(path, root, "tokenizer: path")
    if not directory.is_dir():
        raise GenloopError(f"tokenizer: path {str(path)!r} is not a directory")
    tokenizer_file(directory)  # NotFoundError when it has no tokenizer.json
    return directory


def _tokenize(
    tok: TokenizerConfig,
    pretrained: Path | None,
    work: Path,
    workers: int,
    progress: ProgressFn | None,
    stats: dict[str, Any],
) -> dict[str, Any]:
    from genloop.data.pack import ShardWriter
    from genloop.data.tokenizer import load_tokenizer, tokenize_parallel, train_bpe

    tok_dir = work / "tokenizer"
    if pretrained is not None:
        shutil.copytree(pretrained, tok_dir)
    else:
        train_bpe(
            _iter_texts(work / "docs" / "train.jsonl"),
            tok_dir,
            vocab_size=tok.vocab_size,
            min_frequency=tok.min_frequency,
            special_tokens=tuple(tok.special_tokens),
            chat_template=tok.chat_template,
            sentinel_tokens=tok.sentinel_tokens,
        )
    vocab_size = load_tokenizer(tok_dir).get_vocab_size()
    total = 0
    for split in stats["splits"]:
        writer = ShardWriter(work / "tokens", split, vocab_size=vocab_size)
        n = 0
        for ids in tokenize_parallel(
            tok_dir, _iter_texts(work / "docs" / f"{split}.jsonl"), workers=workers
        ):
            writer.add(ids)
            n += len(ids)
            if progress:
                progress("tokenize", 1)
        writer.close()
        stats["splits"][split]["tokens"] = n
        total += n
    stats["tokens"] = total
    return {"kind": tok.kind, "vocab_size": vocab_size, "seq_len": tok.seq_len}


def _train_captions(work: Path) -> list[str] | None:
    from genloop.data.images import load_captions

    split_dir = work / "images" / "train"
    return load_captions(split_dir) if split_dir.is_dir() else None


def _caption_tokenizer(
    tok: TokenizerConfig, pretrained: Path | None, work: Path, captions: list[str]
) -> dict[str, Any]:
    """The tokenizer of a captioned image dataset, trained on its training captions."""
    from genloop.data.tokenizer import load_tokenizer, train_bpe

    tok_dir = work / "tokenizer"
    if pretrained is not None:
        shutil.copytree(pretrained, tok_dir)
    else:
        train_bpe(
            captions,
            tok_dir,
            vocab_size=tok.vocab_size,
            min_frequency=tok.min_frequency,
            special_tokens=tuple(tok.special_tokens),
            chat_template=tok.chat_template,
        )
    tokenizer = load_tokenizer(tok_dir)
    lengths = [len(e.ids) for e in tokenizer.encode_batch(captions)]
    return {
        "kind": tok.kind,
        "vocab_size": tokenizer.get_vocab_size(),
        "captions": len(captions),
        "max_caption_tokens": max(lengths),
    }


def _card(
    name: str,
    digest: str,
    config: dict[str, Any],
    stats: dict[str, Any],
    lineage: dict[str, Any],
    work: Path,
) -> str:
    """The dataset card: what went in, what happened to it, what came out."""
    lines = [
        f"# Dataset card: {name}",
        "",
        f"- input hash: `{digest}`",
        f"- documents: {stats['documents']:,}",
        f"- bytes: {stats['bytes']:,}",
    ]
    if "tokens" in stats:
        lines.append(f"- tokens: {stats['tokens']:,}")
    lines += ["", "## Sources", ""]
    for src in lineage["sources"]:
        lines.append("- " + ", ".join(f"{k}: {v}" for k, v in src.items()))
    lines += ["", "## Splits", "", "| split | documents | bytes | tokens |", "|---|---:|---:|---:|"]
    for split, s in sorted(stats["splits"].items()):
        lines.append(f"| {split} | {s['documents']:,} | {s['bytes']:,} | {s.get('tokens', '')} |")
    lines += [
        "",
        "## Preprocessing",
        "",
        f"Records read: {stats['records_read']:,}",
        "",
        "| step | seen | kept | changed | dropped (by reason) |",
        "|---|---:|---:|---:|---|",
    ]
    for step in stats["steps"]:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(step["dropped"].items())) or "–"
        lines.append(
            f"| {step['name']} | {step['seen']:,} | {step['kept']:,} | "
            f"{step['changed']:,} | {dropped} |"
        )
    lines.append(
        f"| dedup | | | | exact: {stats['dedup']['exact']}, near: {stats['dedup']['near']} |"
    )
    if stats["quarantined_at_source"]:
        q = ", ".join(f"{k}: {v}" for k, v in sorted(stats["quarantined_at_source"].items()))
        lines += ["", f"Quarantined while reading: {q} (see `quarantine.jsonl`)."]
    lines += [
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        "## Samples",
        "",
    ]
    samples_path = work / "samples.jsonl"
    if samples_path.exists():
        with samples_path.open(encoding="utf-8") as f:
            for line in islice(f, 3):
                sample = json.loads(line)
                text = str(sample.get("text", f"(label {sample.get('label')})"))[:400]
                lines += [f"**{sample['id']}**", "", "```", text, "```", ""]
    return "\n".join(lines) + "\n"

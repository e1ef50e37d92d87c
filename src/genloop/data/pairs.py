"""Row datasets: prompt → response rows for SFT, (prompt, chosen, rejected) for DPO, and the
labeled rows of encoder models (classification, token classification, retrieval pairs).

A *pairs dataset* is a dataset version of kind ``sft`` or ``dpo`` whose artifact holds::

    pairs/train.jsonl   one row per line; pairs/val.jsonl (validation) when it has rows
    tokenizer/          the tokenizer to encode the rows with (the model's own)
    config.json         {"format": "genloop-pairs", "kind", "val_fraction", "seed"}
    stats.json          rows per split

Rows (other keys, such as ``id`` or ``meta``, are kept and ignored)::

    sft: {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
    dpo: {"prompt": str, "chosen": str, "rejected": str}
    classification: {"text": str, "label": str}
    token_classification: {"tokens": [str, ...], "labels": [str, ...]}  (one label per token)
    retrieval: {"query": str, "positive": str}  (optional "negative": str, a hard negative)

A prompt/response row goes through the chat template, unless it says
``"format": "completion"``: then it is plain text, the response's tokens right after the
prompt's, with no end of text (how ``/v1/completions`` continues a prompt; feedback on
completions is exported so, and an empty prompt makes the row plain language modeling).
How rows become training examples is ``genloop.train.examples``.

:func:`write_pairs_dataset` makes one (the feedback export calls it); :func:`read_pairs`
and :func:`pairs_kind` read one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from genloop.errors import GenloopError

if TYPE_CHECKING:
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.workspace import Workspace

PairsKind = Literal["sft", "dpo", "classification", "token_classification", "retrieval"]
PAIRS_KINDS: tuple[PairsKind, ...] = get_args(PairsKind)
# what each kind's rows hold (strings), for messages and checks
_REQUIRED = {
    "sft": ("prompt", "response"),
    "dpo": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
    "retrieval": ("query", "positive"),
}
PAIRS_FORMAT = "genloop-pairs"
PAIRS_FORMAT_VERSION = 1
ROW_FORMATS = ("chat", "completion")


def check_pair_row(kind: str, row: object, where: str = "row") -> None:
    """Raise a GenloopError saying what is wrong with ``row`` for a ``kind`` dataset."""
    if not isinstance(row, Mapping):
        raise GenloopError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "token_classification":
        _check_tagged(row, where)
        return
    if kind not in _REQUIRED:
        raise GenloopError(f"unknown pairs kind {kind!r} (kinds: {', '.join(PAIRS_KINDS)})")
    if kind in ("classification", "retrieval"):
        _check_strings(kind, row, _REQUIRED[kind], where)
        if kind == "retrieval" and "negative" in row and not isinstance(row["negative"], str):
            raise GenloopError(f"{where}: negative must be a string")
        return
    if row.get("format", "chat") not in ROW_FORMATS:
        raise GenloopError(f"{where}: format must be 'chat' or 'completion', not {row['format']!r}")
    if kind == "sft" and "messages" in row:
        if row.get("format") == "completion":
            raise GenloopError(f"{where}: a completion row has prompt and response, not messages")
        _check_messages(row["messages"], where)
        return
    _check_strings(kind, row, _REQUIRED[kind], where)
    if kind == "dpo" and row["chosen"] == row["rejected"]:
        raise GenloopError(
            f"{where}: chosen and rejected are the same text; a preference needs two"
        )


def _check_strings(
    kind: str, row: Mapping[str, Any], required: tuple[str, ...], where: str
) -> None:
    missing = [k for k in required if k not in row]
    if missing:
        shape = " + ".join(required) + (", or messages" if kind == "sft" else "")
        raise GenloopError(f"{where}: missing {', '.join(missing)} (a {kind} row has {shape})")
    for key in required:
        if not isinstance(row[key], str):
            raise GenloopError(f"{where}: {key} must be a string, got {type(row[key]).__name__}")
        if kind != "sft" and kind != "dpo" and not row[key].strip():
            raise GenloopError(f"{where}: {key} is empty")


def _check_tagged(row: Mapping[str, Any], where: str) -> None:
    tokens, labels = row.get("tokens"), row.get("labels")
    for key, value in (("tokens", tokens), ("labels", labels)):
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise GenloopError(
                f"{where}: {key} must be a non-empty list of strings (a token_classification "
                "row has tokens + labels, one label per token)"
            )
    assert isinstance(tokens, list) and isinstance(labels, list)
    if len(tokens) != len(labels):
        raise GenloopError(
            f"{where}: {len(tokens)} tokens but {len(labels)} labels (one label per token)"
        )


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise GenloopError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, Mapping)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise GenloopError(
                f"{where}: messages[{i}] must be an object with string role and content"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise GenloopError(f"{where}: messages hold no assistant turn to train on")


def write_pairs_dataset(
    ws: Workspace,
    name: str,
    kind: PairsKind,
    rows: Iterable[Mapping[str, Any]],
    *,
    tokenizer_dir: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    lineage: dict[str, Any] | None = None,
    val_rows: Iterable[Mapping[str, Any]] | None = None,
    extra_stats: Mapping[str, Any] | None = None,
) -> DatasetVersionInfo:
    """Publish ``rows`` as the next version of dataset ``name``, or find the same one.

    Every row is checked (a bad one is an error naming its index, and nothing is
    published). A row's split follows from a hash of its content and ``seed``, so identical
    rows share a split; with ``val_rows`` the caller splits instead (an augmented version
    keeps its source's split): ``rows`` all train, ``val_rows`` all validation. The
    tokenizer files of ``tokenizer_dir`` (a tokenizer or model directory) are copied into
    the artifact. The version's content hash covers the rows (and, when given, their
    split), ``kind``, ``val_fraction``, ``seed`` and the tokenizer files, not ``lineage``;
    ``extra_stats`` joins the version's stats.
    """
    from genloop.data.pack import assign_split
    from genloop.data.tokenizer import TOKENIZER_FILES, tokenizer_file
    from genloop.workspace.datasets import register_dataset_version
    from genloop.workspace.refs import check_name

    check_name(name)
    if kind not in PAIRS_KINDS:
        raise GenloopError(f"unknown pairs kind {kind!r} (kinds: {', '.join(PAIRS_KINDS)})")
    if not 0.0 <= val_fraction < 1.0:
        raise GenloopError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    tokenizer_file(tokenizer_dir)  # NotFoundError unless it holds a tokenizer.json
    config = {
        "format": PAIRS_FORMAT,
        "format_version": PAIRS_FORMAT_VERSION,
        "kind": kind,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    if val_rows is not None:
        config["split"] = "given"
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + b"\n")
    tok_files = [tokenizer_dir / n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    for file in tok_files:
        data = file.read_bytes()
        digest.update(f"{file.name}\0{len(data)}\0".encode() + data)
    counts = {"train": 0, "val": 0}
    with ws.store.scratch() as work:
        (work / "pairs").mkdir()
        outs = {s: (work / "pairs" / f"{s}.jsonl").open("w", encoding="utf-8") for s in counts}
        try:
            given = val_rows is not None
            tagged = itertools.chain(
                ((None, row) for row in rows), (("val", row) for row in val_rows or ())
            )
            for i, (fixed, row) in enumerate(tagged):
                check_pair_row(kind, row, f"row {i}")
                try:
                    line = json.dumps(dict(row), sort_keys=True, ensure_ascii=False)
                except (TypeError, ValueError) as exc:
                    raise GenloopError(f"row {i}: not JSON-serializable ({exc})") from None
                if given:
                    split = fixed or "train"
                    digest.update(f"{split}\0".encode())
                else:
                    split = assign_split(line, val_fraction, 0.0, seed)
                digest.update(line.encode() + b"\n")
                outs[split].write(line + "\n")
                counts[split] += 1
        finally:
            for f in outs.values():
                f.close()
        if counts["train"] == 0:
            raise GenloopError(
                f"no rows for the training split ({counts['val']} went to validation); "
                "give more rows or a smaller val_fraction"
            )
        if counts["val"] == 0:
            (work / "pairs" / "val.jsonl").unlink()
        (work / "tokenizer").mkdir()
        for file in tok_files:
            shutil.copyfile(file, work / "tokenizer" / file.name)
        stats = {
            "rows": sum(counts.values()),
            "splits": {s: {"rows": n} for s, n in counts.items()},
            **(extra_stats or {}),
        }
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

        def publish(staging: Path) -> None:
            # a copy, not a move: publish runs again if another writer takes the number
            shutil.copytree(work, staging, dirs_exist_ok=True)

        return register_dataset_version(
            ws,
            name,
            digest.hexdigest(),
            publish,
            kind=kind,
            config=config,
            stats=stats,
            lineage=lineage or {},
        )


def import_rows(
    ws: Workspace,
    path: Path,
    name: str,
    kind: PairsKind,
    *,
    tokenizer_dir: Path,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetVersionInfo:
    """A JSON Lines file of ``kind`` rows as the next version of dataset ``name``.

    Every row is checked first; a bad one is an error naming ``path:line``, and nothing is
    published. The file's name and hash are the version's lineage.
    """
    from genloop.data.jsonl import read_jsonl

    if kind not in PAIRS_KINDS:
        raise GenloopError(f"unknown kind {kind!r} (kinds: {', '.join(PAIRS_KINDS)})")
    if not path.is_file():
        raise GenloopError(f"{path}: no such file")
    rows = []
    for _n, where, row in read_jsonl(path):
        check_pair_row(kind, row, where)
        rows.append(row)
    if not rows:
        raise GenloopError(f"{path}: no rows")
    lineage = {
        "source": "import",
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return write_pairs_dataset(
        ws,
        name,
        kind,
        rows,
        tokenizer_dir=tokenizer_dir,
        val_fraction=val_fraction,
        seed=seed,
        lineage=lineage,
    )


def read_pairs(data_dir: Path, split: str, kind: str) -> list[dict[str, Any]]:
    """The rows of one split of a pairs dataset (none when the split has no file)."""
    path = data_dir / "pairs" / f"{split}.jsonl"
    if not path.is_file():
        return []
    rows = []
    from genloop.data.jsonl import read_jsonl

    for _n, where, row in read_jsonl(path):
        check_pair_row(kind, row, where)
        rows.append(row)
    return rows


def pairs_kind(data_dir: Path) -> str:
    """The kind of a row dataset (``sft``, ``dpo``, ``classification``, …); a clear error
    for any other dataset."""
    config_path = data_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not (data_dir / "pairs").is_dir() or config.get("format") != PAIRS_FORMAT:
        raise GenloopError(
            "this dataset holds no rows (pairs/*.jsonl); make one with `genloop data import "
            "FILE.jsonl --kind KIND`, a labeling export or a feedback export"
        )
    return str(config["kind"])

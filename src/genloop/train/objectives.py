"""Training objectives: what a batch is and what loss it gives.

An objective owns its data stream (resumable by micro-step, so ``--resume`` continues
exactly) and its loss; the loop in ``loop.py`` is the same for all of them.

- ``lm``: next-token prediction on packed token shards (pretraining).
- ``sft``: supervised fine-tuning on prompt → response pairs, loss on the response only.
- ``dpo``: direct preference optimisation on (prompt, chosen, rejected) triples.

SFT and DPO read a *pairs dataset*: a dataset version of kind ``sft`` or ``dpo`` whose
artifact holds::

    pairs/train.jsonl   one row per line; pairs/val.jsonl (validation) when it has rows
    tokenizer/          the tokenizer to encode the rows with (the model's own)
    config.json         {"format": "genloop-pairs", "kind", "val_fraction", "seed"}
    stats.json          rows per split

Rows (other keys, such as ``id`` or ``meta``, are kept and ignored)::

    sft: {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
    dpo: {"prompt": str, "chosen": str, "rejected": str}

A prompt/response row goes through the chat template, unless it says
``"format": "completion"``: then it is plain text, the response's tokens right after the
prompt's, with no end of text (how ``/v1/completions`` continues a prompt; feedback on
completions is exported so, and an empty prompt makes the row plain language modeling).

:func:`write_pairs_dataset` makes one (the feedback export calls it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from genloop.config import GenloopConfig
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

Batch = dict[str, "Tensor"]
PairsKind = Literal["sft", "dpo"]
PAIRS_KINDS: tuple[PairsKind, ...] = ("sft", "dpo")
PAIRS_FORMAT = "genloop-pairs"
PAIRS_FORMAT_VERSION = 1
IGNORE_INDEX = -100  # genloop.models.token_loss.IGNORE_INDEX, without importing torch here
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
ROW_FORMATS = ("chat", "completion")
T = TypeVar("T")


class Objective(Protocol):
    name: str

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Endless micro-batches from micro-step ``start`` on (deterministic)."""
        ...

    def val_batches(self, n: int) -> list[Batch]:
        """The first ``n`` validation batches (the same every evaluation)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        """Mean loss over the batch's target tokens, and how many tokens it trained on."""
        ...


@dataclass
class LanguageModeling:
    """Pretraining: windows of ``seq_len`` tokens from the packed shards; x → y = x shifted."""

    tokens_dir: Path
    seq_len: int
    batch_size: int
    seed: int
    device: torch.device
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    name: str = "lm"

    def _dataset(self, split: str):  # type: ignore[no-untyped-def]
        from genloop.data.pack import TokenDataset

        return TokenDataset(self.tokens_dir, split, self.seq_len)

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        import torch

        ds = self._dataset("train")
        for x, y in ds.batches(self.batch_size, self.seed, start, rank=rank, world_size=world_size):
            yield {
                "input_ids": torch.from_numpy(x).to(self.device),
                "targets": torch.from_numpy(y).to(self.device),
            }

    def val_batches(self, n: int) -> list[Batch]:
        import torch

        try:
            ds = self._dataset("val")
        except GenloopError:
            return []
        if len(ds) == 0:
            return []
        out = []
        # a fixed, evenly spread sample of windows: comparable across evaluations
        count = min(len(ds), n * self.batch_size)
        idx = [int(i * len(ds) / count) for i in range(count)]
        for b in range(0, count, self.batch_size):
            pairs = [ds[i] for i in idx[b : b + self.batch_size]]
            x = torch.stack([torch.from_numpy(p[0]) for p in pairs]).to(self.device)
            y = torch.stack([torch.from_numpy(p[1]) for p in pairs]).to(self.device)
            out.append({"input_ids": x, "targets": y})
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.token_loss import token_loss

        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        loss = token_loss(
            logits, batch["targets"], label_smoothing=self.label_smoothing, z_loss_coef=self.z_loss
        )
        return loss, batch["targets"].numel()


# ----------------------------------------------------------------------- pairs datasets


def check_pair_row(kind: str, row: object, where: str = "row") -> None:
    """Raise a GenloopError saying what is wrong with ``row`` for a ``kind`` dataset."""
    if not isinstance(row, Mapping):
        raise GenloopError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get("format", "chat") not in ROW_FORMATS:
        raise GenloopError(f"{where}: format must be 'chat' or 'completion', not {row['format']!r}")
    if kind == "sft" and "messages" in row:
        if row.get("format") == "completion":
            raise GenloopError(f"{where}: a completion row has prompt and response, not messages")
        _check_messages(row["messages"], where)
        return
    required = ("prompt", "chosen", "rejected") if kind == "dpo" else ("prompt", "response")
    missing = [k for k in required if k not in row]
    if missing:
        shape = " + ".join(required) + (", or messages" if kind == "sft" else "")
        raise GenloopError(f"{where}: missing {', '.join(missing)} (a {kind} row has {shape})")
    for key in required:
        if not isinstance(row[key], str):
            raise GenloopError(f"{where}: {key} must be a string, got {type(row[key]).__name__}")
    if kind == "dpo" and row["chosen"] == row["rejected"]:
        raise GenloopError(
            f"{where}: chosen and rejected are the same text; a preference needs two"
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
) -> DatasetVersionInfo:
    """Publish ``rows`` as the next version of dataset ``name``, or find the same one.

    Every row is checked (a bad one is an error naming its index, and nothing is
    published). A row's split follows from a hash of its content and ``seed``, so identical
    rows share a split. The tokenizer files of ``tokenizer_dir`` (a tokenizer or model
    directory) are copied into the artifact. The version's content hash covers the rows,
    ``kind``, ``val_fraction``, ``seed`` and the tokenizer files, not ``lineage``.
    """
    from genloop.data.pack import assign_split
    from genloop.data.tokenizer import tokenizer_file
    from genloop.models.pretrained import TOKENIZER_FILES
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
            for i, row in enumerate(rows):
                check_pair_row(kind, row, f"row {i}")
                try:
                    line = json.dumps(dict(row), sort_keys=True, ensure_ascii=False)
                except (TypeError, ValueError) as exc:
                    raise GenloopError(f"row {i}: not JSON-serializable ({exc})") from None
                digest.update(line.encode() + b"\n")
                split = assign_split(line, val_fraction, 0.0, seed)
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
    """``sft`` or ``dpo`` for a pairs dataset; a clear error for any other dataset."""
    config_path = data_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not (data_dir / "pairs").is_dir() or config.get("format") != PAIRS_FORMAT:
        raise GenloopError(
            "this dataset holds no prompt/response pairs (pairs/*.jsonl); make an sft or dpo "
            "dataset with genloop.train.objectives.write_pairs_dataset or a feedback export"
        )
    return str(config["kind"])


# ------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Example:
    """One tokenized example; ``labels`` is -100 where there is no loss.

    Causal LM: ``labels`` lines up with ``input_ids`` (the shift happens in the loss).
    Seq2seq: ``input_ids`` is the encoder's input, ``labels`` the decoder's target.
    """

    input_ids: list[int]
    labels: list[int]


def row_messages(row: Mapping[str, Any], response_key: str = "response") -> list[dict[str, str]]:
    """The conversation of a row: its messages, or the prompt as the user's turn and the
    response (``response_key``) as the assistant's."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row[response_key]},
    ]


def chat_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """The ids of ``messages`` through the chat template, and a 0/1 mask of the assistant's
    tokens (what SFT trains on).

    A template that marks assistant turns with ``{% generation %}`` (genloop's does) gives
    the mask directly. For one without the marks, the mask is what the whole conversation
    adds to the earlier turns with the generation prompt: the last assistant turn.
    """
    template = tokenizer.chat_template
    if not template:
        raise GenloopError(
            "the tokenizer has no chat template; set chat_template in its "
            "tokenizer_config.json (genloop's own tokenizers have one)"
        )
    if _GENERATION_TAG.search(str(template)):
        out: Any = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])
    if messages[-1]["role"] != "assistant":
        raise GenloopError(
            "the chat template does not mark assistant turns with {% generation %}, so only a "
            "conversation that ends with the assistant's turn can be trained on"
        )
    prompt: Any = tokenizer.apply_chat_template(
        messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
    )
    full: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    prompt_ids, ids = list(prompt["input_ids"]), list(full["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise GenloopError(
            "cannot tell the response from the prompt: the chat template renders the earlier "
            "turns differently once the answer follows; mark assistant turns with "
            "{% generation %} … {% endgeneration %} in the template"
        )
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def completion_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """The ids of ``prompt`` + ``response`` as plain text (no template), and a 0/1 mask of
    the response's tokens. No end of text follows: a completion continues text, and where
    it stops is the caller's (``max_tokens``, stop strings). An empty prompt is the end of
    text (what a packed document follows in pretraining, and what generation starts from)."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise GenloopError("the tokenizer has no eos token to start an empty prompt from")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    prompt_ids = prompt_ids or [eos]
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _masked(ids: list[int], mask: list[int], max_len: int) -> Example | None:
    """The example truncated to ``max_len`` tokens; None when no response token is left to
    predict (position 0 predicts nothing)."""
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return None
    return Example(ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])


def sft_example(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, Any],
    max_len: int,
    *,
    encoder_decoder: bool = False,
) -> Example | None:
    """The SFT example of a row, truncated to ``max_len``; None if no response is left.

    Causal LM: the conversation through the chat template, labels on the assistant's tokens.
    Seq2seq: the prompt (plain text, or the earlier turns through the chat template) + eos
    for the encoder, the response + eos as labels.
    """
    if not encoder_decoder:
        if row.get("format") == "completion":
            return _masked(*completion_tokens(tokenizer, row["prompt"], row["response"]), max_len)
        return _masked(*chat_tokens(tokenizer, row_messages(row)), max_len)
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise GenloopError("the tokenizer has no eos token to end seq2seq inputs and outputs")
    if "messages" in row:
        messages = row_messages(row)
        if messages[-1]["role"] != "assistant":
            raise GenloopError("a seq2seq SFT conversation must end with the assistant's turn")
        rendered: Any = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, return_dict=True, add_generation_prompt=True
        )
        source, target = list(rendered["input_ids"]), messages[-1]["content"]
    else:
        source = [*tokenizer(row["prompt"], add_special_tokens=False)["input_ids"], eos]
        target = row["response"]
    labels = [*tokenizer(target, add_special_tokens=False)["input_ids"], eos]
    return Example(source[:max_len], labels[:max_len])


def dpo_example(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], max_len: int
) -> tuple[Example, Example] | None:
    """(chosen, rejected) examples of a DPO row; None if either loses its response to
    truncation."""
    if row.get("format") == "completion":
        chosen = _masked(*completion_tokens(tokenizer, row["prompt"], row["chosen"]), max_len)
        rejected = _masked(*completion_tokens(tokenizer, row["prompt"], row["rejected"]), max_len)
    else:
        chosen = _masked(*chat_tokens(tokenizer, row_messages(row, "chosen")), max_len)
        rejected = _masked(*chat_tokens(tokenizer, row_messages(row, "rejected")), max_len)
    return None if chosen is None or rejected is None else (chosen, rejected)


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-pad to the longest: ``input_ids`` with ``pad_id``, ``attention_mask`` 0 on
    padding, ``labels`` -100 on padding (their own length for seq2seq)."""
    import torch

    def pad(rows: list[list[int]], value: int) -> Tensor:
        out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(device)

    return {
        "input_ids": pad([e.input_ids for e in examples], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
        "labels": pad([e.labels for e in examples], IGNORE_INDEX),
    }


def batch_indices(
    n: int, batch_size: int, seed: int, start: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Endless batches of example indices, as ``TokenDataset.batches`` orders windows.

    Micro-step ``s`` takes positions ``[s·B·W, (s+1)·B·W)`` of the concatenated epoch
    permutations (fixed by ``(seed, epoch)``) and rank ``r`` keeps its ``B`` of them, so
    ``start=k`` yields exactly what an uninterrupted run yielded from step ``k`` on.
    """
    import numpy as np

    if n < 1 or batch_size < 1 or start < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need n ≥ 1, batch_size ≥ 1, start ≥ 0 and 0 ≤ rank < world_size; got "
            f"{n}, {batch_size}, {start}, {rank}, {world_size}"
        )
    per_step = batch_size * world_size
    pos = start * per_step + rank * batch_size
    epoch, perm = -1, np.empty(0, dtype=np.int64)
    while True:
        idx = []
        for j in range(batch_size):
            e, k = divmod(pos + j, n)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([seed, e]).permutation(n)
            idx.append(int(perm[k]))
        yield idx
        pos += per_step


# ------------------------------------------------------------------------- objectives


@dataclass
class SupervisedFineTuning:
    """SFT: cross-entropy on the response tokens only; the prompt and padding are masked."""

    train: list[Example]
    val: list[Example]
    batch_size: int
    seed: int
    device: torch.device
    pad_id: int
    encoder_decoder: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    name: str = "sft"

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        order = batch_indices(
            len(self.train), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx in order:
            yield collate([self.train[i] for i in idx], self.pad_id, self.device)

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val), n * self.batch_size), self.batch_size
        return [collate(self.val[i : i + b], self.pad_id, self.device) for i in range(0, count, b)]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        if self.encoder_decoder:
            from genloop.models.seq2seq import seq2seq_loss as family_loss

            targets = batch["labels"]  # (B, T): decoder position t predicts labels[:, t]
        else:
            from genloop.models.causal_lm import lm_loss as family_loss

            targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        loss = family_loss(
            model, batch, label_smoothing=self.label_smoothing, z_loss_coef=self.z_loss
        )
        return loss, int((targets != IGNORE_INDEX).sum())


def sequence_logps(model: nn.Module, batch: Batch) -> Tensor:
    """log π(response | prompt) of each row (B,): next-token log-probs summed over the
    positions whose label is not -100."""
    import torch.nn.functional as F

    from genloop.models.causal_lm import forward_logits, next_token_targets

    logits = forward_logits(model, batch)[:, :-1]  # (B, T-1, V)
    targets = next_token_targets(batch)  # (B, T-1)
    nll = F.cross_entropy(  # (B, T-1), 0 where the target is -100
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.sum(dim=-1)


Reference = Callable[[Batch], "Tensor"]  # a batch → the reference model's sequence_logps


def frozen_reference(model: nn.Module) -> Reference:
    """A frozen copy of ``model`` as it is now (eval mode, no gradients) as the reference."""
    import copy

    import torch

    ref = copy.deepcopy(model).eval().requires_grad_(False)

    def logps(batch: Batch) -> Tensor:
        with torch.no_grad():
            return sequence_logps(ref, batch)

    return logps


def adapter_free_reference(model: nn.Module) -> Reference:
    """A LoRA model's base as the reference: the same module with its adapters switched
    off (peft's ``disable_adapter``), so the weights are not held twice."""
    import torch

    def logps(batch: Batch) -> Tensor:
        was_training = model.training
        model.eval()  # no dropout in the reference pass
        try:
            with torch.no_grad(), model.disable_adapter():  # type: ignore[operator]
                return sequence_logps(model, batch)
        finally:
            model.train(was_training)

    return logps


@dataclass
class DirectPreference:
    """DPO (Rafailov et al., 2023) for causal LMs:

        L = -log σ(β·[(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

    with log π(y|x) summed over the response tokens. ``label_smoothing`` ε assumes a
    fraction ε of the preferences are flipped (conservative DPO):
    (1-ε)·L(h) + ε·L(-h). A batch holds the B chosen sequences, then the B rejected ones:
    2B rows padded together, one forward pass.
    """

    train: list[tuple[Example, Example]]
    val: list[tuple[Example, Example]]
    batch_size: int
    seed: int
    device: torch.device
    pad_id: int
    reference: Reference
    beta: float = 0.1
    label_smoothing: float = 0.0
    name: str = "dpo"

    def _collate(self, pairs: Sequence[tuple[Example, Example]]) -> Batch:
        return collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id, self.device)

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        order = batch_indices(
            len(self.train), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx in order:
            yield self._collate([self.train[i] for i in idx])

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val), n * self.batch_size), self.batch_size
        return [self._collate(self.val[i : i + b]) for i in range(0, count, b)]

    def margins(self, model: nn.Module, batch: Batch) -> Tensor:
        """h/β per pair (B,): how much more the policy than the reference prefers chosen."""
        import torch

        policy_c, policy_r = sequence_logps(model, batch).chunk(2)
        with torch.no_grad():
            ref_c, ref_r = self.reference(batch).chunk(2)
        return (policy_c - ref_c) - (policy_r - ref_r)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        import torch.nn.functional as F

        h = self.beta * self.margins(model, batch)  # (B,)
        eps = self.label_smoothing
        loss = -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        return loss.mean(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------- factory


def make_objective(
    name: str,
    cfg: GenloopConfig,
    data_dir: Path,
    tokenizer_dir: Path | None,
    model: nn.Module,
    device: torch.device,
) -> Objective:
    """The objective ``train.objective`` names, for objectives other than ``lm``.

    SFT and DPO read a pairs dataset of their kind. Sequences are truncated to the model's
    context length (``tokenizer.seq_len`` for seq2seq, on both sides); an example with no
    response token left is left out, with a warning.
    """
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.lora import is_lora

    if name in ("vae", "gan", "diffusion"):
        from genloop.train.image_objectives import make_image_objective

        return make_image_objective(name, cfg, data_dir, model, device)
    if name not in PAIRS_KINDS:
        raise GenloopError(f"objective {name!r} is not available for this model family yet")
    kind = pairs_kind(data_dir)
    if kind != name:
        raise GenloopError(f"train.objective is {name}, but the dataset holds {kind} pairs")
    if tokenizer_dir is None:
        raise GenloopError("the pairs dataset has no tokenizer/; write it again with one")
    tokenizer = load_hf_tokenizer(tokenizer_dir)
    model_config = getattr(model, "config", None)
    vocab = getattr(model_config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise GenloopError(
            f"the dataset's tokenizer has {len(tokenizer)} tokens but the model only {vocab}: "
            "write the pairs with the model's own tokenizer"
        )
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    context = getattr(model_config, "max_position_embeddings", None)
    max_len = cfg.tokenizer.seq_len if encoder_decoder or not isinstance(context, int) else context
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if not isinstance(pad_id, int):
        raise GenloopError("the tokenizer has neither a pad nor an eos token to pad batches with")
    t = cfg.train

    def encode(split: str, one: Callable[[dict[str, Any]], T | None]) -> list[T]:
        rows = read_pairs(data_dir, split, kind)
        out = [e for e in map(one, rows) if e is not None]
        if len(out) < len(rows):
            log.warning(
                "%d of %d %s rows leave no response token within %d tokens; left out",
                len(rows) - len(out),
                len(rows),
                split,
                max_len,
            )
        if split == "train" and not out:
            raise GenloopError(f"no {kind} training examples fit in {max_len} tokens")
        return out

    if name == "sft":

        def one_sft(row: dict[str, Any]) -> Example | None:
            return sft_example(tokenizer, row, max_len, encoder_decoder=encoder_decoder)

        return SupervisedFineTuning(
            encode("train", one_sft),
            encode("val", one_sft),
            t.batch_size,
            t.seed,
            device,
            pad_id,
            encoder_decoder=encoder_decoder,
            label_smoothing=t.label_smoothing,
            z_loss=t.z_loss,
        )
    if encoder_decoder:
        raise ConfigError("dpo trains causal language models only")
    if t.z_loss:
        raise ConfigError("train.z_loss does not apply to dpo; leave it at 0")

    def one_dpo(row: dict[str, Any]) -> tuple[Example, Example] | None:
        return dpo_example(tokenizer, row, max_len)

    # The reference is the model as training starts: the base with its adapters off, or a
    # frozen copy (taken before the loop wraps the model or restores a checkpoint).
    reference = adapter_free_reference(model) if is_lora(model) else frozen_reference(model)
    return DirectPreference(
        encode("train", one_dpo),
        encode("val", one_dpo),
        t.batch_size,
        t.seed,
        device,
        pad_id,
        reference,
        beta=t.dpo_beta,
        label_smoothing=t.label_smoothing,
    )

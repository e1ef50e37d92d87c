"""The ``masked_lm`` family for the training loop: a BERT-class encoder, its head chosen by
the dataset, and the objective that trains it.

    dataset                                      head (task)               train.objective
    text, token shards (``tokens/``)             mlm                       mlm
    rows {"text", "label"}                       sequence_classification   classification
    rows {"tokens": [...], "labels": [...]}      token_classification      token_classification
    rows {"query", "positive"[, "negative"]}     embedding (bare encoder)  embedding

From scratch the encoder is a preset of ``model.masked_lm.architecture`` (bert or
modernbert) with the model section's overrides, sized to the dataset's tokenizer; with
``model.base_model`` (a masked_lm ref or a local BERT/ModernBERT checkpoint) it is the
base's encoder under the head the data asks for (a fresh head unless the base already has
it with the same labels: ``models.masked_lm.with_task``). A head's labels are the sorted
set of the training rows' labels; ``config.json`` keeps them as ``id2label``.

Objectives:

- ``mlm``: windows of ``tokenizer.seq_len`` - 1 tokens from the shards behind the cls
  token, masked afresh each micro-batch (``train/masking.py``; the mask is seeded by
  (seed, micro-step, rank), so a resumed run sees the same masks). The loss is the
  cross-entropy of the masked tokens; validation windows and masks are fixed.
- ``classification`` / ``token_classification``: cross-entropy of the head on the rows,
  encoded once (cls … sep, cut to the model's context; a word's label sits on its first
  sub-token, -100 elsewhere). A validation row whose label no training row has is an
  error naming it.
- ``embedding``: ``genloop.train.embedding.make_embedding_objective`` (contrastive, with
  in-batch negatives), on the bare encoder.

The count the loop sums as "tokens" is masked tokens (mlm), rows (classification) or
labeled words (token classification).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import BuiltModel, TrainingData, base_model_dir, wrong_family

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor, nn
    from transformers import PreTrainedTokenizerBase

    from genloop.config import ModelConfig, TrainConfig
    from genloop.models.masked_lm import Task
    from genloop.train.examples import Example
    from genloop.train.masking import Masking
    from genloop.train.objectives import Objective
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

Batch = dict[str, "Tensor"]
# objective -> the task (head) it trains; the dataset says which one a run gets
OBJECTIVE_TASK: dict[str, Task] = {
    "mlm": "mlm",
    "classification": "sequence_classification",
    "token_classification": "token_classification",
    "embedding": "embedding",
}
# row dataset kind -> task
KIND_TASK: dict[str, Task] = {
    "classification": "sequence_classification",
    "token_classification": "token_classification",
    "retrieval": "embedding",
}
# the model section's keys that size an encoder built from scratch
SIZE_KEYS = (
    "n_layer",
    "n_embd",
    "n_head",
    "intermediate_size",
    "activation",
    "context_length",
    "dropout",
    "tie_embeddings",
)
VAL_STREAM = 1  # the masks of validation windows come from another stream than training's


# ---------------------------------------------------------------------------------- data


def data_task(data: TrainingData) -> Task:
    """The task the dataset trains: token shards → mlm, rows → their kind's head."""
    from genloop.data.pairs import PAIRS_FORMAT, pairs_kind

    if (data.dir / "pairs").is_dir():
        kind = pairs_kind(data.dir)
        if kind not in KIND_TASK:
            raise GenloopError(
                f"dataset {data.ref} holds {kind} rows, which train causal or seq2seq LMs; "
                f"a masked_lm trains on text (objective mlm) or on "
                f"{', '.join(KIND_TASK)} rows"
            )
        return KIND_TASK[kind]
    if (data.dir / "tokens").is_dir():
        return "mlm"
    raise GenloopError(
        f"dataset {data.ref} holds neither token shards nor labeled rows ({PAIRS_FORMAT}); "
        "a masked_lm trains on a text dataset prepared with a tokenizer section (mlm) or on "
        "rows from `genloop data import FILE.jsonl --kind classification` (or "
        "token_classification, retrieval)"
    )


def read_rows(data: TrainingData, split: str) -> list[dict[str, Any]]:
    """The rows of one split of the row dataset (its kind checked row by row)."""
    from genloop.data.pairs import pairs_kind, read_pairs

    return read_pairs(data.dir, split, pairs_kind(data.dir))


def data_labels(data: TrainingData, task: Task) -> list[str]:
    """The sorted label names of the training rows ([] for mlm and embedding)."""
    if task == "sequence_classification":
        return sorted({row["label"] for row in read_rows(data, "train")})
    if task == "token_classification":
        return sorted({label for row in read_rows(data, "train") for label in row["labels"]})
    return []


def _tokenizer_dir(data: TrainingData) -> Path:
    if data.tokenizer_dir is None:
        raise GenloopError(
            f"dataset {data.ref} has no tokenizer/; a masked_lm needs the one its text was "
            "tokenized with (prepare with a tokenizer section, or import rows with --tokenizer)"
        )
    return data.tokenizer_dir


def _check_same_tokenizer(base_dir: Path, tokenizer_dir: Path, ref: str) -> None:
    """A base model keeps its vocabulary: the data must be tokenized by it."""
    from genloop.data.tokenizer import load_tokenizer

    if load_tokenizer(base_dir).get_vocab() != load_tokenizer(tokenizer_dir).get_vocab():
        raise ConfigError(
            f"model.base_model's tokenizer ({base_dir}) differs from dataset {ref}'s: prepare "
            "the text with tokenizer.kind pretrained and tokenizer.path the model, or import "
            "the rows again with --tokenizer the model"
        )


# --------------------------------------------------------------------------------- model


def build_model(
    ws: Workspace,
    m: ModelConfig,
    data: TrainingData,
    device: torch.device,
    *,
    trust_pickle: bool = False,
) -> BuiltModel:
    """The encoder to train, under the head the dataset asks for (module docstring)."""
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models import masked_lm as family

    task = data_task(data)
    labels = data_labels(data, task)
    tokenizer_dir = _tokenizer_dir(data)
    for key in ("n_kv_head", "lora"):
        if getattr(m, key) is not None:
            raise ConfigError(f"model.{key} does not apply to the masked_lm family")
    if m.base_model is not None:
        given = [k for k in SIZE_KEYS if getattr(m, k) is not None]
        if given:
            raise ConfigError(
                f"model.{given[0]} sizes a model built from scratch; with model.base_model "
                "the base's architecture is kept (leave it unset)"
            )
        base_dir, parent = base_model_dir(ws, m.base_model)
        base: Any = family.FAMILY.load(base_dir, device=device, trust_pickle=trust_pickle)
        model_type = str(base.config.model_type)
        if (
            "architecture" in m.masked_lm.model_fields_set
            and model_type != m.masked_lm.architecture
        ):
            raise ConfigError(
                f"model.masked_lm.architecture is {m.masked_lm.architecture}, but the base "
                f"model is {model_type}; leave it unset to keep the base's"
            )
        _check_same_tokenizer(base_dir, tokenizer_dir, data.ref)
        tuned = family.with_task(base, task, labels)
        tuned.train()
        if task == "embedding":
            _freeze_pooler(tuned)
        return BuiltModel(tuned, {"task": task, **tuned.config.to_dict()}, parent)

    tok = load_hf_tokenizer(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    ids = {"pad_token_id": pad, "cls_token_id": cls, "sep_token_id": sep}
    if task == "mlm":
        ids["mask_token_id"] = family.mask_token_id(tok, f"dataset {data.ref}")
    sizes = {k: v for k in SIZE_KEYS if (v := getattr(m, k)) is not None}
    sizes.setdefault("context_length", max(data.seq_len, 64))
    config: dict[str, Any] = {
        "architecture": m.masked_lm.architecture,
        "task": task,
        "preset": m.preset or "tiny",
        "vocab_size": len(tok),
        **sizes,
        **{k: v for k, v in ids.items() if v is not None},
    }
    if labels:
        config["labels"] = labels
    try:
        model = family.FAMILY.build(config)
    except ConfigError as exc:  # a size or label problem is the config's or the data's
        raise ConfigError(f"masked_lm model: {exc}") from None
    if task == "embedding":
        _freeze_pooler(model)
    return BuiltModel(model.to(device), config, None)


def _freeze_pooler(model: nn.Module) -> None:
    """BERT's pooler (dense + tanh on [CLS]) takes no part in mean-pooled embeddings: no
    gradient reaches it, which DDP would take for an error, so it is not trained."""
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


# ----------------------------------------------------------------------------- objectives


def make_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> Objective:
    """The objective ``t.objective`` names, on the dataset the model was built for."""
    name = t.objective
    if name not in OBJECTIVE_TASK:
        raise wrong_family(name)
    task = data_task(data)
    if OBJECTIVE_TASK[name] != task:
        wanted = {
            "mlm": "a text dataset prepared with a tokenizer section (token shards)",
            "classification": 'rows {"text", "label"} (genloop data import FILE.jsonl '
            "--kind classification)",
            "token_classification": 'rows {"tokens", "labels"} (genloop data import '
            "FILE.jsonl --kind token_classification)",
            "embedding": 'rows {"query", "positive"} (genloop data import FILE.jsonl '
            "--kind retrieval)",
        }[name]
        holds = next((k for k, v in OBJECTIVE_TASK.items() if v == task), task)
        raise GenloopError(
            f"train.objective is {name}, but dataset {data.ref} is for {holds}; {name} "
            f"trains on {wanted}"
        )
    if name == "embedding":
        return _embedding_objective(t, data, model, device)
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.masked_lm import context_length, frame_tokenizer

    context = context_length(model)
    # the tokenizer as the saved model will hold it (framed): one encoding everywhere
    tok = frame_tokenizer(load_hf_tokenizer(_tokenizer_dir(data)), context)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise GenloopError(
            f"dataset {data.ref}'s tokenizer has {len(tok)} tokens but the model only "
            f"{vocab}: tokenize the data with the model's own tokenizer"
        )
    if name == "mlm":
        return _mlm_objective(t, data, tok, context, device)
    return _rows_objective(name, t, data, model, tok, context, device)


def _embedding_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> Objective:
    """The contrastive objective of ``genloop.train.embedding`` (another module's)."""
    try:
        module = importlib.import_module("genloop.train.embedding")
    except ModuleNotFoundError:
        raise GenloopError(
            "train.objective embedding needs genloop.train.embedding, which this install lacks"
        ) from None
    make = cast(
        "Callable[[TrainConfig, TrainingData, nn.Module, torch.device], Objective]",
        module.make_embedding_objective,
    )
    return make(t, data, model, device)


def _mlm_objective(
    t: TrainConfig,
    data: TrainingData,
    tok: PreTrainedTokenizerBase,
    context: int,
    device: torch.device,
) -> MaskedLanguageModeling:
    from genloop.models.masked_lm import mask_token_id
    from genloop.train.masking import masking_for

    if not (data.dir / "tokens").is_dir():
        raise GenloopError(
            f"dataset {data.ref} has no token shards; give it a tokenizer section and "
            "prepare it again"
        )
    if data.seq_len > context:
        raise ConfigError(
            f"tokenizer.seq_len ({data.seq_len}) exceeds the model's context ({context} "
            "tokens): prepare the data with a smaller seq_len"
        )
    if data.seq_len < 2:
        raise ConfigError(f"tokenizer.seq_len ({data.seq_len}) leaves no room after cls")
    masking = masking_for(
        tok,
        mask_token_id(tok, f"dataset {data.ref}"),
        t.mlm_probability,
        whole_word=t.whole_word_mask,
    )
    return MaskedLanguageModeling(
        data.dir / "tokens",
        data.seq_len,
        t.batch_size,
        t.seed,
        device,
        masking,
        int(tok.cls_token_id),
    )


def _rows_objective(
    name: str,
    t: TrainConfig,
    data: TrainingData,
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    context: int,
    device: torch.device,
) -> LabeledRows:
    from genloop.models.masked_lm import model_labels

    labels = model_labels(model)
    index = {label: i for i, label in enumerate(labels)}
    per_word = name == "token_classification"
    encode = token_examples if per_word else sequence_examples
    train = encode(tok, read_rows(data, "train"), index, context, f"{data.ref} train")
    val = encode(tok, read_rows(data, "val"), index, context, f"{data.ref} val")
    if not train:
        raise GenloopError(f"dataset {data.ref} has no training rows that fit the model")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if not isinstance(pad, int):
        raise GenloopError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return LabeledRows(train, val, t.batch_size, t.seed, device, pad, per_word, name=name)


def _label_id(index: dict[str, int], label: str, where: str) -> int:
    if label not in index:
        raise GenloopError(
            f"{where}: label {label!r} is not one the model predicts "
            f"({', '.join(index)}); every label must have training rows: add some for it, "
            "or leave the row out"
        )
    return index[label]


def sequence_examples(
    tok: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    index: dict[str, int],
    context: int,
    where: str,
) -> list[Example]:
    """Classification rows as examples: the framed text cut to ``context``, one label."""
    from genloop.train.examples import Example

    if not rows:
        return []
    ids = tok([r["text"] for r in rows], truncation=True, max_length=context)["input_ids"]
    return [
        Example(list(x), [_label_id(index, r["label"], f"{where} row {i + 1}")])
        for i, (x, r) in enumerate(zip(ids, rows, strict=True))
    ]


def token_examples(
    tok: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    index: dict[str, int],
    context: int,
    where: str,
) -> list[Example]:
    """Token classification rows as examples: each word's label on its first sub-token,
    -100 elsewhere; words past ``context`` are left out (with a warning)."""
    from genloop.models.masked_lm import encode_words
    from genloop.train.examples import IGNORE_INDEX, Example

    out, cut = [], 0
    for i, row in enumerate(rows):
        ids, firsts = encode_words(tok, row["tokens"], context)
        labels = [IGNORE_INDEX] * len(ids)
        for position, label in zip(firsts, row["labels"], strict=True):
            label_id = _label_id(index, label, f"{where} row {i + 1}")
            if position >= 0:
                labels[position] = label_id
        cut += firsts.count(-1)
        if any(p >= 0 for p in firsts):
            out.append(Example(ids, labels))
    if cut:
        log.warning("%s: %d words lie past the model's %d tokens; left out", where, cut, context)
    return out


@dataclass
class LabeledRows:
    """Fine-tuning a head on labeled rows in memory: ``classification`` (one label per
    row, ``labels`` (B,)) or ``token_classification`` (``labels`` (B, T), -100 where no
    word starts)."""

    train: list[Example]
    val: list[Example]
    batch_size: int
    seed: int
    device: torch.device
    pad_id: int
    per_token: bool
    name: str = "classification"

    def _collate(self, examples: Sequence[Example]) -> Batch:
        from genloop.train.examples import collate

        batch = collate(examples, self.pad_id, self.device)
        if not self.per_token:
            batch["labels"] = batch["labels"][:, 0]  # (B,): one label per row
        return batch

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        from genloop.train.objectives import batch_indices

        order = batch_indices(
            len(self.train), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx in order:
            yield self._collate([self.train[i] for i in idx])

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val), n * self.batch_size), self.batch_size
        return [self._collate(self.val[i : i + b]) for i in range(0, count, b)]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.masked_lm import masked_lm_loss
        from genloop.train.examples import IGNORE_INDEX

        labels = batch["labels"]
        if self.per_token:
            return masked_lm_loss(model, batch, task="token_classification"), int(
                (labels != IGNORE_INDEX).sum()
            )
        return masked_lm_loss(model, batch, task="sequence_classification"), labels.shape[0]


@dataclass
class MaskedLanguageModeling:
    """MLM pretraining on the packed shards: cls + a window of ``seq_len`` - 1 tokens,
    masked afresh each micro-batch (``train/masking.py``)."""

    tokens_dir: Path
    seq_len: int
    batch_size: int
    seed: int
    device: torch.device
    masking: Masking
    cls_id: int
    name: str = "mlm"

    def _windows(self, split: str) -> Any:
        from genloop.data.pack import TokenDataset

        return TokenDataset(self.tokens_dir, split, self.seq_len - 1)

    def _batch(self, windows: np.ndarray, rng: np.random.Generator) -> Batch:
        import numpy as np
        import torch

        from genloop.train.masking import mask_tokens

        ids = np.concatenate(
            [np.full((windows.shape[0], 1), self.cls_id, dtype=np.int64), windows], axis=1
        )  # (B, seq_len)
        inputs, labels = mask_tokens(ids, rng, self.masking)
        return {
            "input_ids": torch.from_numpy(inputs).to(self.device),
            "labels": torch.from_numpy(labels).to(self.device),
        }

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        import numpy as np

        ds = self._windows("train")
        order = ds.batches(self.batch_size, self.seed, start, rank=rank, world_size=world_size)
        for step, (x, _) in enumerate(order, start):
            yield self._batch(x, np.random.default_rng([self.seed, 0, step, rank]))

    def val_batches(self, n: int) -> list[Batch]:
        import numpy as np

        try:
            ds = self._windows("val")
        except GenloopError:
            return []
        if len(ds) == 0:
            return []
        from genloop.train.objectives import spread_batches

        # a fixed sample of windows with fixed masks: comparable evaluations
        out = []
        for k, chunk in enumerate(spread_batches(len(ds), n, self.batch_size)):
            windows = np.stack([ds[i][0] for i in chunk])
            rng = np.random.default_rng([self.seed, VAL_STREAM, k * self.batch_size])
            out.append(self._batch(windows, rng))
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.masked_lm import masked_lm_loss
        from genloop.train.masking import IGNORE_INDEX

        loss = masked_lm_loss(model, batch, task="mlm")
        return loss, int((batch["labels"] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class MaskedLMBuilder:
    """The masked_lm family as the loop builds it (see ``families.Builder``)."""

    family: str = "masked_lm"
    sampler: str = "genloop.models.masked_lm:load_masked_lm"  # no sampling: predictions

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,
    ) -> BuiltModel:
        return build_model(ws, m, data, device, trust_pickle=trust_pickle)

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> Objective:
        return make_objective(t, data, model, device)


BUILDERS = {"masked_lm": MaskedLMBuilder()}

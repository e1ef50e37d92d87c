"""The masked LM family: BERT-class bidirectional encoders (transformers ``BertConfig`` or
``ModernBertConfig``), pretrained by masked-token prediction and fine-tuned under a head.

One encoder, four tasks, each a standard transformers class, so every artifact loads with
plain ``AutoModelFor….from_pretrained(dir)``:

==============================  ====================================  ===================
task                            class (BERT; ModernBERT alike)         batch ``labels``
==============================  ====================================  ===================
``mlm``                         ``BertForMaskedLM``                    (B, T) token ids
``sequence_classification``     ``BertForSequenceClassification``      (B,) label ids
``token_classification``        ``BertForTokenClassification``         (B, T) label ids
``embedding``                   ``BertModel`` (the bare encoder)       none (contrastive)
==============================  ====================================  ===================

-100 marks a position without a loss (HF convention): every unmasked token in ``mlm``,
padding, special tokens and the later sub-tokens of a word in ``token_classification``.
:func:`with_task` puts an encoder under another head (the encoder's weights kept, the head
fresh), which is how a pretrained ``mlm`` model becomes a classifier. A head's labels are
names: ``config.json`` holds ``id2label`` / ``label2id``.

Text. Every sequence starts with the tokenizer's cls token and ends with its sep token, as
BERT's does; classification heads read the first position. A genloop byte-level BPE frames
nothing, so the tokenizer saved with a masked LM gets a post-processor that does (cls and
sep are its bos and eos when it names no others): ``tok(texts)`` is then the encoding
everywhere, transformers' pipelines included. Pretraining needs a mask token: a genloop
BPE has one when ``tokenizer.special_tokens`` holds ``<|mask|>``.

Presets (BERT; tied embeddings; parameters at vocab 8192, context 512):

=========  =======  ======  ======  ============  ===========
preset     n_layer  n_embd  n_head  interm. size  parameters
=========  =======  ======  ======  ============  ===========
``tiny``         4     256       4         1,024    5,462,784
``small``        8     512       8         2,048   29,949,440
``base``        12     768      12         3,072   92,342,528
=========  =======  ======  ======  ============  ===========

Config dict keys (``build``): ``architecture`` (bert, modernbert), ``task``, ``preset``,
``vocab_size``, ``labels`` (a head's label names, in id order), the overrides
(``OVERRIDES``) and the special ids (``TOKEN_IDS``; ``mask_token_id`` is required for
``mlm``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

from genloop.errors import ConfigError, GenloopError
from genloop.models.family import Family, count_parameters
from genloop.models.presets import DEFAULT_VOCAB_SIZE
from genloop.models.token_loss import IGNORE_INDEX, token_loss

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

Architecture = Literal["bert", "modernbert"]
Task = Literal["mlm", "sequence_classification", "token_classification", "embedding"]
ARCHITECTURES: tuple[Architecture, ...] = get_args(Architecture)
TASKS: tuple[Task, ...] = get_args(Task)
HEAD_TASKS = ("sequence_classification", "token_classification")  # tasks with labels

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4, "context_length": 512},
    "small": {"n_layer": 8, "n_embd": 512, "n_head": 8, "context_length": 512},
    "base": {"n_layer": 12, "n_embd": 768, "n_head": 12, "context_length": 512},
}
OVERRIDES = (
    "n_layer",
    "n_embd",
    "n_head",
    "intermediate_size",
    "activation",
    "context_length",
    "dropout",
    "tie_embeddings",
)
TOKEN_IDS = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu")
BATCH_KEYS = ("input_ids", "attention_mask", "labels")
PREDICT_BATCH = 32  # texts per forward pass when predicting

# the transformers auto class of each task, and the ending of its class names
_AUTO = {
    "mlm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "embedding": "AutoModel",
}
_SUFFIX = {
    "ForMaskedLM": "mlm",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "Model": "embedding",
}
# the encoder's weights a head may add or drop: BERT's pooler (dense + tanh on [CLS]), which
# the classification head uses and the MLM head does not
_HEAD_ONLY_PREFIXES = ("pooler.",)


# ------------------------------------------------------------------ architecture and config


@dataclass(frozen=True)
class MaskedLMSpec:
    """A complete encoder in genloop's names (see ``to_hf_config``)."""

    architecture: Architecture
    n_layer: int
    n_embd: int
    n_head: int
    intermediate_size: int
    vocab_size: int = DEFAULT_VOCAB_SIZE
    activation: str = "gelu"
    context_length: int = 512
    dropout: float = 0.1  # BERT's; ModernBERT's own default is 0
    tie_embeddings: bool = True
    pad_token_id: int = 0
    cls_token_id: int | None = None  # None: the pad id (ModernBERT's config wants ids)
    sep_token_id: int | None = None
    mask_token_id: int | None = None  # genloop's record; neither config class has the field

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_config(self, task: Task = "mlm", labels: Sequence[str] = ()) -> PretrainedConfig:
        """The ``BertConfig`` or ``ModernBertConfig`` of this spec, with ``labels`` as
        ``id2label`` / ``label2id`` for a head."""
        from transformers import BertConfig, ModernBertConfig

        heads: dict[str, Any] = {}
        if labels:
            heads = {
                "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)},
            }
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.context_length,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_embeddings,
            **heads,
        }
        if self.architecture == "bert":
            config: PretrainedConfig = BertConfig(
                hidden_act=self.activation,
                hidden_dropout_prob=self.dropout,
                attention_probs_dropout_prob=self.dropout,
                **common,
            )
            return config
        cls = self.pad_token_id if self.cls_token_id is None else self.cls_token_id
        sep = self.pad_token_id if self.sep_token_id is None else self.sep_token_id
        config = ModernBertConfig(
            hidden_activation=self.activation,
            attention_dropout=self.dropout,
            embedding_dropout=self.dropout,
            mlp_dropout=self.dropout,
            cls_token_id=cls,
            bos_token_id=cls,
            sep_token_id=sep,
            eos_token_id=sep,
            **common,
        )
        return config


def intermediate_size(architecture: Architecture, n_embd: int) -> int:
    """BERT's MLP is 4·d wide; ModernBERT's is gated (GeGLU), 1.5·d rounded up to 64."""
    if architecture == "bert":
        return 4 * n_embd
    return 64 * math.ceil(1.5 * n_embd / 64)


def masked_lm_spec(
    preset: str = "tiny",
    *,
    architecture: str = "bert",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    **overrides: Any,
) -> MaskedLMSpec:
    """The spec of ``preset`` with ``overrides`` (``OVERRIDES``, ``TOKEN_IDS``) applied;
    an override of None counts as not given."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown masked_lm preset {preset!r} (presets: {', '.join(PRESETS)})")
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"unknown masked_lm architecture {architecture!r} "
            f"(architectures: {', '.join(ARCHITECTURES)})"
        )
    valid = OVERRIDES + TOKEN_IDS
    for key in overrides:
        if key not in valid:
            raise ConfigError(
                f"unknown masked_lm setting {key!r} (valid: architecture, task, preset, "
                f"vocab_size, labels, {', '.join(valid)})"
            )
    values: dict[str, Any] = {
        **PRESETS[preset],
        **{k: v for k, v in overrides.items() if v is not None},
    }
    for key in ("n_layer", "n_embd", "n_head", "context_length"):
        _check_int(key, values[key])
    _check_int("vocab_size", vocab_size)
    values.setdefault("intermediate_size", intermediate_size(architecture, values["n_embd"]))
    _check_int("intermediate_size", values["intermediate_size"])
    for key in TOKEN_IDS:
        if values.get(key) is not None:
            _check_int(key, values[key], minimum=0)
            if values[key] >= vocab_size:
                raise ConfigError(f"{key} {values[key]} is outside the vocabulary ({vocab_size})")
    if values["n_embd"] % values["n_head"]:
        raise ConfigError(
            f"n_embd ({values['n_embd']}) must be divisible by n_head ({values['n_head']})"
        )
    if values.get("activation", "gelu") not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {values['activation']!r} (activations: {', '.join(ACTIVATIONS)})"
        )
    values.setdefault("dropout", 0.1 if architecture == "bert" else 0.0)
    dropout = values["dropout"]
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1) (got {dropout!r})")
    if not isinstance(values.get("tie_embeddings", True), bool):
        raise ConfigError(
            f"tie_embeddings must be true or false (got {values['tie_embeddings']!r})"
        )
    return MaskedLMSpec(architecture=architecture, vocab_size=vocab_size, **values)


def hf_config(config: Mapping[str, Any]) -> tuple[Task, PretrainedConfig]:
    """The task and the transformers config of a plain config dict (module docstring)."""
    values = dict(config)
    task = values.pop("task", None) or "mlm"
    if task not in TASKS:
        raise ConfigError(f"unknown masked_lm task {task!r} (tasks: {', '.join(TASKS)})")
    labels = values.pop("labels", None) or []
    if task in HEAD_TASKS:
        check_labels(labels)
    elif labels:
        raise ConfigError(f"labels are for the {' and '.join(HEAD_TASKS)} tasks, not {task}")
    if task == "mlm" and values.get("mask_token_id") is None:
        raise ConfigError(
            "a masked_lm model for the mlm task needs mask_token_id, the tokenizer's mask "
            'token: add "<|mask|>" to tokenizer.special_tokens (a genloop BPE makes it the '
            "mask token), or use a tokenizer whose tokenizer_config.json sets mask_token"
        )
    spec = masked_lm_spec(
        values.pop("preset", None) or "tiny",
        architecture=values.pop("architecture", None) or "bert",
        vocab_size=values.pop("vocab_size", None) or DEFAULT_VOCAB_SIZE,
        **values,
    )
    return task, spec.to_hf_config(task, labels)


def check_labels(labels: Sequence[str]) -> None:
    """A head's label names: at least two, distinct, non-empty strings."""
    if not all(isinstance(label, str) and label for label in labels):
        raise ConfigError(f"labels must be non-empty strings (got {list(labels)!r})")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels has duplicates: {list(labels)}")
    if len(labels) < 2:
        raise ConfigError(
            f"a classification head needs at least 2 labels, the data has {len(labels)} "
            f"({', '.join(labels) or 'none'}): give it rows of more than one label"
        )


# ----------------------------------------------------------------------------------- tasks


def task_of(model: nn.Module) -> Task:
    """The task of a masked LM (from its transformers class)."""
    return _task_of_class(type(model).__name__)


def artifact_task(path: str | Path) -> Task:
    """The task of the masked LM saved in ``path``, from ``config.json``'s architectures."""
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{config_path}: cannot read it ({exc})") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(names, list) and names and isinstance(names[0], str)):
        return "mlm"  # no architectures: transformers' default class for the type
    return _task_of_class(names[0])


def _task_of_class(name: str) -> Task:
    for suffix, task in _SUFFIX.items():
        if name.endswith(suffix):
            return task  # type: ignore[return-value]
    raise GenloopError(
        f"{name} is not a masked LM task genloop trains (tasks: {', '.join(TASKS)}); "
        "a masked LM ends in ForMaskedLM, ForSequenceClassification, "
        "ForTokenClassification or is the bare Model"
    )


def model_labels(model: nn.Module) -> list[str]:
    """A head's label names in id order (``config.id2label``); [] for mlm and embedding."""
    if task_of(model) not in HEAD_TASKS:
        return []
    config: Any = getattr(model, "config", None)
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    return [id2label[i] for i in range(len(id2label))]


def build_task_model(config: PretrainedConfig, task: Task) -> PreTrainedModel:
    """A freshly initialised model of ``task`` for ``config`` (seed torch first)."""
    import transformers

    auto = getattr(transformers, _AUTO[task])
    model: PreTrainedModel = auto.from_config(config, attn_implementation="sdpa")
    return model


def with_task(model: nn.Module, task: Task, labels: Sequence[str] = ()) -> PreTrainedModel:
    """``model``'s encoder under the head of ``task``: ``model`` itself when it already has
    that task and those labels, else a new model holding its encoder's weights, the head
    freshly initialised (seed torch first). Labels of a head task are checked."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise GenloopError(f"expected a transformers model, got {type(model).__name__}")
    labels = list(labels) if task in HEAD_TASKS else []
    if labels:
        check_labels(labels)
    if task_of(model) == task and model_labels(model) == labels:
        return model
    config = type(model.config).from_dict(model.config.to_dict())
    config.architectures = None
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    new = build_task_model(config, task)
    state = model.base_model.state_dict()
    result = new.base_model.load_state_dict(state, strict=False)
    stray = [
        k
        for k in (*result.missing_keys, *result.unexpected_keys)
        if not k.startswith(_HEAD_ONLY_PREFIXES)
    ]
    if stray:  # a guard on our own contract: the encoder moves over whole
        raise GenloopError(f"the encoder's weights do not fit the {task} model: {stray[:3]}")
    param = next(model.parameters())
    moved: nn.Module = new  # transformers' own annotation of .to() confuses mypy
    moved.to(device=param.device, dtype=param.dtype)
    return new


# ------------------------------------------------------------------------------------ loss


def _mlm_head(model: nn.Module) -> nn.Module | None:
    """The module mapping hidden states (…, d) to vocabulary logits, where the class has
    one genloop knows (BERT's ``cls``, RoBERTa's ``lm_head``, ModernBERT's head + decoder);
    None: run the whole model."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    head, decoder = getattr(model, "head", None), getattr(model, "decoder", None)
    if isinstance(head, nn.Module) and isinstance(decoder, nn.Module):
        return nn.Sequential(head, decoder)
    return None


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    plain: nn.Module = getattr(inner, "_orig_mod", inner)
    return plain


def _plain(model: nn.Module) -> bool:
    """Whether the model's parts may be called on their own: not wrapped by DDP or
    ``torch.compile``, nor sharded by FSDP2, whose hooks run on the whole model's call."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and not isinstance(model, FSDPModule)


def mlm_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Logits (N, V) at the N positions whose label is not -100, and those labels (N,).

    On a plain model only the masked positions go through the vocabulary projection
    (about 15% of them), which is most of an MLM head's cost; a wrapped or sharded model
    runs whole.
    """
    _check_batch(batch)
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX  # (B, T)
    head = _mlm_head(model) if _plain(model) else None
    if head is None:
        logits: Tensor = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits
        return logits[keep], labels[keep]
    base: Any = model.base_model
    hidden = base(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
    ).last_hidden_state  # (B, T, d)
    return head(hidden[keep]), labels[keep]


def masked_lm_loss(
    model: nn.Module, batch: Mapping[str, Tensor], *, task: Task | None = None
) -> Tensor:
    """Cross-entropy against ``batch["labels"]`` (-100: no loss) for ``task`` (default: the
    model's, under any DDP or compile wrapper): the masked tokens (mlm), each sequence's
    label, or each word's label."""
    task = task or task_of(_unwrapped(model))
    if task == "embedding":
        raise GenloopError(
            "an embedding model has no head to compute a loss with; it trains with the "
            "contrastive objective (train.objective embedding)"
        )
    if task == "mlm":
        logits, labels = mlm_logits(model, batch)  # (N, V), (N,)
        return token_loss(logits[None], labels[None])
    _check_batch(batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"]
    if task == "sequence_classification":  # (B, K) against (B,)
        return token_loss(logits[:, None], labels[:, None])
    return token_loss(logits, labels)  # (B, T, K) against (B, T)


def _check_batch(batch: Mapping[str, Tensor]) -> None:
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    unknown = [k for k in batch if k not in BATCH_KEYS]
    if missing or unknown:
        raise GenloopError(
            f"a masked_lm batch needs input_ids and labels (got keys: {', '.join(batch)}; "
            f"valid: {', '.join(BATCH_KEYS)})"
        )


# ------------------------------------------------------------------------------- tokenizer


def context_length(model: nn.Module) -> int:
    """The most tokens the encoder reads (its position table), cls and sep included."""
    config: Any = getattr(model, "config", None)
    return int(config.max_position_embeddings)


def frames(tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok(text)`` starts with the cls token and ends with the sep token."""
    ids = tok("a")["input_ids"]
    return len(ids) >= 2 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def frame_tokenizer(tok: PreTrainedTokenizerBase, max_length: int) -> PreTrainedTokenizerBase:
    """``tok`` (changed in place) as a masked LM reads text: cls … sep around every text
    (a template post-processor when it does not frame already; cls and sep default to bos
    and eos), right padding, ``model_max_length`` = ``max_length``."""
    from tokenizers import processors

    cls = tok.cls_token or tok.bos_token
    sep = tok.sep_token or tok.eos_token
    if cls is None or sep is None:
        raise GenloopError(
            "the tokenizer has no cls (or bos) and sep (or eos) token to frame a text "
            "with; set cls_token and sep_token in its tokenizer_config.json"
        )
    if tok.cls_token is None:
        tok.cls_token = cls
    if tok.sep_token is None:
        tok.sep_token = sep
    if not frames(tok):
        backend = tok.backend_tokenizer
        specials = {cls: tok.cls_token_id, sep: tok.sep_token_id}
        template = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B {sep}",
            special_tokens=list(specials.items()),
        )
        steps = [backend.post_processor] if backend.post_processor is not None else []
        backend.post_processor = processors.Sequence([*steps, template])
    tok.model_max_length = max_length
    tok.padding_side = "right"
    if not frames(tok):  # a guard: some tokenizers rebuild their post-processor
        raise GenloopError("the tokenizer could not be set up to frame texts with cls and sep")
    return tok


def mask_token_id(tok: PreTrainedTokenizerBase, where: str | Path) -> int:
    """The mask token's id, or the error that names the fix."""
    found = tok.mask_token_id
    if not isinstance(found, int):
        raise GenloopError(
            f"the tokenizer in {where} has no mask token, which masked-LM pretraining needs: "
            'add "<|mask|>" to tokenizer.special_tokens (a genloop BPE makes it the mask '
            "token) and prepare the data again, or use a tokenizer whose "
            "tokenizer_config.json sets mask_token"
        )
    return found


def write_masked_lm_tokenizer(
    tokenizer_dir: Path, out_dir: Path, max_length: int, *, needs_mask: bool = False
) -> None:
    """Save the tokenizer of ``tokenizer_dir`` into ``out_dir`` framed for a masked LM
    (:func:`frame_tokenizer`); ``needs_mask``: refuse one without a mask token."""
    from genloop.data.tokenizer import load_hf_tokenizer

    tok = frame_tokenizer(load_hf_tokenizer(tokenizer_dir), max_length)
    if needs_mask:
        mask_token_id(tok, tokenizer_dir)
    tok.save_pretrained(str(out_dir))


def encode_texts(
    tok: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, device: Any = "cpu"
) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T ≤ max_length), each text framed cls … sep
    (a longer one cut before its sep), padded on the right."""
    if not frames(tok):
        raise GenloopError(
            "this tokenizer does not frame texts with cls and sep; load it with "
            "load_masked_lm (or frame it with frame_tokenizer)"
        )
    enc = tok(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": enc["attention_mask"].to(device),
    }


def encode_words(
    tok: PreTrainedTokenizerBase, words: Sequence[str], max_length: int
) -> tuple[list[int], list[int]]:
    """A pre-split text's ids framed cls … sep, and the position of each word's first
    sub-token (-1 for a word cut off by ``max_length``).

    Each word is tokenized as it reads in running text (a space before every word but the
    first), so a byte-level BPE sees the same tokens as in a sentence.
    """
    if tok.cls_token_id is None or tok.sep_token_id is None:
        raise GenloopError("the tokenizer has no cls and sep tokens; frame it first")
    pieces = tok([w if i == 0 else f" {w}" for i, w in enumerate(words)], add_special_tokens=False)[
        "input_ids"
    ]
    ids, firsts = [int(tok.cls_token_id)], []
    for piece in pieces:
        if not piece or len(ids) + len(piece) > max_length - 1:  # room for sep
            firsts.append(-1)
            continue
        firsts.append(len(ids))
        ids.extend(piece)
    return [*ids, int(tok.sep_token_id)], firsts


# ----------------------------------------------------------------------------- predictions


@torch.no_grad()
def class_probabilities(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str]
) -> Tensor:
    """Softmax over a sequence classifier's labels (``model_labels``), (N, K) float32."""
    if task_of(model) != "sequence_classification":
        raise GenloopError(f"{type(model).__name__} is not a sequence classifier")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), PREDICT_BATCH):
        enc = encode_texts(tok, texts[i : i + PREDICT_BATCH], context_length(model), device)
        out.append(model(**enc).logits.float().softmax(dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(model_labels(model)))


def predict_labels(
    model: nn.Module, tok: PreTrainedTokenizerBase, texts: Sequence[str]
) -> list[str]:
    """The most likely label of each text."""
    names = model_labels(model)
    return [names[i] for i in class_probabilities(model, tok, texts).argmax(dim=-1).tolist()]


@torch.no_grad()
def predict_tags(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    rows: Sequence[Sequence[str]],
    *,
    outside: str = "O",
) -> list[list[str]]:
    """Each word's label (read at its first sub-token) for pre-split texts; a word past
    the model's context gets ``outside``."""
    if task_of(model) != "token_classification":
        raise GenloopError(f"{type(model).__name__} is not a token classifier")
    names = model_labels(model)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[list[str]] = []
    for i in range(0, len(rows), PREDICT_BATCH):
        encoded = [encode_words(tok, r, context_length(model)) for r in rows[i : i + PREDICT_BATCH]]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for j, (ids, _) in enumerate(encoded):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
        best = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        best = best.argmax(dim=-1).cpu()  # (B, T)
        for j, (_, firsts) in enumerate(encoded):
            out.append([names[int(best[j, p])] if p >= 0 else outside for p in firsts])
    return out


# ---------------------------------------------------------------------------- save and load


def load_masked_lm(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The masked LM (eval mode, any task) in ``path`` and its tokenizer, framed as the
    model reads text; files verified against the manifest first when it has one."""
    from genloop.data.tokenizer import load_hf_tokenizer

    path = Path(path)
    model = FAMILY.load(path, device=device)
    tok = frame_tokenizer(load_hf_tokenizer(path), context_length(model))
    return model, tok  # type: ignore[return-value]


def load_encoder(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The bare encoder (``model.base_model``, eval mode) of the masked LM in ``path``,
    whatever its task, and its tokenizer: ``encoder(**encode_texts(tok, texts, n))
    .last_hidden_state`` is (B, T, d)."""
    model, tok = load_masked_lm(path, device=device)
    encoder: PreTrainedModel = model.base_model  # type: ignore[assignment]
    return encoder.eval(), tok  # type: ignore[no-untyped-call]


class MaskedLM:
    """The ``masked_lm`` family (satisfies ``genloop.models.family.Family``)."""

    name: str = "masked_lm"

    def build(self, config: Mapping[str, Any]) -> PreTrainedModel:
        """A freshly initialised model of ``config["task"]`` (default mlm); seed torch first."""
        task, hf = hf_config(config)
        return build_task_model(hf, task)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return masked_lm_loss(model, batch)

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """The Hugging Face layout, ``genloop.json`` holding the task; the tokenizer framed
        (and, for mlm, checked to have a mask token)."""
        from genloop.models.pretrained import save_hf_dir

        if tokenizer_dir is None:
            raise GenloopError("a masked_lm model is saved with its tokenizer (tokenizer_dir)")
        task = task_of(model)
        out = save_hf_dir(model, out_dir, family="masked_lm", extra={"task": task, **(extra or {})})
        write_masked_lm_tokenizer(
            Path(tokenizer_dir), out, context_length(model), needs_mask=task == "mlm"
        )
        return out

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> PreTrainedModel:
        from genloop.models.image_io import verify_dir
        from genloop.models.pretrained import load_pretrained

        path = Path(path)
        verify_dir(path)
        return load_pretrained(
            path, family="masked_lm", device=device, dtype=dtype, trust_pickle=trust_pickle
        )

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int:
        return count_parameters(model, trainable_only=trainable_only)


FAMILY: Family = MaskedLM()  # annotated so mypy checks the protocol


def _check_int(key: str, value: Any, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ConfigError(f"{key} must be {kind} (got {value!r})")

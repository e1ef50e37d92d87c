"""The text families (``causal_lm``, ``seq2seq``) for the training loop: model and objective.

The model is a preset with the model section's architecture overrides, sized to the
dataset's tokenizer (vocabulary and special tokens), or a pretrained checkpoint
(``model.base_model``: a model ref or a local Hugging Face directory), optionally with
LoRA adapters. The objective is ``lm`` (or, for seq2seq, T5's ``span_corruption``) on the
dataset's token shards, or ``sft`` / ``dpo`` on a pairs dataset (``genloop.data.pairs``).
A trained model is sampled by the serving engine
(``genloop.serve.engine.loader.load_engine``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from genloop.errors import ConfigError, GenloopError
from genloop.train.families import BuiltModel, TrainingData, base_model_dir, wrong_family

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from genloop.config import ModelConfig, TrainConfig
    from genloop.train.objectives import Objective
    from genloop.workspace.workspace import Workspace

log = logging.getLogger(__name__)

TEXT_OBJECTIVES = ("lm", "sft", "dpo", "span_corruption")
T = TypeVar("T")


def architecture(m: ModelConfig) -> dict[str, Any]:
    """The architecture overrides the model section sets (``presets.ARCHITECTURE_KEYS``)."""
    from genloop.models.presets import ARCHITECTURE_KEYS

    return {k: v for k in ARCHITECTURE_KEYS if (v := getattr(m, k)) is not None}


def build_model(
    ws: Workspace,
    m: ModelConfig,
    tokenizer_dir: Path | None,
    device: torch.device,
    *,
    seq_len: int | None = None,
    trust_pickle: bool = False,
    shard: Callable[[nn.Module], None] | None = None,
) -> BuiltModel:
    """The text model ``m`` describes, its config dict and the ref it was fine-tuned from.

    From scratch, the vocabulary and special tokens come from ``tokenizer_dir``, and a
    causal LM's context is at least ``seq_len`` (the training windows; default: the
    preset's context) unless ``m.context_length`` sets it. A causal LM is built on the meta
    device and initialised in place (:func:`build_on_meta`); ``shard`` (FSDP2, under
    torchrun) splits it before any weight is allocated, so no rank ever holds it whole.
    """
    from genloop.models.family import get_family

    family = get_family(m.family)
    if m.base_model is not None:
        from genloop.models.pretrained import load_pretrained

        base_dir, parent = base_model_dir(ws, m.base_model)
        load_in_4bit = m.lora is not None and m.lora.load_in_4bit
        if shard is not None and m.lora is None:  # (FSDP2 refuses LoRA: shard() says so)
            sharded = load_sharded(base_dir, device, shard)
            if sharded is not None:
                return BuiltModel(sharded, sharded.config.to_dict(), parent)
            log.info("%s can't be read in slices; each rank reads it whole", base_dir)
        model = load_pretrained(
            base_dir, device=device, load_in_4bit=load_in_4bit, trust_pickle=trust_pickle
        )
        if m.lora is not None:
            from genloop.models.lora import apply_lora

            model = apply_lora(
                model,
                r=m.lora.r,
                alpha=m.lora.alpha,
                dropout=m.lora.dropout,
                target_modules=m.lora.target_modules,
            )
        if shard is not None:  # a base load_sharded can't slice: read whole, then sharded
            shard(model)
        return BuiltModel(model, model.config.to_dict(), parent)
    vocab = _vocab_size(tokenizer_dir)
    overrides = architecture(m)
    if m.family == "seq2seq":
        from genloop.models.seq2seq import OVERRIDES as SEQ2SEQ_OVERRIDES

        # T5 has relative positions (no context length) and no bos token
        unsupported = sorted(set(overrides) - set(SEQ2SEQ_OVERRIDES))
        if unsupported:
            raise GenloopError(f"model.{unsupported[0]} does not apply to the seq2seq family")
        special = {k: v for k, v in _special_ids(tokenizer_dir).items() if k != "bos_token_id"}
    else:
        if seq_len is not None:
            overrides.setdefault("context_length", max(seq_len, 64))
        special = _special_ids(tokenizer_dir)
    model_config = {"preset": m.preset or "tiny", "vocab_size": vocab, **overrides, **special}
    if m.family == "causal_lm":
        return BuiltModel(build_on_meta(model_config, device, shard), model_config, None)
    built: nn.Module = family.build(model_config).to(device)
    if shard is not None:  # seq2seq: built whole, then sharded
        shard(built)
    return BuiltModel(built, model_config, None)


def build_on_meta(
    model_config: dict[str, Any],
    device: torch.device,
    shard: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """A fresh causal LM built without ever holding its weights twice, or whole on a rank.

    The network is made on the meta device (shapes only), ``shard`` (FSDP2's
    ``fully_shard``, under torchrun) splits it, then each rank allocates its own shard on
    ``device`` and :func:`initialize` fills it. Alone (``shard`` None) the same steps give
    the whole model, with the very same values: one process and N FSDP2 ranks start from
    identical weights for the same seed.
    """
    import torch

    from genloop.models.family import get_family

    with torch.device("meta"):
        model: nn.Module = get_family("causal_lm").build(model_config)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # to_empty gives a plain model's tied parameters separate storage
    initialize(model)
    return model


def load_sharded(
    base_dir: Path, device: torch.device, shard: Callable[[nn.Module], None]
) -> PreTrainedModel | None:
    """A pretrained checkpoint, each rank reading only its slices of the safetensors files.

    The model is built on the meta device from ``config.json``, sharded, allocated, and
    each weight filled from ``safe_open(...).get_slice`` with the rows this rank keeps, so
    no rank reads or holds the whole model; buffers that checkpoints leave out (rotary
    frequencies) are computed as transformers computes them. None when the directory
    can't be read that way (pickle weights, a quantized variant, names transformers
    converts on load, saved buffers): the caller then loads it whole.
    """
    import torch
    import transformers
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from genloop.models.pretrained import inspect_checkpoint, variant_format
    from genloop.security.safe_load import check_safetensors

    info = inspect_checkpoint(base_dir)
    if info.weight_format != "safetensors" or variant_format(info.path) != "torch":
        return None
    files = [p for p in info.weights if p.suffix == ".safetensors"]
    check_safetensors(files)
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    config = transformers.AutoConfig.from_pretrained(
        info.path, local_files_only=True, trust_remote_code=False
    )
    with torch.device("meta"):
        model: Any = getattr(transformers, info.architecture)._from_config(config)
    names = [n for n, _ in model.named_parameters()]  # a tied weight once, by its first name
    if [n for n in names if n not in where]:
        return None
    # buffers are computed, not read: decline models with saved buffers, or buffers beside
    # weights in one module (initialize(buffers_only=True) reaches neither)
    if set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}:
        return None
    mixed = [
        m
        for m in model.modules()
        if next(m.buffers(recurse=False), None) is not None
        and next(m.parameters(recurse=False), None) is not None
    ]
    if mixed:
        return None
    shard(model)
    model.to_empty(device=device)
    model.tie_weights()
    initialize(model, buffers_only=True)
    params = dict(model.named_parameters())
    for path in files:
        with safe_open(str(path), framework="pt") as f, torch.no_grad():
            for name in [n for n in names if where[n] == path]:
                target = params[name]
                local = target.to_local() if isinstance(target, DTensor) else target
                local.copy_(f.get_slice(name)[_local_slices(target)])
    return model.eval()  # type: ignore[no-any-return]


def _local_slices(target: torch.Tensor) -> tuple[slice, ...]:
    """Where this rank's part of ``target`` sits in the full tensor (all of it if plain)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        return tuple(slice(0, n) for n in target.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        target.shape, target.device_mesh, target.placements
    )
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def initialize(model: nn.Module, *, buffers_only: bool = False) -> None:
    """Initialise a transformers model's (possibly FSDP2-sharded) weights in place, exactly.

    The modules are visited in the order transformers' own ``initialize_weights`` visits
    them (children first), and each module's ``_init_weights`` runs on full-size CPU
    stand-ins of its own parameters and buffers, drawn from torch's CPU generator; each
    rank keeps its slice. Every rank draws the same numbers, so the shards together equal
    a single process's weights, and at most one module's full tensors (the embedding, at
    vocab × d) exist at once. ``buffers_only``: only modules without parameters (rotary
    frequencies; no random draws), for weights about to be loaded.
    """
    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    def visit(module: nn.Module, owner: Any) -> None:
        for child in module.children():
            visit(child, child if isinstance(child, PreTrainedModel) else owner)
        if not (buffers_only and any(True for _ in module.parameters(recurse=False))):
            _init_module(module, owner)

    with torch.no_grad(), hf_init.guard_torch_init_functions():
        visit(model, model)


def _init_module(module: nn.Module, owner: Any) -> None:
    import torch

    params = dict(module.named_parameters(recurse=False))
    buffers = {k: b for k, b in module.named_buffers(recurse=False) if b is not None}
    if not params and not buffers:
        return
    full = {
        name: torch.empty(t.shape, dtype=t.dtype)  # a DTensor's shape is the global one
        for name, t in {**params, **buffers}.items()
    }
    for name in params:
        module._parameters[name] = torch.nn.Parameter(full[name], requires_grad=False)
    for name in buffers:
        module._buffers[name] = full[name]
    try:
        owner._init_weights(module)
    finally:
        module._parameters.update(params)
        module._buffers.update(buffers)
    for name, target in {**params, **buffers}.items():
        _keep_slice(target, full[name])


def _keep_slice(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` into ``target``, or this rank's slice of it into a sharded ``target``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds the same ``full``; slice locally, no traffic
        mine = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(mine.to_local())
    else:
        target.copy_(full)


def _vocab_size(tokenizer_dir: Path | None) -> int:
    if tokenizer_dir is None:
        raise GenloopError("the dataset has no tokenizer; text models need one")
    from genloop.data.tokenizer import load_tokenizer

    return int(load_tokenizer(tokenizer_dir).get_vocab_size())


def _special_ids(tokenizer_dir: Path | None) -> dict[str, int]:
    if tokenizer_dir is None:
        return {}
    from genloop.data.tokenizer import eos_token_id, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eos = eos_token_id(tokenizer_dir, tok)
    pad = tok.token_to_id("<|pad|>")
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos if pad is None else pad}


def make_objective(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> Objective:
    """The objective ``t.objective`` names: ``lm``, ``sft``, ``dpo`` or ``span_corruption``.

    ``lm`` reads the dataset's token shards in windows of ``data.seq_len``;
    ``span_corruption`` (seq2seq) reads them in windows whose corrupted input fits in
    ``data.seq_len``, with the tokenizer's sentinel tokens. SFT and DPO read a pairs
    dataset of their kind. Sequences are truncated to the model's context
    length (``data.seq_len`` for seq2seq, on both sides); an example with no response
    token left is left out, with a warning.
    """
    name = t.objective
    if name not in TEXT_OBJECTIVES:
        raise wrong_family(name)
    if name in ("lm", "span_corruption") and not (data.dir / "tokens").is_dir():
        raise GenloopError(
            f"dataset {data.ref} has no token shards; give it a "
            "tokenizer section and prepare it again"
        )
    if name == "span_corruption":
        return _span_corruption(t, data, model, device)
    if name == "lm":
        from genloop.train.objectives import LanguageModeling

        return LanguageModeling(
            data.dir / "tokens",
            data.seq_len,
            t.batch_size,
            t.seed,
            device,
            label_smoothing=t.label_smoothing,
            z_loss=t.z_loss,
        )
    return _pairs_objective(name, t, data, model, device)


def _span_corruption(
    t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> Objective:
    """T5 span corruption on the token shards, with the tokenizer's sentinels and eos."""
    from genloop.data.tokenizer import eos_token_id, load_tokenizer, sentinel_ids
    from genloop.train.span_corruption import SpanCorruption

    if data.tokenizer_dir is None:
        raise GenloopError(f"dataset {data.ref} has no tokenizer/; prepare it again with one")
    tokenizer = load_tokenizer(data.tokenizer_dir)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    sentinels = sentinel_ids(tokenizer)
    if isinstance(vocab, int) and sentinels and max(sentinels) >= vocab:
        raise GenloopError(
            f"the dataset's sentinel tokens go up to id {max(sentinels)} but the model has "
            f"only {vocab} tokens: prepare the data with the model's own tokenizer"
        )
    return SpanCorruption(
        data.dir / "tokens",
        data.seq_len,
        t.batch_size,
        t.seed,
        device,
        sentinels,
        eos_token_id(data.tokenizer_dir, tokenizer),
        noise_density=t.noise_density,
        mean_noise_span_length=t.mean_noise_span_length,
        label_smoothing=t.label_smoothing,
        z_loss=t.z_loss,
    )


def _pairs_objective(
    name: str, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
) -> Objective:
    """SFT or DPO on the pairs dataset in ``data.dir``."""
    from genloop.data.pairs import pairs_kind, read_pairs
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.lora import is_lora
    from genloop.train.examples import Example, dpo_example, sft_example
    from genloop.train.objectives import (
        DirectPreference,
        SupervisedFineTuning,
        adapter_free_reference,
        frozen_reference,
    )

    kind = pairs_kind(data.dir)
    if kind != name:
        raise GenloopError(f"train.objective is {name}, but the dataset holds {kind} rows")
    if data.tokenizer_dir is None:
        raise GenloopError("the pairs dataset has no tokenizer/; write it again with one")
    tokenizer = load_hf_tokenizer(data.tokenizer_dir)
    model_config = getattr(model, "config", None)
    vocab = getattr(model_config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise GenloopError(
            f"the dataset's tokenizer has {len(tokenizer)} tokens but the model only {vocab}: "
            "write the pairs with the model's own tokenizer"
        )
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    context = getattr(model_config, "max_position_embeddings", None)
    max_len = data.seq_len if encoder_decoder or not isinstance(context, int) else context
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if not isinstance(pad_id, int):
        raise GenloopError("the tokenizer has neither a pad nor an eos token to pad batches with")

    def encode(split: str, one: Callable[[dict[str, Any]], T | None]) -> list[T]:
        rows = read_pairs(data.dir, split, kind)
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


@dataclass(frozen=True)
class TextBuilder:
    """``causal_lm`` or ``seq2seq``, as the loop builds them (see ``families.Builder``)."""

    family: str
    sampler: str = "genloop.serve.engine.loader:load_engine"

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,
    ) -> BuiltModel:
        return build_model(
            ws, m, data.tokenizer_dir, device, seq_len=data.seq_len, trust_pickle=trust_pickle
        )

    def build_sharded(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        shard: Callable[[nn.Module], None],
        *,
        trust_pickle: bool = False,
    ) -> BuiltModel:
        """The model split by ``shard`` (FSDP2) as it is built: see :func:`build_on_meta`."""
        return build_model(
            ws,
            m,
            data.tokenizer_dir,
            device,
            seq_len=data.seq_len,
            trust_pickle=trust_pickle,
            shard=shard,
        )

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> Objective:
        return make_objective(t, data, model, device)


BUILDERS = {name: TextBuilder(name) for name in ("causal_lm", "seq2seq")}

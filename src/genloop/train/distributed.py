"""One process or many: the same training script alone or under ``torchrun``.

``torchrun --nproc-per-node 2 -m genloop train cfg.yaml`` sets ``RANK``/``WORLD_SIZE``;
:func:`setup` then joins the process group (NCCL on GPUs, gloo on CPUs) and the loop wraps
the model with DDP, or shards it with FSDP2 (``fully_shard``) for models that don't fit
one device.

Only rank 0 writes metrics and model versions, and only rank 0 logs at INFO or prints.

FSDP2 never holds the whole model on one rank, from the first step to the export:

- **init**: a causal LM is built on the meta device (shapes, no storage), sharded with
  :func:`shard` (each DecoderLayer/Block, then the root), and only then does each rank
  allocate its shard (``to_empty``) and initialise it (``text.build_on_meta``): each
  module's full tensors are drawn on the CPU from the seeded generator, one module at a
  time, and each rank keeps its slice, so the weights equal a single process's exactly.
  Other families (and DPO, whose reference is a frozen copy) are built whole, then
  sharded; a ``model.base_model`` is read whole on each rank, then sharded.
- **checkpoints**: :func:`sharded_state` gives ``torch.distributed.checkpoint`` this
  rank's slices (DTensors), which it writes as one safetensors file per rank whose header
  records each slice's place in the full tensor (``checkpoint.save_sharded``; no pickled
  metadata). :func:`load_sharded_state` reads back the slices each rank needs, so a run
  saved by 2 ranks resumes on any number of ranks (one process included), and a
  checkpoint of another model size is refused naming the tensor and both shapes. Whole
  checkpoints (one process, DDP) still load under FSDP2 (:func:`load_full_state_dict`,
  :func:`load_full_optimizer_state_dict`).
- **export**: :func:`export_sharded` writes a causal LM's Hugging Face directory on rank
  0, gathering one tensor at a time (peak: a rank's shard plus the largest single
  tensor); other families still gather a whole copy on rank 0 (:func:`gathered_model`).

FSDP2 works on CPUs too (gloo), which is how the tests exercise it.

A failing rank does not hang the others: torchrun stops every worker (SIGTERM) when one
exits with an error and returns non-zero, and a peer's closed connection fails pending
gloo/NCCL collectives. Under torchrun SIGTERM raises :class:`Terminated`, so rank 0 marks
the run failed (``--resume`` continues it). Without torchrun, collectives time out after
``$GENLOOP_DIST_TIMEOUT_S`` seconds (default 1800).

Multi-node: run the same command on every node with a rendezvous endpoint, e.g.
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
-m genloop train cfg.yaml`` and ``GENLOOP_DATABASE_URL`` pointing at a shared PostgreSQL
catalog, with the workspace folder on shared storage (see ``docs/training.md``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import torch
    from torch import nn

T = TypeVar("T")


class Terminated(GenloopError):
    """This rank was told to stop: another rank failed, or the job was cancelled."""


_previous_sigterm: Any = None  # the handler setup() replaced, put back by teardown()


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated(
        "stopped by SIGTERM (another rank failed, or the job was cancelled); "
        "the last checkpoint is kept: continue with --resume"
    )


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True for rank 0 or a process run alone: the one that prints and writes."""
    return env_rank() == 0


def pick_device(preference: Literal["auto", "cpu", "cuda"], local_rank: int = 0) -> torch.device:
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise GenloopError("train.device is 'cuda' but no CUDA GPU is available here")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise GenloopError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "lower torchrun's --nproc-per-node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(preference: Literal["auto", "cpu", "cuda"] = "auto") -> Dist:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    import torch
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local)
    if world > 1 and not td.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("GENLOOP_DIST_TIMEOUT_S", "1800")))
        td.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
            timeout=timeout,
        )
    if world > 1 and threading.current_thread() is threading.main_thread():
        # torchrun stops the survivors of a failed rank with SIGTERM: unwind, don't vanish
        global _previous_sigterm
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    if rank != 0:
        # progress and INFO lines come from rank 0 only; warnings and errors from every rank
        logging.getLogger("genloop").setLevel(logging.WARNING)
    torch.manual_seed(0)  # the loop reseeds; this only keeps ranks identical before it does
    return Dist(rank=rank, local_rank=local, world_size=world, device=device)


def wrap(model: nn.Module, dist: Dist, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """DDP or FSDP2 around ``model`` when there are several processes; else ``model``.

    FSDP2 shards ``model`` in place (its parameters become DTensors), so build the
    optimizer from the model after this call.
    """
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        if not is_sharded(model):  # a causal LM comes sharded from its builder already
            shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(model: nn.Module) -> None:
    """FSDP2 in place: each transformer block, then the root (the usual recipe).

    Works on a model still on the meta device (the builder then allocates each rank's
    shard, ``text.build_on_meta``) as on one already built.
    """
    from torch.distributed.fsdp import fully_shard

    if getattr(model, "peft_config", None) is not None:
        raise GenloopError(
            "train.strategy 'fsdp' does not support LoRA adapters yet; use strategy 'ddp' "
            "(LoRA keeps the trainable state small enough for it)"
        )
    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "Block")):
            fully_shard(module)
    fully_shard(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and ``torch.compile`` wrappers (FSDP2 shards in place)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    plain: nn.Module = getattr(inner, "_orig_mod", inner)
    return plain


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was sharded with FSDP2 (its state dicts hold DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def _on_rank0() -> bool:
    import torch.distributed as td

    return not td.is_initialized() or td.get_rank() == 0


def _gather_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's complete weights as CPU tensors on rank 0, ``{}`` on other ranks.

    Collective under FSDP2 (every rank must call it: the shards are gathered to rank 0).
    """
    import torch

    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        gathered: Any = get_model_state_dict(model, options=_gather_options())
        return {k: v for k, v in gathered.items() if isinstance(v, torch.Tensor)}
    if not _on_rank0():
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """Load complete weights (every rank passes the same ``state``); each rank keeps its
    shard under FSDP2. Returns ``(missing, unexpected)`` keys, like ``load_state_dict``."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full: Any = state  # the API's value type is wider than ours; the dict is the same
        result = set_model_state_dict(
            model, full, options=StateDictOptions(full_state_dict=True, strict=False)
        )
    else:
        result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an optimizer state dict in torch's own format (a whole checkpoint's, keyed by
    parameter index); every rank passes the same ``state``."""
    model = unwrap(model)
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    # parameter index -> name, in the optimizer's order (the numbering torch uses)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    try:
        by_name: Any = {
            "state": {order[int(i)]: st for i, st in state["state"].items()},
            "param_groups": [
                {**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
    except (IndexError, KeyError, ValueError) as exc:
        raise GenloopError(
            f"the checkpoint's optimizer state does not fit this model ({exc}); "
            "was the model config changed since the run started?"
        ) from None
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )


OPTIMIZER_PREFIX = "optimizer."  # sharded checkpoints: optimizer tensors, beside the weights


def sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's view of the training state, for ``torch.distributed.checkpoint``.

    Returns ``(tensors, extras)``: the weights under their names and the optimizer's
    tensors as ``optimizer.state.<name>.<key>`` (DTensors under FSDP2, whose global shape
    and offsets let a checkpoint be read back at any world size), and the optimizer's
    plain values (``param_groups.<name>.<key>``: hyperparameters, the same on every rank).
    Collective under FSDP2 (a fresh optimizer's state is created by a no-op step).
    """
    tensors, _, extras = _state(model, optimizer)
    return tensors, extras


def _state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """:func:`sharded_state` and the tied weights left out of it (name → the name kept)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model = unwrap(model)
    weights: Any = get_model_state_dict(model)
    optim: Any = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    tied = _tied(model)
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor) and k not in tied}
    extras: dict[str, Any] = {}
    for k, v in optim.items():
        if isinstance(v, torch.Tensor):
            tensors[OPTIMIZER_PREFIX + k] = v
        else:
            extras[k] = v
    return tensors, tied, extras


def _tied(model: nn.Module) -> dict[str, str]:
    """Tied weights (lm_head = the embedding: one parameter under two names): each later
    name → the first one, which alone is saved (as ``save_pretrained`` does)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        first.setdefault(id(p), name)
    return tied


def load_sharded_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    shards: Path,
    extras: dict[str, Any],
    *,
    source: str,
) -> None:
    """Read a sharded checkpoint (written by ``checkpoint.save_sharded``) into ``model``
    and ``optimizer``, whatever world size wrote it: each rank reads the slices of the
    safetensors shards that overlap its own part (all of it for a plain model).

    A checkpoint whose tensors don't match the model (another size or architecture) is
    refused naming the first tensors that differ. Collective under torchrun.
    """
    import torch.distributed as td
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load

    model = unwrap(model)
    tensors, tied, current = _state(model, optimizer)
    reader = HuggingFaceStorageReader(str(shards))
    saved = reader.read_metadata().state_dict_metadata
    _check_fits(tensors, {k: tuple(getattr(m, "size", ())) for k, m in saved.items()}, source)
    with warnings.catch_warnings():  # alone, DCP warns that it reads in one process
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load(tensors, storage_reader=reader, no_dist=not td.is_initialized())
    weights: Any = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
    weights |= {k: tensors[kept] for k, kept in tied.items()}
    optim: Any = {
        k[len(OPTIMIZER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)
    }
    for k, now in current.items():  # JSON gave lists where torch keeps tuples (betas)
        was = extras.get(k, now)
        optim[k] = tuple(was) if isinstance(now, tuple) and isinstance(was, list) else was
    set_model_state_dict(model, weights)
    set_optimizer_state_dict(
        model, optimizer, optim, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )


def _check_fits(
    tensors: dict[str, torch.Tensor], saved: dict[str, tuple[int, ...]], source: str
) -> None:
    missing = sorted(set(tensors) - set(saved))
    unexpected = sorted(set(saved) - set(tensors))
    shapes = [
        f"{k}: checkpoint {list(saved[k])}, model {list(v.shape)}"
        for k, v in tensors.items()
        if k in saved and tuple(v.shape) != saved[k]
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape ({'; '.join(shapes[:3])})")
    if missing:
        parts.append(f"the checkpoint lacks {missing[:3]}")
    if unexpected:
        parts.append(f"the model has no {unexpected[:3]}")
    raise GenloopError(
        f"checkpoint {source} does not fit this model: {', '.join(parts)}; "
        "was the model config changed since the run started?"
    )


def write_full_weights(model: nn.Module, out: Path | None) -> None:
    """Write a sharded model's complete weights to the safetensors file ``out`` on rank 0
    (``None`` on the others), gathering one tensor at a time. Collective.

    The file's header (names, shapes, offsets) is known before any data, so rank 0 writes
    it first and then appends each tensor as it is gathered and drops it: no rank ever
    holds more than its shard plus one full tensor (the largest is the embedding,
    vocab × d). Tied weights are written once, under their first name, as
    ``save_pretrained`` does.
    """
    import torch
    from torch.distributed.tensor import DTensor

    model = unwrap(model)
    tied = _tied(model)
    named = [
        (k, t)
        for k, t in model.state_dict().items()
        if isinstance(t, torch.Tensor) and k not in tied
    ]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in named:
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _safetensors_dtype(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    stream = None
    if out is not None:
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors does
        stream = out.open("wb")
        stream.write(len(text).to_bytes(8, "little") + text)
    try:
        for _, t in named:
            full = t.full_tensor() if isinstance(t, DTensor) else t  # all-gather: one tensor
            if stream is not None:
                data = full.detach().cpu().contiguous()
                stream.write(data.reshape(-1).view(torch.uint8).numpy().data)  # no copy
            del full
    finally:
        if stream is not None:
            stream.close()


def _safetensors_dtype(dtype: torch.dtype) -> str:
    import torch

    names = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    if dtype not in names:
        raise GenloopError(f"cannot write a {dtype} tensor to safetensors here")
    return names[dtype]


def export_sharded(
    model: nn.Module, out: Path | None, *, family: str, tokenizer_dir: Path | None
) -> None:
    """Write a sharded transformers model as a Hugging Face directory ``out`` on rank 0
    (``None`` on the others), never gathering it whole (:func:`write_full_weights`).

    The same files ``models.pretrained.save_hf_dir`` writes: ``config.json`` (naming the
    original class, not FSDP2's subclass), ``generation_config.json``,
    ``model.safetensors``, the tokenizer files and ``genloop.json``. Collective.
    """
    import copy

    from torch.distributed.fsdp import FSDPModule

    from genloop.models.pretrained import _tokenizer_files
    from genloop.workspace.layout import GENLOOP_JSON, SAFETENSORS

    plain = unwrap(model)
    config = getattr(plain, "config", None)
    if config is None:
        raise GenloopError(
            f"cannot export a sharded {type(plain).__name__}: it has no config; "
            "train it with train.strategy 'ddp'"
        )
    if out is not None:
        out.mkdir(parents=True)
    write_full_weights(plain, None if out is None else out / SAFETENSORS)
    if out is None:
        return
    cls = next(c for c in type(plain).__mro__ if not issubclass(c, FSDPModule))
    config = copy.deepcopy(config)
    config.architectures = [cls.__name__]
    config.save_pretrained(out)
    generation = getattr(plain, "generation_config", None)
    can_generate = getattr(plain, "can_generate", lambda: False)
    if generation is not None and can_generate():
        generation.save_pretrained(out)
    for source in _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []:
        shutil.copyfile(source, out / source.name)
    (out / GENLOOP_JSON).write_text(json.dumps({"family": family}, indent=2, sort_keys=True) + "\n")


def gathered_model(model: nn.Module) -> nn.Module | None:
    """The model to export: itself, or under FSDP2 a plain CPU copy with the full weights
    on rank 0 (``None`` on other ranks). Collective under FSDP2.

    For families whose export is not a transformers directory (image families): the whole
    model is gathered on rank 0. Text models use :func:`export_sharded` instead.
    """
    plain = unwrap(model)
    if not is_sharded(plain):
        return plain
    import torch
    from torch.distributed.fsdp import FSDPModule

    state = full_state_dict(plain)
    if not _on_rank0():
        return None
    # fully_shard swapped the class for FSDP<Class>; rebuild the original class empty
    cls: Any = next(c for c in type(plain).__mro__ if not issubclass(c, FSDPModule))
    config = getattr(plain, "config", None)
    if config is None:
        raise GenloopError(
            f"cannot export an FSDP2-sharded {cls.__name__}: it has no config to rebuild it "
            "from; train it with train.strategy 'ddp'"
        )
    with torch.device("meta"):
        copy: nn.Module = cls(config)
    missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    # buffers FSDP2 does not shard and state dicts leave out (rotary frequencies, say)
    for name, buf in plain.named_buffers():
        owner, _, leaf = name.rpartition(".")
        target = copy.get_submodule(owner)
        current = getattr(target, leaf, None)
        if current is not None and current.is_meta:
            target._buffers[leaf] = buf.detach().cpu().clone()
    tie = getattr(copy, "tie_weights", None)
    if callable(tie):
        tie()
    left = [n for n, p in copy.named_parameters() if p.is_meta]
    if unexpected or left:
        raise GenloopError(
            f"gathering the sharded model lost weights (missing {left[:3] or missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return copy.eval()


def broadcast(value: T, dist: Dist) -> T:
    """Rank 0's ``value`` on every rank (a small picklable object: an id, a ref)."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(value: float, dist: Dist) -> float:
    """Average a scalar over ranks (the step's loss, the validation loss)."""
    if not dist.enabled:
        return value
    import torch
    import torch.distributed as td

    t = torch.tensor([value], dtype=torch.float64, device=dist.device)
    td.all_reduce(t)
    return float(t.item()) / dist.world_size


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def teardown(dist: Dist) -> None:
    global _previous_sigterm
    if _previous_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _previous_sigterm)  # past here SIGTERM just ends us
        _previous_sigterm = None
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()

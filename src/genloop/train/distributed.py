"""One process or many: the same training script alone or under ``torchrun``.

``torchrun --nproc-per-node 2 -m genloop train cfg.yaml`` sets ``RANK``/``WORLD_SIZE``;
:func:`setup` then joins the process group (NCCL on GPUs, gloo on CPUs) and the loop wraps
the model with DDP, or shards it with FSDP2 (``fully_shard``) for models that don't fit
one device. FSDP2 works on CPUs too (gloo), which is how the tests exercise it.

Only rank 0 writes checkpoints, metrics and model versions, and only rank 0 logs at INFO
or prints. Under FSDP2 each rank holds a shard of the weights and optimizer state, so
saving gathers them first: :func:`full_state_dict` and :func:`full_optimizer_state_dict`
are collective (every rank calls them) and give rank 0 the same plain, unsharded state
dicts a single process has, so a checkpoint looks the same whatever wrote it and resumes
under any strategy at the same world size. :func:`load_full_state_dict` and
:func:`load_full_optimizer_state_dict` put those state dicts back (each rank keeps its
shard), and :func:`gathered_model` gives rank 0 a plain copy of a sharded model to export.

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

import logging
import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta
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
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "peft_config", None) is not None:
            raise GenloopError(
                "train.strategy 'fsdp' does not support LoRA adapters yet; use strategy 'ddp' "
                "(LoRA keeps the trainable state small enough for it)"
            )
        # shard each transformer block, then the root (the usual FSDP2 recipe)
        for module in model.modules():
            if type(module).__name__.endswith(("DecoderLayer", "Block")):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


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


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as a single process has it, on rank 0; ``{}`` elsewhere.

    The format is torch's own (state keyed by parameter index), whatever the strategy.
    Collective under FSDP2.
    """
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd: Any = get_optimizer_state_dict(model, optimizer, options=_gather_options())
        if not sd:
            return {}
        # FSDP gives state keyed by parameter name; number them in the optimizer's order
        index: dict[str, int] = {}
        for group in sd["param_groups"]:
            for name in group["params"]:
                index.setdefault(name, len(index))
        return {
            "state": {index[name]: st for name, st in sd["state"].items()},
            "param_groups": [
                {**g, "params": [index[name] for name in g["params"]]} for g in sd["param_groups"]
            ],
        }
    if not _on_rank0():
        return {}
    return optimizer.state_dict()


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
    """Load an optimizer state dict in torch's own format (as saved by
    :func:`full_optimizer_state_dict`); every rank passes the same ``state``."""
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


def gathered_model(model: nn.Module) -> nn.Module | None:
    """The model to export: itself, or under FSDP2 a plain CPU copy with the full weights
    on rank 0 (``None`` on other ranks). Collective under FSDP2."""
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

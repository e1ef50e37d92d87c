"""One process or many: the same training script alone or under ``torchrun``.

``torchrun --nproc-per-node 2 -m genloop train cfg.yaml`` sets ``RANK``/``WORLD_SIZE``;
:func:`setup` then joins the process group (NCCL on GPUs, gloo on CPUs) and the loop wraps
the model with DDP, or shards it with FSDP2 (``fully_shard``) for models that don't fit
one device. Only rank 0 writes checkpoints, metrics and model versions.

Multi-node: run the same command on every node with a rendezvous endpoint, e.g.
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500
-m genloop train cfg.yaml`` and ``GENLOOP_DATABASE_URL`` pointing at a shared PostgreSQL
catalog, with the workspace folder on shared storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def pick_device(preference: Literal["auto", "cpu", "cuda"], local_rank: int = 0) -> torch.device:
    import torch

    from genloop.errors import GenloopError

    if preference == "cuda" and not torch.cuda.is_available():
        raise GenloopError("train.device is 'cuda' but no CUDA GPU is available here")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(preference: Literal["auto", "cpu", "cuda"] = "auto") -> Dist:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    import torch
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local)
    if world > 1 and not td.is_initialized():
        td.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    torch.manual_seed(0)  # the loop reseeds; this only keeps ranks identical before it does
    return Dist(rank=rank, local_rank=local, world_size=world, device=device)


def wrap(model: nn.Module, dist: Dist, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """DDP or FSDP2 around ``model`` when there are several processes; else ``model``."""
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # shard each transformer block, then the root (the usual FSDP2 recipe)
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer") or type(module).__name__.endswith(
                "Block"
            ):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and ``torch.compile`` wrappers."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    plain: nn.Module = getattr(inner, "_orig_mod", inner)
    return plain


def mean_across(value: float, dist: Dist) -> float:
    """Average a scalar over ranks (validation loss, say)."""
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
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()

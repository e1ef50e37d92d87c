"""Atomic, verifiable training checkpoints that resume exactly.

A checkpoint is an artifact ``runs/<run_id>/ckpt-<step>`` (built in a temporary directory,
fsynced, renamed into place, manifest last — see ``ArtifactStore.writer``). One process
and DDP write it whole, from rank 0 (:func:`save_checkpoint`):

- ``model.safetensors``: the unwrapped model's state dict (adapters included);
- ``optimizer.safetensors`` + the non-tensor part of the optimizer state in ``state.json``;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states;
- ``state.json``: step, data position, best validation loss, python and numpy RNG states,
  the run's counters.

An FSDP2 run writes it sharded (:func:`save_sharded`, ``"format": "sharded"`` in
``state.json``): instead of the two whole files, ``shards/`` holds one safetensors file per
rank with that rank's slices of the weights and of the optimizer state, written by
``torch.distributed.checkpoint``'s Hugging Face storage writer; each file's header records
where its slices sit in the full tensors, so the checkpoint is read back at any world size
(one process included) and no rank ever holds the whole model. Nothing is pickled, in
either format: safetensors and JSON only (DCP's default writer would add a pickled
``.metadata``; this one does not).

Loading verifies the manifest; a truncated or tampered checkpoint is refused with a clear
error, and :func:`load_latest` falls back to the newest one that verifies. A checkpoint
that does not fit the model (another size) is refused naming the tensors that differ.
"""

from __future__ import annotations

import json
import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genloop.errors import GenloopError, IntegrityError
from genloop.workspace.store import ArtifactStore

if TYPE_CHECKING:
    import torch
    from torch import nn

    from genloop.train.distributed import Dist

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    key: str
    path: Path
    step: int
    state: dict[str, Any]


def checkpoint_key(run_id: str, step: int) -> str:
    return f"runs/{run_id}/ckpt-{step:08d}"


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, _, k = name.partition(".")
        state.setdefault(int(idx), {})[k] = t
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random generator the loop touches: torch (CPU, CUDA), python, numpy."""
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # legacy=True always gives the MT19937 tuple
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    store: ArtifactStore,
    run_id: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> str:
    """Write checkpoint ``step`` whole and atomically (a plain or DDP model, from rank 0);
    returns its artifact key. FSDP2 runs use :func:`save_sharded`."""
    from safetensors.torch import save_file

    key = checkpoint_key(run_id, step)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with store.writer(key, overwrite=True) as d:
        save_file(_dedupe_shared(model_sd), str(d / "model.safetensors"))
        save_file(opt_tensors, str(d / "optimizer.safetensors"))
        save_file(rng_tensors, str(d / "rng.safetensors"))
        full = {**state, "step": step, "optimizer": opt_meta, "rng": rng_meta}
        (d / "state.json").write_text(json.dumps(full))
        for path in d.iterdir():  # on disk before the manifest and the rename publish them
            _fsync(path)
    return key


SHARDS = "shards"  # a sharded checkpoint's folder of per-rank safetensors files


def save_sharded(
    store: ArtifactStore,
    run_id: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    dist: Dist,
) -> str:
    """Write checkpoint ``step`` of an FSDP2 run, each rank its own shard; collective.

    Rank 0 stages the checkpoint (``ArtifactStore.writer``), every rank writes its part of
    the weights and optimizer state into ``shards/`` with ``torch.distributed.checkpoint``
    (safetensors files whose headers carry each piece's offset in the full tensor: no
    pickle, and readable at any world size), then rank 0 adds the RNG states and
    ``state.json`` and publishes it, manifest last. The staging folder must be on storage
    every rank sees (one node, or the workspace on shared storage).
    """
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    from genloop.train import distributed

    key = checkpoint_key(run_id, step)
    tensors, extras = distributed.sharded_state(model, optimizer)
    with store.writer(key, overwrite=True) if dist.is_main else nullcontext(None) as d:
        if d is not None:
            (d / SHARDS).mkdir()
        staging = Path(distributed.broadcast("" if d is None else str(d), dist))
        writer = HuggingFaceStorageWriter(str(staging / SHARDS), save_distributed=True)
        save(tensors, storage_writer=writer)  # fsyncs each rank's file
        if d is not None:
            from safetensors.torch import save_file

            rng_tensors, rng_meta = rng_state()
            save_file(rng_tensors, str(d / "rng.safetensors"))
            full = {
                **state,
                "step": step,
                "format": "sharded",
                "world_size": dist.world_size,
                "optimizer": extras,
                "rng": rng_meta,
            }
            (d / "state.json").write_text(json.dumps(full))
            for path in (d / "rng.safetensors", d / "state.json"):
                _fsync(path)
    return key


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedupe_shared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): clone the repeats."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def list_checkpoints(store: ArtifactStore, run_id: str) -> list[tuple[int, str]]:
    """(step, key) of the run's published checkpoints, newest first."""
    out = []
    for key in store.keys(f"runs/{run_id}"):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("ckpt-") and name[5:].isdigit():
            out.append((int(name[5:]), key))
    return sorted(out, reverse=True)


def load_checkpoint(store: ArtifactStore, key: str) -> Checkpoint:
    """Verify and read a checkpoint's state (weights are applied by :func:`restore`)."""
    path = store.open_verified(key)
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(key=key, path=path, step=int(state["step"]), state=state)


def load_latest(store: ArtifactStore, run_id: str) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for step, key in list_checkpoints(store, run_id):
        try:
            return load_checkpoint(store, key)
        except (IntegrityError, ValueError, KeyError) as exc:  # ValueError: bad JSON
            log.warning(
                "checkpoint at step %d is unusable (%s); trying the previous one", step, exc
            )
    return None


def restore(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load weights, optimizer and RNG states from a verified checkpoint, in place (on
    every rank under torchrun; an FSDP2-sharded model keeps its shard)."""
    from safetensors.torch import load_file

    from genloop.train import distributed

    if ckpt.state.get("format") == "sharded":  # an FSDP2 run's, at any world size
        distributed.load_sharded_state(
            model, optimizer, ckpt.path / SHARDS, ckpt.state["optimizer"], source=ckpt.key
        )
        set_rng_state(load_file(str(ckpt.path / "rng.safetensors")), ckpt.state["rng"])
        return
    # a whole checkpoint (one process, DDP): every rank reads it all and keeps its part
    weights = load_file(str(ckpt.path / "model.safetensors"))
    try:
        missing, unexpected = distributed.load_full_state_dict(model, weights)
    except RuntimeError as exc:  # torch's "size mismatch for ..." lines
        raise GenloopError(
            f"checkpoint {ckpt.key} does not fit this model: {str(exc).strip()[:500]}; "
            "was the model config changed since the run started?"
        ) from None
    if unexpected or [k for k in missing if k not in _tied_keys(model)]:
        raise GenloopError(
            f"checkpoint {ckpt.key} does not fit this model "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}); "
            "was the model config changed since the run started?"
        )
    distributed.load_full_optimizer_state_dict(
        model,
        optimizer,
        _unflatten_optimizer(
            load_file(str(ckpt.path / "optimizer.safetensors")), ckpt.state["optimizer"]
        ),
    )
    set_rng_state(load_file(str(ckpt.path / "rng.safetensors")), ckpt.state["rng"])


def _tied_keys(model: nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys)  # a list, or a dict keyed by the tied parameter names


def prune_checkpoints(store: ArtifactStore, run_id: str, keep_last: int, keep: set[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the steps in ``keep`` (best)."""
    for i, (step, key) in enumerate(list_checkpoints(store, run_id)):
        if i >= keep_last and step not in keep:
            store.delete(key)

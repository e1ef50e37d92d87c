"""``genloop train``: the training loop, readable top to bottom.

    setup  → the run, the data, the model, the optimizer, a checkpoint to resume from
    fit    → for each step: accumulate micro-batches, clip, step, schedule; validate every
             N steps; checkpoint every M steps; stop on NaN, on early stopping or at the end
    finish → register the model version with its lineage and metrics

The model and the objective come from the family's builder (``families.py``), so the loop
is the same for every family. The same function runs alone or under torchrun (DDP / FSDP2,
see ``distributed.py``).
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genloop.errors import GenloopError
from genloop.train import checkpoint as ckpt
from genloop.train import distributed
from genloop.train.schedule import lr_at
from genloop.train.tracking import RunTracker
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import torch
    from torch import nn

    from genloop.config import GenloopConfig, TrainConfig
    from genloop.train.objectives import Objective
    from genloop.workspace.registry import ModelVersionInfo

log = logging.getLogger(__name__)

STREAMED_EXPORT = ("causal_lm",)  # FSDP2 exports these without gathering the whole model
ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, max_steps, last metrics)
EvalFn = Callable[[int, dict[str, float]], None]  # (step, metrics incl. val_loss)


class TrainingDiverged(GenloopError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class StopRun(Exception):
    """Raised by an ``on_eval`` callback to end the run on purpose (a pruned tuning trial).

    The run is marked ``status`` (not "failed") and the exception propagates to the caller.
    """

    def __init__(self, status: str = "stopped", reason: str = "") -> None:
        super().__init__(reason or status)
        self.status = status


@dataclass
class TrainResult:
    run_id: str
    steps: int
    metrics: dict[str, float]
    model: ModelVersionInfo | None = None
    stopped_early: bool = False
    history: list[float] = field(default_factory=list)  # training loss per step


@dataclass
class TrainState:
    """Where the loop is. Every checkpoint holds it (with the weights, the optimizer and the
    RNG states), so a resumed run goes on exactly as the uninterrupted one would have."""

    step: int = 0  # optimizer steps done; the data stream resumes at step · grad_accum
    best_val: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[float] = field(default_factory=list)  # training loss per step
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})

    def record_eval(self, val: float, patience: int | None) -> None:
        """Track the best validation loss; stop after ``patience`` evaluations without one."""
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self.stopped_early = patience is not None and self.evals_without_improvement >= patience


@dataclass
class Setup:
    """Everything the loop needs, built by :func:`setup` from the config."""

    model: nn.Module  # possibly wrapped (DDP / compile)
    raw_model: nn.Module
    family: str
    objective: Objective
    optimizer: torch.optim.Optimizer
    tokenizer_dir: Path | None
    dataset_version_id: int | None
    parent: str | None  # model ref fine-tuned from
    model_config: dict[str, Any]


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    ws: Workspace,
    cfg: GenloopConfig,
    *,
    resume: str | bool = False,
    model_name: str | None = None,
    progress: ProgressFn | None = None,
    register: bool = True,
    root: Path | None = None,
    on_eval: EvalFn | None = None,
    trust_pickle: bool = False,
) -> TrainResult:
    """Train (or fine-tune) the model ``cfg`` describes; returns the run and model version.

    ``root`` is where relative paths in the data section start (the config file's folder).
    ``resume=True`` continues the newest unfinished run of this model name, ``resume=RUN_ID``
    that run; either continues exactly where its last good checkpoint left off.
    ``train.resume`` in the config does the same when there is such a run, and starts a new
    one when there is not. ``cfg.parts`` (models this one names as ``part:NAME``) are
    trained, or reused when unchanged, first (``train/parts.py``).
    ``on_eval(step, metrics)`` is called after each validation; raising :class:`StopRun`
    from it ends the run with that status (how a tuning study prunes a trial).
    """
    name = model_name or cfg.name or (cfg.data.name if cfg.data else None) or "model"
    if cfg.parts:  # the models this one builds on, trained (or reused) first
        from genloop.train.parts import train_parts

        cfg, _ = train_parts(ws, cfg, train, model_name=name, root=root, trust_pickle=trust_pickle)
    t = cfg.train
    dist = distributed.setup(t.device)
    try:
        seed_everything(t.seed)
        # --resume insists on a run to continue; train.resume in the config takes one if any
        run_id = _find_resumable(ws, name, resume or t.resume, required=bool(resume))
        resuming = run_id is not None
        s = setup(ws, cfg, dist, root=root, trust_pickle=trust_pickle)
        tracker: RunTracker | None = None
        if dist.is_main:
            tracker = (
                RunTracker(ws, run_id, list(t.log_to))
                if run_id is not None
                else RunTracker.start(
                    ws,
                    name=name,
                    kind="train",
                    config=cfg.model_dump(mode="json"),
                    dataset_version_id=s.dataset_version_id,
                    sinks=list(t.log_to),
                )
            )
            run_id = tracker.run_id
        run_id = _broadcast_run_id(run_id, dist)
        try:
            state = resume_state(ws, run_id, s, tracker) if resuming else TrainState()
            result = fit(ws, t, s, dist, tracker, run_id, state, progress, on_eval)
            if register and distributed.is_sharded(s.raw_model) and s.family in STREAMED_EXPORT:
                # FSDP2: rank 0 writes the Hugging Face files one gathered tensor at a
                # time (collective), then registers them
                with ws.store.scratch() if dist.is_main else nullcontext(None) as tmp:
                    out = None if tmp is None else tmp / "model"
                    distributed.export_sharded(
                        s.raw_model, out, family=s.family, tokenizer_dir=s.tokenizer_dir
                    )
                    if out is not None:
                        result.model = finish(ws, cfg, s, name, run_id, result, saved=out)
            elif register:
                # other families under FSDP2 gather a plain copy on rank 0 (collective)
                export = distributed.gathered_model(s.raw_model)
                if dist.is_main:
                    result.model = finish(ws, cfg, s, name, run_id, result, export)
            if tracker is not None:
                tracker.set_status("completed", summary=result.metrics)
            return result
        except StopRun as stop:
            if tracker is not None:
                tracker.set_status(stop.status, summary=_summary(state, False), error=str(stop))
            raise
        except KeyboardInterrupt:
            if tracker is not None:  # no checkpoint here: resume takes the last one
                tracker.set_status("interrupted", error="interrupted by the user")
            raise
        except BaseException as exc:
            if tracker is not None:
                if isinstance(exc, TrainingDiverged):
                    tracker.diverged(str(exc))  # a "nan" alert (genloop.monitor.training)
                tracker.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
    finally:
        distributed.teardown(dist)


def setup(
    ws: Workspace,
    cfg: GenloopConfig,
    dist: distributed.Dist,
    root: Path | None = None,
    *,
    trust_pickle: bool = False,
) -> Setup:
    """The data, the model and the optimizer for this config."""
    from genloop.train.families import TrainingData, get_builder
    from genloop.workspace.datasets import check_trainable, resolve_dataset

    t, m = cfg.train, cfg.model
    # 1. the dataset version: named, or the one the data section describes (prepared on
    #    demand; unchanged inputs make this a lookup)
    if t.dataset is not None:
        dataset = resolve_dataset(ws, t.dataset)
    elif cfg.data is not None:
        from genloop.data.prepare import prepare_dataset

        if dist.is_main:
            dataset, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer, root=root)
            distributed.broadcast(dataset.ref, dist)
        else:  # under torchrun rank 0 prepares (or finds) the version; the others look it up
            dataset = resolve_dataset(ws, distributed.broadcast("", dist))
    else:
        raise GenloopError("nothing to train on: set train.dataset or add a data section")
    check_trainable(dataset)  # never one excluded after a privacy erasure
    data_dir = ws.store.open_verified(dataset.artifact)
    data = TrainingData(
        ref=dataset.ref,
        dir=data_dir,
        tokenizer_dir=data_dir / "tokenizer" if (data_dir / "tokenizer").is_dir() else None,
        seq_len=cfg.tokenizer.seq_len,
        image_normalize=cfg.data.images.normalize if cfg.data is not None else None,
    )

    # 2. the model (from scratch, sized by the data, or from model.base_model) and
    # 3. the objective (train.objective on this data): the family's builder makes both
    builder = get_builder(m.family)
    build_sharded = getattr(builder, "build_sharded", None)
    if dist.enabled and t.strategy == "fsdp" and build_sharded is not None and t.objective != "dpo":
        # FSDP2 from the start: built on the meta device, sharded, then each rank
        # allocates and initialises (or loads) its own shard (text.build_on_meta); other
        # families, and DPO (whose reference is a frozen copy), are built whole, then sharded
        raw_model, model_config, parent = build_sharded(
            ws, m, data, dist.device, distributed.shard, trust_pickle=trust_pickle
        )
    else:
        raw_model, model_config, parent = builder.build_model(
            ws, m, data, dist.device, trust_pickle=trust_pickle
        )
    objective = builder.make_objective(t, data, raw_model, dist.device)

    # 4. the optimizer: AdamW, no weight decay on norms and biases (1-D parameters); made
    #    after wrapping, as FSDP2 replaces the parameters with sharded ones in place
    model = distributed.wrap(raw_model, dist, t.strategy)
    optimizer = make_optimizer(
        raw_model, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, device=dist.device
    )
    if should_compile(t, m.family, objective.name, dist):
        model = compile_model(model)
    return Setup(
        model=model,
        raw_model=raw_model,
        family=m.family,
        objective=objective,
        optimizer=optimizer,
        tokenizer_dir=data.tokenizer_dir,
        dataset_version_id=dataset.id,
        parent=parent,
        model_config=model_config,
    )


# train.compile: auto compiles runs at least this long, and only on a GPU. On a CPU
# (benchmarks/bench_train.py, tiny preset, batch 8 × 256, 2-core AMD EPYC with
# AVX512-BF16, one torch thread, process CPU time) regional compiling (compile_model) made
# steps 1.04-1.08× faster than eager in fp32 and 1.24× in bf16, but its first step took
# 15-20 s more (wall, a cold inductor cache; whole-model compiling took 65 s): 200-550
# steps to pay back in fp32 on one thread, about twice that on two, too late for a short
# CPU run (train.compile: true still compiles). On a GPU, fusing the elementwise work and
# cutting kernel launches usually pays within a few hundred steps; the threshold leaves
# short runs (tests, smoke runs) eager.
COMPILE_AUTO_MIN_STEPS = 1000


def should_compile(t: TrainConfig, family: str, objective: str, dist: distributed.Dist) -> bool:
    """Whether to ``torch.compile`` the model: ``train.compile`` when set; ``auto`` compiles
    a single-process causal LM trained with the ``lm`` objective on a GPU for at least
    ``COMPILE_AUTO_MIN_STEPS`` steps (a run that fails to compile trains eagerly)."""
    if t.compile != "auto":
        return bool(t.compile)
    return (
        family == "causal_lm"
        and objective == "lm"
        and not dist.enabled
        and dist.device.type == "cuda"
        and t.max_steps >= COMPILE_AUTO_MIN_STEPS
    )


def compile_model(model: nn.Module) -> nn.Module:
    """Compile the model; compiling happens at the first call, and :func:`fit` falls back
    to the eager model (``decompiled``) if it fails there.

    A model with a stack of decoder layers (``model.model.layers``, the Llama layout) is
    compiled regionally: each layer in place (``layer.compile()``), so one graph serves
    every layer and the warm-up is that of one layer (PyTorch's "regional compilation"
    recipe); the embedding, final norm and the fused output projection + loss stay eager.
    Other models are compiled whole."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        log.info(
            "torch.compile: compiling each of the %d decoder layers at the first step", len(layers)
        )
        for layer in layers:
            layer.compile()
        return model
    log.info("torch.compile: compiling the model at the first step (train.compile)")
    return torch.compile(model)  # type: ignore[return-value]


def eager_model(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model`` itself when not compiled whole)."""
    inner: nn.Module = getattr(model, "_orig_mod", model)
    return inner


def decompiled(model: nn.Module, *, dry_run: bool = False) -> nn.Module | None:
    """``model`` without compiling: unwrapped, and its regionally compiled layers back to
    their eager forward (``nn.Module.compile`` keeps the compiled call in
    ``_compiled_call_impl``; ``None`` is the eager default). ``None`` when nothing in it
    was compiled; with ``dry_run`` only that is found out, nothing changes."""
    inner = eager_model(model)
    compiled = [m for m in inner.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    if inner is model and not compiled:
        return None
    if not dry_run:
        for module in compiled:
            module._compiled_call_impl = None
    return inner


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
) -> torch.optim.Optimizer:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel (GPU, and CPU since torch 2.4) updates every tensor in one pass:
    # on CPU about 7× faster than the foreach default (tiny preset, 2 cores)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def resume_state(ws: Workspace, run_id: str, s: Setup, tracker: RunTracker | None) -> TrainState:
    """Restore the run's newest checkpoint that verifies into ``s``; its loop state.

    A run killed before its first checkpoint starts over. The points the run logged after
    the checkpoint are dropped: they are trained (and logged) again.
    """
    found = ckpt.load_latest(ws.store, run_id)
    if found is None and ckpt.list_checkpoints(ws.store, run_id):
        raise GenloopError(
            f"run {run_id} has checkpoints but none of them verifies (damaged or "
            "incomplete), so it cannot be resumed; start a new run"
        )
    state = TrainState()
    if found is not None:
        ckpt.restore(found, s.raw_model, s.optimizer)
        state = TrainState.from_checkpoint(found.state)
        log.info("resuming run %s from step %d", run_id, state.step)
    if tracker is not None:
        tracker.reopen(after_step=state.step)
    return state


def fit(
    ws: Workspace,
    t: TrainConfig,
    s: Setup,
    dist: distributed.Dist,
    tracker: RunTracker | None,
    run_id: str,
    state: TrainState,
    progress: ProgressFn | None,
    on_eval: EvalFn | None = None,
) -> TrainResult:
    """Train from ``state.step`` to ``t.max_steps`` or an early stop (``state`` in place)."""
    import torch

    autocast = _autocast(t.precision, dist.device)
    batches = s.objective.train_batches(
        state.step * t.grad_accum, rank=dist.rank, world_size=dist.world_size
    )
    val_batches = s.objective.val_batches(t.eval_batches)
    s.model.train()
    compiling = decompiled(s.model, dry_run=True) is not None
    tokens_window, time_window = 0, 0.0  # training throughput since the last evaluation
    while state.step < t.max_steps and not state.stopped_early:
        t0 = time.perf_counter()
        lr = lr_at(
            state.step,
            lr=t.lr,
            min_lr=t.min_lr,
            warmup_steps=t.warmup_steps,
            max_steps=t.max_steps,
            schedule=t.schedule,
        )
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = (next(batches) for _ in range(t.grad_accum))
        if compiling:  # torch.compile compiles in this step (and may fail there)
            loss_sum, step_tokens = _first_compiled_step(s, t, dist, micro_batches, autocast)
            compiling = False
        else:
            loss_sum, step_tokens = _forward_backward(s, t, dist, micro_batches, autocast)
        norm = (
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), t.grad_clip)
            if t.grad_clip is not None
            else _grad_norm(s.model)
        )
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; the global norm (collective)
            norm = norm.full_tensor()
        norm = norm.detach().float().to(loss_sum.device)
        step_loss, grad_norm = torch.stack([loss_sum, norm]).tolist()
        # the whole (global) batch's loss, the same on every rank, so all of them stop on NaN
        step_loss = distributed.mean_across(step_loss, dist)
        # checked before the update, so the weights (and every checkpoint) stay finite
        if not math.isfinite(step_loss):
            raise TrainingDiverged(_diverged("loss", step_loss, state.step + 1))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(_diverged("gradient norm", grad_norm, state.step + 1))
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        after_step = getattr(s.objective, "after_step", None)  # e.g. a GAN's EMA generator
        if after_step is not None:
            after_step(s.raw_model)
        state.step += 1
        state.history.append(step_loss)

        tokens_window += step_tokens * dist.world_size
        time_window += time.perf_counter() - t0  # training only: no eval, no checkpoints
        metrics = {
            "loss": step_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_window / max(time_window, 1e-9),
            "memory_mb": _memory_mb(dist.device),
        }
        if state.step % t.eval_every == 0 or state.step == t.max_steps:
            if val_batches:
                val = distributed.mean_across(evaluate_loss(s, val_batches, autocast), dist)
                if not math.isfinite(val):
                    raise TrainingDiverged(_diverged("validation loss", val, state.step))
                metrics["val_loss"] = val
                metrics["val_ppl"] = math.exp(min(val, 50.0))  # the stored eval curve
                state.record_eval(val, t.early_stopping_patience)
            tokens_window, time_window = 0, 0.0
        state.metrics = metrics
        if tracker is not None:
            tracker.log(state.step, **metrics)
        if progress is not None and dist.is_main:
            progress(state.step, t.max_steps, metrics)
        if on_eval is not None and "val_loss" in metrics:
            on_eval(state.step, metrics)  # may raise StopRun: no checkpoint for this step then
        if (
            state.step % t.checkpoint_every == 0
            or state.step == t.max_steps
            or state.stopped_early
            or state.best_step == state.step
        ):
            if tracker is not None:
                tracker.flush()  # the series up to this step is in the catalog before it
            if distributed.is_sharded(s.raw_model):  # each rank writes its shard
                ckpt.save_sharded(
                    ws.store, run_id, state.step, s.raw_model, s.optimizer, asdict(state), dist
                )
            elif dist.is_main:
                ckpt.save_checkpoint(
                    ws.store,
                    run_id,
                    state.step,
                    s.raw_model,
                    s.optimizer,
                    asdict(state),
                )
            if dist.is_main:
                ckpt.prune_checkpoints(ws.store, run_id, t.keep_last, {state.best_step})
            distributed.barrier(dist)
        if state.stopped_early:
            log.info(
                "early stopping at step %d: no improvement in %d evaluations",
                state.step,
                state.evals_without_improvement,
            )

    best_restored = state.stopped_early and state.best_step not in (-1, state.step)
    if best_restored:
        # restore the best weights: they are what early stopping is for
        best = ckpt.load_checkpoint(ws.store, ckpt.checkpoint_key(run_id, state.best_step))
        ckpt.restore(best, s.raw_model, s.optimizer)
    return TrainResult(
        run_id=run_id,
        steps=state.step,
        metrics=_summary(state, best_restored),
        stopped_early=state.stopped_early,
        history=state.history,
    )


def _forward_backward(
    s: Setup, t: TrainConfig, dist: distributed.Dist, micro_batches: Iterable[Any], autocast: Any
) -> tuple[torch.Tensor, int]:
    """One optimizer step's gradients: ``grad_accum`` micro-batches, each loss scaled so the
    accumulated gradient is the mean over them. The step's loss stays on the device (one
    host sync per step, in ``fit``); returns it and the number of tokens trained on."""
    import torch

    loss_sum, step_tokens = torch.zeros((), device=dist.device), 0
    for micro, batch in enumerate(micro_batches):
        sync = micro == t.grad_accum - 1 or not dist.enabled
        no_sync = getattr(s.model, "no_sync", None)
        with nullcontext() if sync or no_sync is None else no_sync(), autocast:
            loss, n_tokens = s.objective.loss(s.model, batch)
        (loss / t.grad_accum).backward()  # type: ignore[no-untyped-call]
        loss_sum += loss.detach().float() / t.grad_accum
        step_tokens += n_tokens
    return loss_sum, step_tokens


def _first_compiled_step(
    s: Setup, t: TrainConfig, dist: distributed.Dist, micro_batches: Iterable[Any], autocast: Any
) -> tuple[torch.Tensor, int]:
    """The first step of a compiled model, where ``torch.compile`` compiles: timed and
    logged. If it fails (no working C++ compiler, an unsupported op, …) the model falls back
    to eager and the step runs again on the same batches from the same RNG state, so the
    run is what an eager run would have been."""
    import torch

    batches = list(micro_batches)
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if dist.device.type == "cuda" else None
    t0 = time.perf_counter()
    try:
        out = _forward_backward(s, t, dist, batches, autocast)
    except Exception as exc:  # dynamo and inductor raise many kinds; eager re-raises real bugs
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        log.warning(
            "torch.compile failed at the first step (%s: %s); training eagerly instead "
            "(set train.compile: false to skip compiling)",
            type(exc).__name__,
            first_line,
        )
        s.model = decompiled(s.model) or s.model
        s.optimizer.zero_grad(set_to_none=True)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return _forward_backward(s, t, dist, batches, autocast)
    log.info("torch.compile: the first step (compiling) took %.1f s", time.perf_counter() - t0)
    return out


def _diverged(what: str, value: float, step: int) -> str:
    return (
        f"the {what} became {value} at step {step}; stopped. The last good checkpoint is "
        "kept: lower train.lr or enable train.grad_clip, then resume"
    )


def _summary(state: TrainState, best_restored: bool) -> dict[str, float]:
    """The run's figures: the last step's loss and throughput, and the validation loss of
    the weights it ends with (the best ones when early stopping restored them)."""
    out = {k: v for k, v in state.metrics.items() if k in ("loss", "val_loss", "tokens_per_s")}
    if best_restored:
        out["val_loss"] = state.best_val
    if math.isfinite(state.best_val):
        out["best_val_loss"] = state.best_val
    if "val_loss" in out:
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    return out


def evaluate_loss(s: Setup, batches: list[Any], autocast: Any) -> float:
    """Mean validation loss over fixed batches, in eval mode, without gradients.

    A compiled model is evaluated eagerly: eval mode without gradients would compile a
    second graph (seconds to minutes) for a handful of batches."""
    import torch

    model = eager_model(s.model)
    model.eval()
    total, count = 0.0, 0
    # regionally compiled layers (compile_model) run their eager forward here too
    with torch.no_grad(), autocast, torch.compiler.set_stance("force_eager"):
        for batch in batches:
            loss, n = s.objective.loss(model, batch)
            total += float(loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def finish(
    ws: Workspace,
    cfg: GenloopConfig,
    s: Setup,
    name: str,
    run_id: str,
    result: TrainResult,
    model: nn.Module | None = None,
    *,
    saved: Path | None = None,
) -> ModelVersionInfo:
    """Save the trained model (``model``, else ``s.raw_model``) in Hugging Face layout and
    register it as a version; ``saved``: a model directory already written (FSDP2's
    export, ``distributed.export_sharded``) to register as it is."""
    from genloop.models.family import get_family
    from genloop.workspace import registry

    model = s.raw_model if model is None else model
    if cfg.model.lora is not None:
        from genloop.models.lora import merge_lora

        model = merge_lora(model)  # the exported model is a plain checkpoint
    with ws.store.scratch() as tmp:
        out = tmp / "model" if saved is None else saved
        if saved is None:
            get_family(s.family).save(model, out, tokenizer_dir=s.tokenizer_dir)
        return registry.register_model(
            ws,
            name,
            s.family,
            out,
            run_id=run_id,
            dataset_version_id=s.dataset_version_id,
            parent=s.parent,
            config={
                "model": s.model_config,
                "base_model": cfg.model.base_model,  # as given: a model ref or a local dir
                "lora": cfg.model.lora.model_dump(mode="json") if cfg.model.lora else None,
                "train": cfg.train.model_dump(mode="json"),
            },
            metrics=result.metrics,
        )


def _find_resumable(ws: Workspace, name: str, resume: str | bool, *, required: bool) -> str | None:
    """The run to continue: ``resume`` is a run id, or True for the newest unfinished run
    of ``name`` (None when there is none and one is not ``required``); False: None."""
    from sqlalchemy import select

    from genloop.errors import NotFoundError
    from genloop.workspace.tables import Run

    if resume is False:
        return None
    with ws.catalog.session() as s:
        if isinstance(resume, str):
            run = s.get(Run, resume)
            if run is None:
                raise NotFoundError(f"no run {resume!r} to resume")
            if run.status == "completed":
                raise GenloopError(f"run {resume} already completed; there is nothing to resume")
            return run.id
        run = s.scalars(
            select(Run)
            .where(
                Run.name == name,
                Run.kind == "train",
                Run.status.in_(("running", "failed", "interrupted")),
            )
            .order_by(Run.started_at.desc())
            .limit(1)
        ).first()
        if run is None and required:
            raise GenloopError(f"no unfinished training run of {name!r} to resume")
        return None if run is None else run.id


def _broadcast_run_id(run_id: str | None, dist: distributed.Dist) -> str:
    if not dist.enabled:
        assert run_id is not None
        return run_id
    import torch.distributed as td

    box = [run_id]
    td.broadcast_object_list(box, src=0)  # a 32-char hex string from our own rank 0
    assert box[0] is not None
    return box[0]


def compute_dtype(precision: str, device: torch.device) -> str:
    """What ``train.precision`` trains in on ``device``: "bf16" (autocast) or "fp32".

    ``auto`` picks bf16 where the hardware runs it natively: a GPU that supports it, or a
    CPU with AVX512-BF16 or AMX (there it is 2-4× faster than fp32 for the matmuls; the
    weights, the optimizer and the loss stay in fp32).
    """
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so guarded
        native = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
        return "bf16" if native else "fp32"
    return "fp32"


def _autocast(precision: str, device: torch.device) -> Any:
    import torch

    if compute_dtype(precision, device) != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """The total gradient norm, as ``clip_grad_norm_`` computes it, without clipping."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _memory_mb(device: torch.device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

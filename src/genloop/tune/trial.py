"""One tuning worker, readable top to bottom: claim a trial, train it, tell the study.

    claim  → under the study's lock (so the total is exactly the budget, whatever the
             number of workers and machines): fail the trials whose worker died, count,
             ask Optuna for the next point (a queued one first: resumed, retried)
    train  → the config with the sampled values, as a run of kind "trial" linked to the
             study's run; each validation is reported to the pruner
    tell   → complete (its weights kept for the study's end), pruned or failed (dropped)

A trial that diverges, runs out of memory or raises is marked failed and the study goes
on. Ctrl-C marks the running trial interrupted (it does not count: ``--resume`` runs it
again); it is held while a trial is being claimed or told, so no trial is left half
recorded.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from genloop.config import GenloopConfig, TuneConfig, parse_config
from genloop.errors import ConfigError, GenloopError
from genloop.tune.space import make_distributions, make_pruner, make_sampler
from genloop.tune.storage import (
    CLAIM_LEASE_S,
    heartbeat,
    open_storage,
    study_lock,
    study_meta,
)
from genloop.workspace import runs
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

TrialEnd = Literal["complete", "pruned", "failed", "interrupted"]


@dataclass
class TrialOutcome:
    """How one trial ended (what ``progress`` receives)."""

    number: int
    state: TrialEnd
    params: dict[str, Any]
    value: float | None = None  # the metric; for a pruned trial its last reported value
    steps: int = 0  # optimizer steps trained
    run_id: str | None = None
    error: str | None = None
    worker: int = 0


@dataclass(frozen=True)
class Plan:
    """What every worker needs to run trials; plain data, so it crosses process spawns."""

    study: str
    run_id: str
    base: dict[str, Any]  # the config each trial starts from (dataset pinned, no tune)
    tune: TuneConfig
    model_name: str
    root: str | None  # where relative paths in the config start
    deadline: float | None  # time.time() after which no trial starts
    dataset_version_id: int | None
    git_commit: str | None


ProgressFn = Callable[[TrialOutcome], None]


def run_worker(ws: Workspace, plan: Plan, worker: int, progress: ProgressFn) -> None:
    """Claim and run trials until the budget is reached or the deadline has passed."""
    import optuna

    storage = open_storage(ws, heartbeat=True)
    probe = optuna.load_study(study_name=plan.study, storage=storage)
    budget = study_meta(probe, plan.study)["budget"]
    cfg = GenloopConfig.model_validate(plan.base)
    # a different seed per worker and per start, so no two draw the same points
    seed = (cfg.train.seed * 1_000_003 + worker * 7_919 + len(probe.trials)) % 2**31
    study = optuna.load_study(
        study_name=plan.study,
        storage=storage,
        sampler=make_sampler(plan.tune, seed, budget),
        pruner=make_pruner(plan.tune, cfg, budget),
    )
    distributions = make_distributions(plan.tune.space)
    while True:
        trial: optuna.Trial | None = None
        try:
            # Ctrl-C waits until the claimed trial is in hand, so it is never left running
            with sigint_deferred(), study_lock(ws, plan.study, lease_s=CLAIM_LEASE_S):
                trial = claim_trial(study, storage, plan, distributions)
            if trial is None:
                return
            with heartbeat(storage, trial):
                outcome = run_trial(ws, plan, study, trial, worker)
        except KeyboardInterrupt:
            pass  # recorded below, once the interrupted frames are gone
        else:
            progress(outcome)
            continue
        # Ctrl-C. The frames it cut short may hold a database statement open (and with it a
        # lock that our own writes would wait on): free them before recording the trial.
        with sigint_ignored():  # and a second Ctrl-C must not cut the bookkeeping short
            gc.collect()
            if trial is not None:
                _interrupted(ws, study, trial)
        raise KeyboardInterrupt


def claim_trial(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    plan: Plan,
    distributions: dict[str, optuna.distributions.BaseDistribution],
) -> optuna.Trial | None:
    """The next trial of the study, its parameters sampled; None once the budget is reached.

    Called under the study's lock: counting the trials and creating one is then a single
    step for every worker on every machine, so none is lost and none is one too many.
    """
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats outside study.optimize; experimental APIs
        optuna.storages.fail_stale_trials(study)  # crashed workers' trials: failed, queued again
        trials = study.get_trials(deepcopy=False)
        budget = study_meta(study, plan.study)["budget"]
        if counted(trials) >= budget:
            return None
        if plan.deadline is not None and time.time() >= plan.deadline:
            return None
        trial = study.ask(distributions)  # a queued trial first (resume, retry), else a new one
    storage.record_heartbeat(trial._trial_id)  # from now on, a silent death is seen
    return trial


def run_trial(
    ws: Workspace, plan: Plan, study: optuna.Study, trial: optuna.Trial, worker: int
) -> TrialOutcome:
    """Train one trial's config and tell the study how it ended (KeyboardInterrupt passes)."""
    import optuna

    from genloop.train.loop import StopRun, train

    metric = plan.tune.metric
    params = dict(trial.params)
    out = TrialOutcome(number=trial.number, state="failed", params=params, worker=worker)
    last_value: list[float] = []

    def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
        out.steps = step

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        if metric not in metrics:
            return  # the metric is not measured during training: no pruning
        last_value.append(metrics[metric])
        trial.report(metrics[metric], step)
        if step < max_steps and trial.should_prune():  # at the end, nothing left to save
            raise StopRun("pruned", f"pruned at step {step}: {metric} {metrics[metric]:.4g}")

    try:
        cfg = trial_config(plan.base, params, trial.number)
    except ConfigError as exc:  # values that do not fit together (n_embd % n_head …)
        cfg, out.error = None, f"invalid combination: {exc}"
    max_steps = cfg.train.max_steps if cfg is not None else 0  # on_eval reads it
    config = cfg.model_dump(mode="json") if cfg is not None else plan.base
    # the run and the trial's pointer to it together: a Ctrl-C between the two would leave a
    # run "running" that the interrupted trial cannot find to mark
    with sigint_deferred():
        out.run_id = start_trial_run(ws, plan, trial.number, config, error=out.error)
        trial.set_user_attr("run_id", out.run_id)
    result = None
    if cfg is not None:
        try:
            result = train(
                ws,
                cfg,
                resume=out.run_id,  # the run made above, linked to the study
                register=False,
                progress=on_step,
                on_eval=on_eval,
                root=Path(plan.root) if plan.root else None,
            )
        except StopRun as stop:
            out.state, out.error = "pruned", str(stop)
            out.value = last_value[-1] if last_value else None
        except Exception as exc:  # diverged, out of memory, a bug in a trial's config …
            if _after_ctrl_c(exc):  # train() could not record a Ctrl-C: still a Ctrl-C
                raise KeyboardInterrupt from None
            out.error = _describe(exc)
            log.warning("trial %d failed: %s", trial.number, out.error)
    # The outcome is known (and the run recorded as such): a Ctrl-C from here waits until
    # the study has it too, so a trial that finished is never marked interrupted.
    with sigint_deferred():
        if result is not None:
            out.value = result.metrics.get(metric)
            if out.value is None:  # the same for every trial: stop the study
                trial.set_user_attr("error", f"no metric {metric!r}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                hint = ""
                if "val_loss" not in result.metrics:
                    hint = "; no validation ran: is the dataset's validation split empty?"
                raise ConfigError(
                    f"tune.metric {metric!r} is not among the runs' metrics "
                    f"({', '.join(sorted(result.metrics))}){hint}"
                )
            if math.isfinite(out.value):
                out.state = "complete"
                trial.set_user_attr("checkpoint", weights_checkpoint(ws, out.run_id))
            else:
                out.error = f"{metric} is {out.value}"
        _tell(ws, study, trial, out)
    return out


def _tell(ws: Workspace, study: optuna.Study, trial: optuna.Trial, out: TrialOutcome) -> None:
    """Record a finished trial's outcome in the study; drop the weights of one that failed."""
    import optuna

    from genloop.train import checkpoint as ckpt

    trial.set_user_attr("steps", out.steps)
    if out.error:
        trial.set_user_attr("error", out.error[:1000])
    if out.state == "complete":
        study.tell(trial, out.value)
    elif out.state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if out.state != "complete" and out.run_id is not None:
        for _, key in ckpt.list_checkpoints(ws.store, out.run_id):
            ws.store.delete(key)  # no use for a pruned or failed trial's weights


def trial_config(base: dict[str, Any], params: Mapping[str, Any], number: int) -> GenloopConfig:
    """The study's config with one trial's values set (a ConfigError if they don't fit)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in params.items()]
    return parse_config(base, overrides, cls=GenloopConfig, source=f"trial {number}")


def _describe(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        gc.collect()
        torch.cuda.empty_cache()
        return "out of memory: " + str(exc).splitlines()[0]
    if isinstance(exc, GenloopError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _after_ctrl_c(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a Ctrl-C."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def _interrupted(ws: Workspace, study: optuna.Study, trial: optuna.Trial) -> None:
    """Ctrl-C during a trial: failed, marked interrupted (it does not count; --resume runs
    it again), its run marked interrupted if train() had not done so yet."""
    import optuna

    from genloop.train import checkpoint as ckpt

    try:
        trial.set_user_attr("interrupted", True)
    except optuna.exceptions.UpdateFinishedTrialError:  # it ended just before Ctrl-C
        return
    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    run_id = trial.user_attrs.get("run_id")
    if run_id:
        # the trial was not told yet, so however train() left the run (still running,
        # failed while handling the Ctrl-C, completed a moment before it), the trial runs
        # again: its run is the interrupted attempt
        runs.set_status(
            ws,
            run_id,
            "interrupted",
            error="interrupted",
            only_if=lambda status: status != "interrupted",
        )
        for _, key in ckpt.list_checkpoints(ws.store, run_id):
            ws.store.delete(key)  # the trial starts over when it runs again


def counted(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Trials that use up the budget: running and finished, less those that were
    interrupted or lost with their worker (they run again)."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(
        1
        for t in trials
        if t.state != TrialState.WAITING
        and not (
            t.state == TrialState.FAIL and (t.user_attrs.get("interrupted") or t.number in retried)
        )
    )


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives in the block until its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):  # the handler the Ctrl-C was meant for (it raises)
                previous(signal.SIGINT, None)
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def weights_checkpoint(ws: Workspace, run_id: str) -> str | None:
    """The checkpoint holding the weights a finished run ended with: its last, or the best
    one when early stopping restored it (as fit() does); the others are dropped."""
    from genloop.train import checkpoint as ckpt

    latest = ckpt.load_latest(ws.store, run_id)
    if latest is None:
        return None
    best = int(latest.state.get("best_step", -1))
    keep = latest.key
    if latest.state.get("stopped_early") and best not in (-1, latest.step):
        keep = ckpt.checkpoint_key(run_id, best)
    for _, key in ckpt.list_checkpoints(ws.store, run_id):
        if key != keep:
            ws.store.delete(key)
    return keep


def start_trial_run(
    ws: Workspace, plan: Plan, number: int, config: dict[str, Any], error: str | None = None
) -> str:
    """The trial's run, linked to the study; train() continues it (it has no checkpoint,
    so it starts at step 0)."""
    return runs.start_run(
        ws,
        name=plan.study,
        kind="trial",
        config=config,
        dataset_version_id=plan.dataset_version_id,
        study=plan.study,
        trial=number,
        parent_run_id=plan.run_id,
        git_commit=plan.git_commit,
        error=error,
    )

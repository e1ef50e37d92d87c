"""``genloop tune``: a hyperparameter study (Optuna), readable top to bottom.

    open   → the study in the catalog database: created, joined (the same command on
             another machine) or resumed; a run of kind "tune" stands for it in the catalog
    work   → W workers, each claiming trials until the budget is reached (``trial.py``:
             claim under the study's lock → train with the sampled values, reporting each
             validation to the pruner → record it complete, pruned or failed)
    finish → register the best trial's model from its checkpoint; store the report

Each trial is a run of kind "trial" (``runs.study``, ``runs.trial``, parent: the study's
run). Ctrl-C marks the running trials interrupted, and ``--resume`` runs them again before
going on.

The search space, sampler and pruner are in ``space.py``; the Optuna storage, heartbeats
and the study's lock in ``storage.py``; several worker processes on one machine (and
Ctrl-C across them) in ``workers.py``; the report's plots in ``report.py``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.config import NAME_PATTERN, GenloopConfig, TuneConfig
from genloop.errors import ConfigError, ConflictError, GenloopError, NotFoundError
from genloop.tune.space import check_space, grid_points, grid_size
from genloop.tune.storage import (
    CLAIM_LEASE_S,
    FINISH_LEASE_S,
    load_study,
    open_storage,
    study_lock,
    study_meta,
)
from genloop.tune.trial import (
    Plan,
    ProgressFn,
    counted,
    run_worker,
    trial_config,
)
from genloop.workspace import runs
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import optuna

    from genloop.workspace.registry import ModelVersionInfo

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    study: str
    run_id: str  # the study's run
    metric: str
    direction: str
    budget: int
    counts: dict[str, int]  # complete, pruned, failed, interrupted, running, waiting
    steps: int  # optimizer steps trained by all the study's trials
    finished: bool  # the budget is reached and no trial is running
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str | None = None
    model: ModelVersionInfo | None = None
    report: str | None = None  # artifact key of the report (report.html inside)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.ref if self.model else None
        return d


def tune(
    ws: Workspace,
    cfg: GenloopConfig,
    *,
    trials: int | None = None,
    workers: int | None = None,
    timeout_s: float | None = None,
    resume: bool = False,
    study_name: str | None = None,
    model_name: str | None = None,
    root: Path | None = None,
    enqueue: Sequence[Mapping[str, Any]] = (),
    progress: ProgressFn | None = None,
) -> TuneResult:
    """Run (or join, or resume) the study ``cfg.tune`` describes; returns its state at the end.

    ``trials``, ``workers`` and ``timeout_s`` override ``tune.trials``/``workers``/
    ``timeout_s``. A study that exists with the same config is joined (the same command
    on every machine); ``resume=True`` also runs again its interrupted trials, and is
    required once a study has used up its budget (``trials`` then extends it).
    ``enqueue``: parameter sets to try first, in order (a known baseline, say).
    """
    t = _tune_section(cfg)
    name = study_name or t.study_name or cfg.name
    if name is None:
        raise ConfigError("name the study: tune.study_name, the config's name, or --study-name")
    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(
            f"invalid study name {name!r}: use letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    n_workers = workers or t.workers
    if n_workers < 1 or (trials is not None and trials < 1):
        raise ConfigError("--trials and --workers must be at least 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GenloopError(
            "genloop tune runs its own worker processes; don't start it with torchrun"
        )
    check_space(t, enqueue)
    from genloop.workspace.refs import check_name

    model = check_name(model_name or cfg.name or name)
    timeout = timeout_s if timeout_s is not None else t.timeout_s

    # 1. the study: created (dataset prepared once and pinned), joined or resumed
    plan, requested = open_study(ws, cfg, t, name, model, trials, resume, root, enqueue)
    plan = replace(plan, deadline=time.time() + timeout if timeout else None)
    log.info("study %s: %d trials, %d workers", name, requested, n_workers)

    # 2. the workers: this process alone, or W spawned processes
    try:
        if n_workers == 1:
            run_worker(ws, plan, 0, progress or (lambda _: None))
        else:
            from genloop.tune.workers import run_workers

            run_workers(ws, plan, n_workers, progress or (lambda _: None))
    except KeyboardInterrupt:
        runs.set_status(ws, plan.run_id, "interrupted", error="interrupted by the user")
        raise
    except GenloopError as exc:  # one that every trial would meet (the metric is missing …)
        runs.set_status(ws, plan.run_id, "failed", error=str(exc))
        raise

    # 3. the best model and the report
    return finish(ws, plan)


# ---------------------------------------------------------------------------------------
# 1. the study
# ---------------------------------------------------------------------------------------


def open_study(
    ws: Workspace,
    cfg: GenloopConfig,
    t: TuneConfig,
    name: str,
    model_name: str,
    trials: int | None,
    resume: bool,
    root: Path | None,
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> tuple[Plan, int]:
    """Create, join or resume the study ``name``; returns the workers' plan and its budget."""
    import optuna

    storage = open_storage(ws)
    given = cfg.model_dump(mode="json")
    signature = _signature(given)
    existing = load_study(storage, name)
    base: dict[str, Any] | None = None
    dataset_version_id: int | None = None
    if existing is None:
        if resume:
            raise NotFoundError(f"no study named {name!r} to resume")
        base, dataset_version_id = pin_dataset(ws, cfg, root)
    with study_lock(ws, name, lease_s=CLAIM_LEASE_S):
        study = load_study(storage, name)  # another machine may have created it meanwhile
        if study is None:
            assert base is not None
            budget = min(trials or t.trials, grid_size(t) or math.inf)
            study = optuna.create_study(storage=storage, study_name=name, direction=t.direction)
            run_id = runs.start_run(
                ws,
                name=name,
                kind="tune",
                config={**base, "tune": given["tune"]},
                dataset_version_id=dataset_version_id,
                study=name,
            )
            study.set_user_attr(
                "genloop",
                {"signature": signature, "run_id": run_id, "budget": int(budget)},
            )
            if t.sampler == "grid":  # every point queued once, in a seeded random order
                points = grid_points(t)
                random.Random(cfg.train.seed).shuffle(points)  # noqa: S311 (not a secret)
                for point in points:
                    study.enqueue_trial(point)
        else:
            meta = study_meta(study, name)
            if meta["signature"] != signature:
                raise ConfigError(
                    f"study {name!r} was started from a different config (search space, "
                    "objective, sampler, pruner or training settings); give this one "
                    "another name with --study-name or tune.study_name"
                )
            run_id = meta["run_id"]
            try:
                run = runs.get_run(ws, run_id)
            except NotFoundError:
                raise NotFoundError(f"the run {run_id} of study {name!r} is gone") from None
            base = {k: v for k, v in run.config.items() if k != "tune"}
            dataset_version_id = run.dataset_version_id
            budget = trials or meta["budget"]
            budget = int(min(budget, grid_size(t) or math.inf))
            trials_now = study.get_trials(deepcopy=False)
            if resume:
                _requeue_interrupted(study, trials_now)
            elif counted(trials_now) >= budget:
                raise ConflictError(
                    f"study {name!r} already ran its {budget} trials; --resume with a larger "
                    "--trials extends it, --study-name starts another"
                )
            study.set_user_attr("genloop", {**meta, "budget": budget})
            runs.set_status(ws, run_id, "running")
        for params in enqueue:
            study.enqueue_trial(dict(params))
    plan = Plan(
        study=name,
        run_id=run_id,
        base=base,
        tune=t,
        model_name=model_name,
        root=str(root) if root is not None else None,
        deadline=None,
        dataset_version_id=dataset_version_id,
        git_commit=runs.git_commit(),
    )
    return plan, int(budget)


def pin_dataset(
    ws: Workspace, cfg: GenloopConfig, root: Path | None
) -> tuple[dict[str, Any], int | None]:
    """The config every trial starts from: the dataset prepared (or found) once and named by
    version, so all trials train on the same data whatever is prepared meanwhile."""
    from genloop.workspace.datasets import resolve_dataset

    if cfg.train.dataset is not None:
        dataset = resolve_dataset(ws, cfg.train.dataset)
    elif cfg.data is not None:
        from genloop.data.prepare import prepare_dataset

        dataset, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer, root=root)
    else:
        raise GenloopError("nothing to train on: set train.dataset or add a data section")
    base = cfg.model_dump(mode="json")
    base.pop("tune")
    base["train"]["dataset"] = dataset.ref
    base["train"]["resume"] = False
    return base, dataset.id


def _tune_section(cfg: GenloopConfig) -> TuneConfig:
    if cfg.tune is None:
        raise ConfigError("the config has no tune section: add tune.space (the search space)")
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: give at least one key to search")
    return cfg.tune


def _signature(given: dict[str, Any]) -> str:
    """What must match for a command to join a study: the config as given, less what may
    differ between the commands of one study (budget, workers, timeout, workspace)."""
    data = copy.deepcopy(given)
    data.pop("workspace", None)
    for key in ("trials", "workers", "timeout_s", "study_name"):
        (data.get("tune") or {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _requeue_interrupted(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


# ---------------------------------------------------------------------------------------
# 3. the end: the best model and the report
# ---------------------------------------------------------------------------------------


def finish(ws: Workspace, plan: Plan) -> TuneResult:
    """Register the best trial's model (once per best trial) and store the report."""
    import optuna
    from optuna.trial import TrialState

    from genloop.tune.report import write_report
    from genloop.workspace import registry

    study = optuna.load_study(study_name=plan.study, storage=open_storage(ws))
    with study_lock(ws, plan.study, lease_s=FINISH_LEASE_S):
        meta = study_meta(study, plan.study)
        trials = study.get_trials(deepcopy=False)
        counts = _counts(trials)
        finished = counted(trials) >= meta["budget"] and counts["running"] == 0
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        model: ModelVersionInfo | None = None
        if best is not None and meta.get("registered_trial") == best.number:
            with contextlib.suppress(NotFoundError):
                model = registry.resolve(ws, meta["model"])
        elif best is not None and counts["running"] == 0:
            # the last worker out registers (trials still running elsewhere may do better)
            model = register_trial(ws, plan, best)
            meta = {**meta, "registered_trial": best.number, "model": model.ref}
            study.set_user_attr("genloop", meta)
            _drop_other_weights(ws, complete, keep=best)
        report = write_report(
            ws, study, f"runs/{plan.run_id}/report", metric=plan.tune.metric, model=model
        )
        steps = sum(int(t.user_attrs.get("steps", 0)) for t in trials)
        result = TuneResult(
            study=plan.study,
            run_id=plan.run_id,
            metric=plan.tune.metric,
            direction=plan.tune.direction,
            budget=int(meta["budget"]),
            counts=counts,
            steps=steps,
            finished=finished,
            best_trial=best.number if best else None,
            best_value=best.value if best else None,
            best_params=dict(best.params) if best else {},
            best_run_id=best.user_attrs.get("run_id") if best else None,
            model=model,
            report=report,
        )
        summary = {
            "best_trial": result.best_trial,
            "best_value": result.best_value,
            "best_params": result.best_params,
            "model": model.ref if model else None,
            "report": report,
            "trials": counts,
            "steps": steps,
        }
        if counts["running"]:
            runs.set_status(ws, plan.run_id, "running", summary=summary)  # other workers go on
        elif finished and best is None:
            runs.set_status(ws, plan.run_id, "failed", summary=summary, error="no trial completed")
        elif finished:
            runs.set_status(ws, plan.run_id, "completed", summary=summary)
        else:
            runs.set_status(ws, plan.run_id, "stopped", summary=summary, error="timeout")
    if finished and best is None:
        errors = [t.user_attrs["error"] for t in trials if t.user_attrs.get("error")]
        first = f" (first error: {errors[0]})" if errors else ""
        raise GenloopError(
            f"no trial of study {plan.study!r} completed: {counts['failed']} failed, "
            f"{counts['pruned']} pruned{first}"
        )
    return result


def register_trial(ws: Workspace, plan: Plan, trial: optuna.trial.FrozenTrial) -> ModelVersionInfo:
    """Register the weights a finished trial ended with (its checkpoint), as train() would
    have: same export, same lineage (the trial's run), no retraining."""
    from genloop.train import checkpoint as ckpt
    from genloop.train import distributed, loop

    key, run_id = trial.user_attrs.get("checkpoint"), trial.user_attrs["run_id"]
    if not key:
        raise GenloopError(f"trial {trial.number} kept no checkpoint to register")
    found = ckpt.load_checkpoint(ws.store, key)
    cfg = trial_config(plan.base, trial.params, trial.number)
    try:
        summary = runs.get_run(ws, run_id).summary
    except NotFoundError:
        summary = {}
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
    dist = distributed.setup(cfg.train.device)
    try:
        setup = loop.setup(ws, cfg, dist, root=Path(plan.root) if plan.root else None)
        ckpt.restore(found, setup.raw_model, setup.optimizer)
        result = loop.TrainResult(run_id=run_id, steps=found.step, metrics=metrics)
        return loop.finish(ws, cfg, setup, plan.model_name, run_id, result)
    finally:
        distributed.teardown(dist)


def _drop_other_weights(
    ws: Workspace, complete: list[optuna.trial.FrozenTrial], keep: optuna.trial.FrozenTrial
) -> None:
    """Once the best trial's model is registered, the other trials' weights are not needed."""
    for t in complete:
        key = t.user_attrs.get("checkpoint")
        if t.number != keep.number and key:
            ws.store.delete(key)


def _counts(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, int]:
    from optuna.trial import TrialState

    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    counts = dict.fromkeys((*names.values(), "interrupted"), 0)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and (t.user_attrs.get("interrupted") or t.number in retried):
            counts["interrupted"] += 1
        else:
            counts[names[t.state]] += 1
    return counts

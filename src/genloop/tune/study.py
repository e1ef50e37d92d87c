"""``genloop tune``: a hyperparameter study (Optuna), readable top to bottom.

    open   → the study in the catalog database: created, joined (the same command on
             another machine) or resumed; a run of kind "tune" stands for it in the catalog
    work   → W worker processes, each in a loop: claim the next trial under the study's
             lock (so the total is exactly the budget, whatever the number of workers and
             machines) → train the config with the sampled values, reporting each
             validation to the pruner → record it complete, pruned or failed
    finish → register the best trial's model from its checkpoint; store the report

Each trial is a run of kind "trial" (``runs.study``, ``runs.trial``, parent: the study's
run). A trial that diverges, runs out of memory or raises is marked failed and the study
goes on; Ctrl-C marks the running trials interrupted, and ``--resume`` runs them again
before going on. A worker that dies without a word (SIGKILL, a lost machine) stops its
trial's heartbeat; the next claim fails that trial and queues it again.

The worker processes (several on one machine, and Ctrl-C across them) are in
``workers.py``; the report's plots in ``report.py``.

Optuna keeps its tables in the catalog's database, apart from genloop's so the two
schema migrations never meet: PostgreSQL schema ``optuna`` (workers on other machines
share it), or for a SQLite catalog the file ``<catalog>.studies.db`` beside it (both
use a table named ``alembic_version``, which one SQLite file cannot hold twice).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from genloop.config import (
    NAME_PATTERN,
    CategoricalParam,
    FloatParam,
    GenloopConfig,
    IntParam,
    ParamSpec,
    TuneConfig,
    parse_config,
)
from genloop.errors import ConfigError, ConflictError, GenloopError, NotFoundError, WorkspaceError
from genloop.workspace.tables import Lock, Run, utcnow
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    import optuna

    from genloop.workspace.registry import ModelVersionInfo

log = logging.getLogger(__name__)

OPTUNA_SCHEMA = "optuna"  # PostgreSQL schema holding Optuna's tables
HEARTBEAT_S = 10  # a running trial's worker says it is alive this often …
GRACE_S = 120  # … and its trial is failed (and queued again) after this long without
CLAIM_LEASE_S = 120.0  # the study lock while claiming a trial (a crashed holder frees it)
FINISH_LEASE_S = 1800.0  # … while registering the best model and writing the report
# keys a trial may not change: the dataset is prepared once and pinned for the study
FROZEN_PREFIXES = ("data.", "workspace.", "tune.", "name")

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
    _check_space(t, enqueue)
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
        _set_run(ws, plan.run_id, "interrupted", error="interrupted by the user")
        raise
    except GenloopError as exc:  # one that every trial would meet (the metric is missing …)
        _set_run(ws, plan.run_id, "failed", error=str(exc))
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

    from genloop.train.tracking import git_commit

    storage = open_storage(ws)
    given = cfg.model_dump(mode="json")
    signature = _signature(given)
    existing = _load(storage, name)
    base: dict[str, Any] | None = None
    dataset_version_id: int | None = None
    if existing is None:
        if resume:
            raise NotFoundError(f"no study named {name!r} to resume")
        base, dataset_version_id = pin_dataset(ws, cfg, root)
    with study_lock(ws, name, lease_s=CLAIM_LEASE_S):
        study = _load(storage, name)  # another machine may have created it meanwhile
        if study is None:
            assert base is not None
            budget = min(trials or t.trials, _grid_size(t) or math.inf)
            study = optuna.create_study(storage=storage, study_name=name, direction=t.direction)
            run_id = _start_run(
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
                points = _grid_points(t)
                random.Random(cfg.train.seed).shuffle(points)  # noqa: S311 (not a secret)
                for point in points:
                    study.enqueue_trial(point)
        else:
            meta = _meta(study, name)
            if meta["signature"] != signature:
                raise ConfigError(
                    f"study {name!r} was started from a different config (search space, "
                    "objective, sampler, pruner or training settings); give this one "
                    "another name with --study-name or tune.study_name"
                )
            run_id = meta["run_id"]
            with ws.catalog.session() as s:
                row = s.get(Run, run_id)
                if row is None:
                    raise NotFoundError(f"the run {run_id} of study {name!r} is gone")
                base = {k: v for k, v in row.config.items() if k != "tune"}
                dataset_version_id = row.dataset_version_id
            budget = trials or meta["budget"]
            budget = int(min(budget, _grid_size(t) or math.inf))
            trials_now = study.get_trials(deepcopy=False)
            if resume:
                _requeue_interrupted(study, trials_now)
            elif _counted(trials_now) >= budget:
                raise ConflictError(
                    f"study {name!r} already ran its {budget} trials; --resume with a larger "
                    "--trials extends it, --study-name starts another"
                )
            study.set_user_attr("genloop", {**meta, "budget": budget})
            _set_run(ws, run_id, "running")
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
        git_commit=git_commit(),
    )
    return plan, int(budget)


def open_storage(ws: Workspace, *, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's storage for this workspace's catalog (see the module docstring for where)."""
    import optuna
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = make_url(ws.catalog.url)
    engine_kwargs: dict[str, Any]
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise WorkspaceError("tuning needs a catalog in a file or in PostgreSQL")
        catalog = Path(url.database)
        studies = catalog.with_name(f"{catalog.stem}.studies.db")
        storage_url = f"sqlite:///{studies}"
        engine_kwargs = {"connect_args": {"timeout": 60, "check_same_thread": False}}
    elif url.get_backend_name() == "postgresql":
        with contextlib.suppress(Exception), ws.catalog.engine.begin() as conn:
            # two machines creating it at once: one of them loses the race, harmlessly
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
        storage_url = url.render_as_string(hide_password=False)
        engine_kwargs = {
            "connect_args": {"options": f"-c search_path={OPTUNA_SCHEMA}"},
            "pool_pre_ping": True,
        }
    else:
        raise WorkspaceError(
            f"tuning needs a SQLite or PostgreSQL catalog, not {url.get_backend_name()}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            storage_url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_S if heartbeat else None,
            grace_period=GRACE_S if heartbeat else None,
            heartbeat_stale_trial_callback=(
                functools.partial(_retry_stale, ws) if heartbeat else None
            ),
        )
    if url.get_backend_name() == "sqlite":  # readers never block the workers' writes
        with storage.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return storage


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


def _check_space(t: TuneConfig, enqueue: Sequence[Mapping[str, Any]]) -> None:
    for key in t.space:
        frozen = key.startswith(FROZEN_PREFIXES) or (
            key.startswith("tokenizer.") and key != "tokenizer.seq_len"
        )
        if frozen:
            raise ConfigError(
                f"tune.space key {key!r} cannot vary between trials: the dataset (data, "
                "tokenizer) is prepared once for the whole study"
            )
    if t.sampler == "grid":
        _grid(t)  # a float without a step is an error there
    if t.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise GenloopError("tune.sampler 'cmaes' needs the cmaes package (pip install cmaes)")
    for params in enqueue:
        unknown = sorted(set(params) - set(t.space))
        if unknown:
            raise ConfigError(
                f"enqueued parameter {unknown[0]!r} is not in tune.space "
                f"(keys: {', '.join(t.space)})"
            )


def _signature(given: dict[str, Any]) -> str:
    """What must match for a command to join a study: the config as given, less what may
    differ between the commands of one study (budget, workers, timeout, workspace)."""
    data = copy.deepcopy(given)
    data.pop("workspace", None)
    for key in ("trials", "workers", "timeout_s", "study_name"):
        (data.get("tune") or {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _load(storage: optuna.storages.RDBStorage, name: str) -> optuna.Study | None:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _meta(study: optuna.Study, name: str) -> dict[str, Any]:
    meta = study.user_attrs.get("genloop")
    if not isinstance(meta, dict):
        raise ConflictError(f"study {name!r} exists but was not made by genloop tune")
    return meta


# ---------------------------------------------------------------------------------------
# 2. the workers
# ---------------------------------------------------------------------------------------


def run_worker(ws: Workspace, plan: Plan, worker: int, progress: ProgressFn) -> None:
    """Claim and run trials until the budget is reached or the deadline has passed."""
    import optuna

    storage = open_storage(ws, heartbeat=True)
    probe = optuna.load_study(study_name=plan.study, storage=storage)
    budget = _meta(probe, plan.study)["budget"]
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
            with _sigint_deferred(), study_lock(ws, plan.study, lease_s=CLAIM_LEASE_S):
                trial = claim_trial(study, storage, plan, distributions)
            if trial is None:
                return
            with _heartbeat(storage, trial):
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
        budget = _meta(study, plan.study)["budget"]
        if _counted(trials) >= budget:
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
    out.run_id = _start_trial_run(ws, plan, trial.number, config, error=out.error)
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
    with _sigint_deferred():
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
                trial.set_user_attr("checkpoint", _weights_checkpoint(ws, out.run_id))
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
        with ws.catalog.session() as s:
            row = s.get(Run, run_id)
            # the trial was not told yet, so however train() left the run (still running,
            # failed while handling the Ctrl-C, completed a moment before it), the trial
            # runs again: its run is the interrupted attempt
            if row is not None and row.status != "interrupted":
                row.status, row.error, row.ended_at = "interrupted", "interrupted", utcnow()
        for _, key in ckpt.list_checkpoints(ws.store, run_id):
            ws.store.delete(key)  # the trial starts over when it runs again


def _retry_stale(ws: Workspace, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat): its run failed, the trial queued again."""
    from genloop.train import checkpoint as ckpt

    log.warning("trial %d lost its worker (no heartbeat); it runs again", trial.number)
    run_id = trial.user_attrs.get("run_id")
    if run_id:
        with ws.catalog.session() as s:
            row = s.get(Run, run_id)
            if row is not None and row.status == "running":
                row.status, row.ended_at = "failed", utcnow()
                row.error = "its worker stopped without a word (no heartbeat)"
        for _, key in ckpt.list_checkpoints(ws.store, run_id):
            ws.store.delete(key)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _requeue_interrupted(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _counted(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
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
def _heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat every HEARTBEAT_S seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next
                storage.record_heartbeat(trial._trial_id)

    thread = threading.Thread(target=beat, name=f"tune-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------
# samplers, pruners and the search space
# ---------------------------------------------------------------------------------------


def make_sampler(t: TuneConfig, seed: int, budget: int) -> optuna.samplers.BaseSampler:
    import optuna

    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "grid":  # the points are queued when the study is made (_grid_points)
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # TPE: a few random trials first (a quarter of the budget, 2 to 10), then the model;
    # the constant liar keeps parallel workers from sampling the same point
    startup = min(10, max(2, budget // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def make_pruner(t: TuneConfig, cfg: GenloopConfig, budget: int) -> optuna.pruners.BasePruner:
    """The pruner, in the unit the trials report: optimizer steps (one report per
    validation, every ``train.eval_every`` steps)."""
    import optuna

    every, steps = cfg.train.eval_every, cfg.train.max_steps
    if t.pruner == "none":
        return optuna.pruners.NopPruner()
    if t.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=every, reduction_factor=3)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=every, max_resource=max(steps, every), reduction_factor=3
        )
    # median: once a few trials have finished (a quarter of the budget, 1 to 5), stop a
    # trial whose value at a validation is worse than the median of the others' there
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(1, budget // 4)))


def make_distributions(
    space: Mapping[str, ParamSpec],
) -> dict[str, optuna.distributions.BaseDistribution]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, spec in space.items():
        if isinstance(spec, FloatParam):
            out[key] = FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        elif isinstance(spec, IntParam):
            out[key] = IntDistribution(spec.low, spec.high, log=spec.log, step=spec.step)
        else:
            out[key] = CategoricalDistribution(spec.choices)
    return out


def _grid(t: TuneConfig) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for key, spec in t.space.items():
        if isinstance(spec, CategoricalParam):
            grid[key] = list(spec.choices)
        elif isinstance(spec, IntParam):
            grid[key] = list(range(spec.low, spec.high + 1, spec.step))
        elif spec.step is not None:
            n = math.floor((spec.high - spec.low) / spec.step + 1e-9) + 1
            grid[key] = [round(spec.low + i * spec.step, 12) for i in range(n)]
        else:
            raise ConfigError(
                f"the grid sampler needs a step for float parameter {key!r} "
                "(or make it categorical)"
            )
    return grid


def _grid_points(t: TuneConfig) -> list[dict[str, Any]]:
    grid = _grid(t)
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _grid_size(t: TuneConfig) -> int | None:
    if t.sampler != "grid":
        return None
    return math.prod(len(v) for v in _grid(t).values())


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
        meta = _meta(study, plan.study)
        trials = study.get_trials(deepcopy=False)
        counts = _counts(trials)
        finished = _counted(trials) >= meta["budget"] and counts["running"] == 0
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
            _set_run(ws, plan.run_id, "running", summary=summary)  # other workers go on
        elif finished and best is None:
            _set_run(ws, plan.run_id, "failed", summary=summary, error="no trial completed")
        elif finished:
            _set_run(ws, plan.run_id, "completed", summary=summary)
        else:
            _set_run(ws, plan.run_id, "stopped", summary=summary, error="timeout")
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
    with ws.catalog.session() as s:
        row = s.get(Run, run_id)
        summary = dict(row.summary or {}) if row is not None else {}
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
    dist = distributed.setup(cfg.train.device)
    try:
        setup = loop.setup(ws, cfg, dist, root=Path(plan.root) if plan.root else None)
        ckpt.restore(found, setup.raw_model, setup.optimizer)
        result = loop.TrainResult(run_id=run_id, steps=found.step, metrics=metrics)
        return loop.finish(ws, cfg, setup, plan.model_name, run_id, result)
    finally:
        distributed.teardown(dist)


def _weights_checkpoint(ws: Workspace, run_id: str) -> str | None:
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


# ---------------------------------------------------------------------------------------
# catalog rows and the study lock
# ---------------------------------------------------------------------------------------


def _start_run(
    ws: Workspace,
    *,
    name: str,
    kind: str,
    config: dict[str, Any],
    dataset_version_id: int | None,
    study: str,
    trial: int | None = None,
    parent_run_id: str | None = None,
    git_commit: str | None = None,
    error: str | None = None,
) -> str:
    run_id = uuid.uuid4().hex
    now = utcnow()
    with ws.catalog.session() as s:
        s.add(
            Run(
                id=run_id,
                name=name,
                kind=kind,
                status="failed" if error else "running",
                config=config,
                dataset_version_id=dataset_version_id,
                parent_run_id=parent_run_id,
                study=study,
                trial=trial,
                git_commit=git_commit,
                error=error,
                started_at=now,
                heartbeat_at=now,
                ended_at=now if error else None,
            )
        )
    return run_id


def _start_trial_run(
    ws: Workspace, plan: Plan, number: int, config: dict[str, Any], error: str | None = None
) -> str:
    """The trial's run, linked to the study; train() continues it (it has no checkpoint,
    so it starts at step 0)."""
    return _start_run(
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


def _set_run(
    ws: Workspace,
    run_id: str,
    status: str,
    *,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    with ws.catalog.session() as s:
        row = s.get(Run, run_id)
        if row is None:
            return
        row.status, row.error = status, error
        row.ended_at = None if status == "running" else utcnow()
        if summary is not None:
            row.summary = summary


@contextlib.contextmanager
def study_lock(ws: Workspace, study: str, *, lease_s: float) -> Iterator[None]:
    """The study's lock in the catalog (a ``locks`` row), shared by every worker on every
    machine; a holder that dies frees it when its lease runs out."""
    from sqlalchemy import delete
    from sqlalchemy.exc import IntegrityError as DBIntegrityError

    name = (
        f"tune:{study}"
        if len(study) <= 120
        else f"tune:{hashlib.sha256(study.encode()).hexdigest()}"
    )
    owner = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    waited = time.monotonic()
    while True:
        now = utcnow()
        try:
            with ws.catalog.session() as s:
                s.execute(delete(Lock).where(Lock.name == name, Lock.expires_at < now))
                s.add(
                    Lock(
                        name=name,
                        owner=owner,
                        acquired_at=now,
                        expires_at=now + timedelta(seconds=lease_s),
                    )
                )
            break
        except DBIntegrityError:
            if time.monotonic() - waited > FINISH_LEASE_S:
                raise ConflictError(
                    f"study {study!r} stays locked by another worker; if none is running, "
                    "wait for its lease to run out"
                ) from None
            time.sleep(random.uniform(0.02, 0.1))  # noqa: S311 (jitter, not a secret)
    try:
        yield
    finally:
        with ws.catalog.session() as s:
            s.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))

"""``genloop run``: data → train (or tune) → eval → optimize → register → gate → deploy.

One pipeline run is one ``runs`` row (kind ``pipeline``): its summary records, per stage,
the hash of the stage's inputs (its config sections and the outputs of the stages before
it), what the stage produced and how long it took. That record is the run's lineage and
the stages' cache: a stage whose input hash matches a finished stage of an earlier run of
the same pipeline, and whose outputs still exist, is skipped and says so. A failing stage
marks the run failed naming the stage; ``--from STAGE`` starts there, taking the earlier
stages' outputs from the newest run that has them.

Each stage is a plain function ``(Context) -> outputs``; the main flow is
:func:`run_pipeline`, read top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genloop.config import GenloopConfig
from genloop.errors import ConfigError, GenloopError, NotFoundError
from genloop.workspace import Workspace, registry, runs

log = logging.getLogger(__name__)

STAGES = ("data", "train", "eval", "optimize", "register", "gate", "deploy")
FORMAT = 1  # bump when a stage's meaning changes, to invalidate old cache entries

StageStatus = str  # "ran" | "cached" | "skipped" (nothing to do for this config)
Report = Callable[["StageOutcome"], None]


class StageFailed(GenloopError):
    """A stage raised; the message names it and how to resume."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        what = str(cause) if isinstance(cause, GenloopError) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"stage '{stage}' failed: {what} (fix it, then resume with: genloop run … --from "
            f"{stage})"
        )
        self.stage = stage
        if isinstance(cause, GenloopError):
            self.exit_code = cause.exit_code


@dataclass
class StageOutcome:
    stage: str
    status: StageStatus
    input_hash: str
    outputs: dict[str, Any]
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class AlreadyDone:
    """What a stage's inputs function returns when the catalog already has its result."""

    outputs: dict[str, Any]
    note: str


@dataclass
class Context:
    """What the stages share: the workspace, the config and the earlier stages' outputs."""

    ws: Workspace
    cfg: GenloopConfig
    name: str
    root: Path | None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None

    def out(self, stage: str, key: str) -> Any:
        try:
            return self.outputs[stage][key]
        except KeyError:
            raise GenloopError(f"stage {stage!r} has no output {key!r}") from None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


@dataclass
class PipelineResult:
    run_id: str
    name: str
    stages: list[StageOutcome]

    @property
    def model(self) -> str | None:
        for o in reversed(self.stages):
            if "model" in o.outputs:
                return str(o.outputs["model"])
        return None


# ---------------------------------------------------------------------------- main flow


def run_pipeline(
    ws: Workspace,
    cfg: GenloopConfig,
    *,
    root: Path | None = None,
    start: str | None = None,
    stop: str | None = None,
    report: Report | None = None,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run the stages from ``start`` to ``stop`` (default: all), skipping cached ones."""
    name = cfg.name or (cfg.data.name if cfg.data else None)
    if name is None:
        raise ConfigError("a pipeline needs a name (top-level 'name:' or data.name)")
    chosen = _chosen_stages(start, stop)
    ctx = Context(ws=ws, cfg=cfg, name=name, root=root, progress=progress)

    # 1. earlier stages' outputs (for --from): from the newest run that finished them
    for stage in STAGES[: STAGES.index(chosen[0])]:
        found = _newest_done(ws, name, stage)
        if found is None:
            raise NotFoundError(
                f"--from {chosen[0]}: no earlier run of pipeline {name!r} finished stage "
                f"{stage!r}; run the pipeline from the start first"
            )
        ctx.outputs[stage] = found["outputs"]

    # 2. the run record: the pipeline's lineage and cache
    run_id = _start_run(ws, name, cfg)
    outcomes: list[StageOutcome] = []
    try:
        for stage in chosen:
            outcome = _run_stage(ctx, stage)
            outcomes.append(outcome)
            ctx.outputs[stage] = outcome.outputs
            _record(ws, run_id, outcome)
            if report is not None:
                report(outcome)
    except StageFailed as exc:
        _finish(ws, run_id, "failed", error=str(exc), failed_stage=exc.stage)
        raise
    except KeyboardInterrupt:
        _finish(ws, run_id, "interrupted", error="interrupted by the user")
        raise
    _finish(ws, run_id, "completed")
    return PipelineResult(run_id=run_id, name=name, stages=outcomes)


def _run_stage(ctx: Context, stage: str) -> StageOutcome:
    inputs_fn, run_fn = STAGE_FUNCTIONS[stage]
    started = time.perf_counter()
    try:
        inputs = inputs_fn(ctx)
        if inputs is None:  # this config has nothing for the stage to do
            return StageOutcome(stage, "skipped", "", _passthrough(ctx, stage), 0.0)
        if isinstance(inputs, AlreadyDone):
            return StageOutcome(stage, "cached", "", inputs.outputs, 0.0, inputs.note)
        digest = _hash(stage, inputs)
        cached = _cached(ctx, stage, digest)
        if cached is not None:
            return StageOutcome(stage, "cached", digest, cached, 0.0, "unchanged inputs")
        ctx.say(f"{stage}: running")
        outputs, note = run_fn(ctx)
    except StageFailed:
        raise
    except (GenloopError, Exception) as exc:
        log.debug("stage %s failed", stage, exc_info=True)
        raise StageFailed(stage, exc) from exc
    return StageOutcome(stage, "ran", digest, outputs, time.perf_counter() - started, note)


# ------------------------------------------------------------------------------ stages
# Each stage: inputs(ctx) -> dict hashed for the cache (None: nothing to do), and
# run(ctx) -> (outputs, note). Outputs are plain JSON values (refs, ids, metrics).


def data_inputs(ctx: Context) -> dict[str, Any]:
    if ctx.cfg.data is None:
        if ctx.cfg.train.dataset is None:
            raise ConfigError("the data stage needs a data section or train.dataset")
        return {"dataset": ctx.cfg.train.dataset, "always": time.time_ns()}  # resolve anew
    from genloop.data.prepare import dataset_digest

    # the data module's own input hash: the config and the sources' contents
    return {"digest": dataset_digest(ctx.cfg.data, ctx.cfg.tokenizer, root=ctx.root)}


def data_run(ctx: Context) -> tuple[dict[str, Any], str]:
    from genloop.workspace.datasets import resolve_dataset

    if ctx.cfg.data is None:
        assert ctx.cfg.train.dataset is not None
        info = resolve_dataset(ctx.ws, ctx.cfg.train.dataset)
        return {"dataset": info.ref, "dataset_version_id": info.id}, "named dataset"
    from genloop.data.prepare import prepare_dataset

    info, created = prepare_dataset(ctx.ws, ctx.cfg.data, ctx.cfg.tokenizer, root=ctx.root)
    note = "built" if created else "unchanged sources and config: reused"
    return {"dataset": info.ref, "dataset_version_id": info.id}, note


def train_inputs(ctx: Context) -> dict[str, Any]:
    c = ctx.cfg
    return {
        "dataset_version_id": ctx.out("data", "dataset_version_id"),
        "model": c.model.model_dump(mode="json"),
        "train": c.train.model_dump(mode="json", exclude={"dataset", "resume", "log_to"}),
        "seq_len": c.tokenizer.seq_len,
        "tune": c.tune.model_dump(mode="json") if c.tune is not None else None,
        "name": ctx.name,
    }


def train_run(ctx: Context) -> tuple[dict[str, Any], str]:
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.train.dataset = ctx.out("data", "dataset")  # trained on exactly this version
    if cfg.tune is not None:
        from genloop.tune.study import tune

        study = tune(ctx.ws, cfg, root=ctx.root, model_name=ctx.name, resume=True)
        if study.model is None:
            raise GenloopError(f"study {study.study} finished without a successful trial")
        return {"model": study.model.ref, "study": study.study}, f"best of {study.counts}"
    from genloop.train.loop import train

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step == total or step % max(1, total // 10) == 0:
            ctx.say(f"train: step {step}/{total} loss {metrics.get('loss', float('nan')):.3f}")

    result = train(ctx.ws, cfg, model_name=ctx.name, progress=progress, root=ctx.root)
    assert result.model is not None
    return {"model": result.model.ref, "run_id": result.run_id, **_metrics(result.metrics)}, ""


def eval_inputs(ctx: Context) -> dict[str, Any] | AlreadyDone | None:
    if not ctx.cfg.eval.suites:
        return None
    return {
        "model": ctx.out("train", "model"),
        "dataset": ctx.out("data", "dataset"),
        "eval": ctx.cfg.eval.model_dump(mode="json"),
    }


def eval_run(ctx: Context) -> tuple[dict[str, Any], str]:
    record = _evaluate(ctx, ctx.out("train", "model"))
    return {"model": ctx.out("train", "model"), "evaluation_id": record.id}, ""


def optimize_inputs(ctx: Context) -> dict[str, Any] | AlreadyDone | None:
    if ctx.cfg.optimize is None:
        return None
    return {
        "model": ctx.out("train", "model"),
        "optimize": ctx.cfg.optimize.model_dump(mode="json"),
    }


def optimize_run(ctx: Context) -> tuple[dict[str, Any], str]:
    from genloop.optimize.run import optimize_model

    assert ctx.cfg.optimize is not None
    opt = ctx.cfg.optimize.model_copy(update={"promote": False})  # deploy promotes
    result = optimize_model(ctx.ws, ctx.out("train", "model"), opt)
    variants = [v.ref for v in result.variants]
    chosen = result.picked if result.picked is not None else variants[-1]
    return {"model": chosen, "variants": variants}, f"{len(variants)} variant(s)"


def register_inputs(ctx: Context) -> dict[str, Any]:
    return {"model": _candidate(ctx), "dataset": ctx.out("data", "dataset")}


def register_run(ctx: Context) -> tuple[dict[str, Any], str]:
    """The release candidate: evaluated on the pipeline's dataset and tagged @candidate."""
    model = _candidate(ctx)
    if ctx.cfg.eval.suites and model != ctx.outputs.get("eval", {}).get("model"):
        _evaluate(ctx, model)  # an optimized variant is judged on its own numbers
    info = registry.promote(ctx.ws, model, "candidate", actor="pipeline", reason=ctx.name)
    return {"model": info.ref}, "tagged @candidate"


def gate_inputs(ctx: Context) -> dict[str, Any] | AlreadyDone:
    production = _production(ctx)
    model = ctx.out("register", "model")
    if production == model:
        return AlreadyDone({"model": model, "passed": True}, "already in production")
    return {
        "model": ctx.out("register", "model"),
        "against": production,
        "rules": [r.model_dump(mode="json") for r in ctx.cfg.gate.rules],
    }


def gate_run(ctx: Context) -> tuple[dict[str, Any], str]:
    from genloop.evaluate.gate import gate

    model = ctx.out("register", "model")
    against = _production(ctx)
    rules = list(ctx.cfg.gate.rules)
    if against is None and not rules:
        return {"model": model, "passed": True}, "first release: nothing to compare with"
    if against is not None and ctx.cfg.eval.suites:
        _ensure_evaluated(ctx, against)  # the gate compares on the same dataset version
    result = gate(ctx.ws, model, against, rules or None)
    if not result.passed:
        failed = "; ".join(c.message for c in result.checks if not c.passed)
        raise GenloopError(f"the gate blocked {model}: {failed}")
    return {"model": model, "passed": True, "against": against}, "passed"


def deploy_inputs(ctx: Context) -> dict[str, Any] | AlreadyDone:
    model = ctx.out("gate", "model")
    production = _production(ctx)
    if production == model:
        return AlreadyDone({"model": model}, f"{model} is already {ctx.name}@production")
    return {"model": model, "production": production}


def deploy_run(ctx: Context) -> tuple[dict[str, Any], str]:
    model = ctx.out("gate", "model")
    info = registry.promote(ctx.ws, model, "production", actor="pipeline", reason=ctx.name)
    return {"model": info.ref}, f"{ctx.name}@production → version {info.version}"


STAGE_FUNCTIONS: dict[
    str,
    tuple[
        Callable[[Context], dict[str, Any] | AlreadyDone | None],
        Callable[[Context], tuple[dict[str, Any], str]],
    ],
] = {
    "data": (data_inputs, data_run),
    "train": (train_inputs, train_run),
    "eval": (eval_inputs, eval_run),
    "optimize": (optimize_inputs, optimize_run),
    "register": (register_inputs, register_run),
    "gate": (gate_inputs, gate_run),
    "deploy": (deploy_inputs, deploy_run),
}


# ----------------------------------------------------------------------------- helpers


def _chosen_stages(start: str | None, stop: str | None) -> list[str]:
    for flag, value in (("--from", start), ("--to", stop)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{flag} {value!r} is not a stage (stages: {', '.join(STAGES)})")
    first = STAGES.index(start) if start else 0
    last = STAGES.index(stop) if stop else len(STAGES) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    return list(STAGES[first : last + 1])


def _hash(stage: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, "stage": stage, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _passthrough(ctx: Context, stage: str) -> dict[str, Any]:
    """A skipped stage hands on the model the stage before it produced."""
    before = STAGES[: STAGES.index(stage)]
    for earlier in reversed(before):
        if "model" in ctx.outputs.get(earlier, {}):
            return {"model": ctx.outputs[earlier]["model"]}
    return {}


def _candidate(ctx: Context) -> str:
    for stage in ("optimize", "eval", "train"):
        model = ctx.outputs.get(stage, {}).get("model")
        if model is not None:
            return str(model)
    raise GenloopError("no model to register: the train stage produced none")


def _production(ctx: Context) -> str | None:
    try:
        return registry.resolve(ctx.ws, f"{ctx.name}@production").ref
    except NotFoundError:
        return None


def _evaluate(ctx: Context, model: str) -> Any:
    from genloop.evaluate.run import evaluate_model

    def progress(suite: str, i: int, n: int) -> None:
        ctx.say(f"eval {model}: {suite} ({i}/{n})")

    return evaluate_model(
        ctx.ws, model, dataset=ctx.out("data", "dataset"), cfg=ctx.cfg.eval, progress=progress
    )


def _ensure_evaluated(ctx: Context, model: str) -> None:
    from genloop.evaluate.store import evaluated_datasets
    from genloop.workspace.datasets import resolve_dataset

    info = registry.resolve(ctx.ws, model)
    wanted = resolve_dataset(ctx.ws, ctx.out("data", "dataset")).id
    if wanted not in evaluated_datasets(ctx.ws, info.id):
        _evaluate(ctx, model)


def _metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k in ("val_loss", "val_ppl", "best_val_loss")}


# ---------------------------------------------------------------- the run record (cache)


def _start_run(ws: Workspace, name: str, cfg: GenloopConfig) -> str:
    return runs.start_run(
        ws,
        name=name,
        kind="pipeline",
        config=cfg.model_dump(mode="json"),
        summary={"stages": {}},
        git_commit=runs.git_commit(),
    )


def _record(ws: Workspace, run_id: str, outcome: StageOutcome) -> None:
    record = {
        "status": outcome.status,
        "input_hash": outcome.input_hash,
        "outputs": outcome.outputs,
        "seconds": round(outcome.seconds, 3),
        "note": outcome.note,
    }
    runs.update_summary(
        ws, run_id, lambda summary: {"stages": {**summary.get("stages", {}), outcome.stage: record}}
    )


def _finish(
    ws: Workspace, run_id: str, status: str, *, error: str | None = None, failed_stage: str = ""
) -> None:
    summary = {"failed_stage": failed_stage} if failed_stage else None
    runs.set_status(ws, run_id, status, error=error, summary=summary)


def _pipeline_runs(ws: Workspace, name: str) -> list[dict[str, Any]]:
    found = runs.list_runs(ws, kind="pipeline", name=name, limit=50)
    return [dict(r.summary.get("stages", {})) for r in found]


def _newest_done(ws: Workspace, name: str, stage: str) -> dict[str, Any] | None:
    for stages in _pipeline_runs(ws, name):
        rec = stages.get(stage)
        if rec is not None and rec.get("status") in ("ran", "cached", "skipped"):
            return dict(rec)
    return None


def _cached(ctx: Context, stage: str, digest: str) -> dict[str, Any] | None:
    for stages in _pipeline_runs(ctx.ws, ctx.name):
        rec = stages.get(stage)
        if rec is None or rec.get("input_hash") != digest:
            continue
        outputs = dict(rec.get("outputs") or {})
        if _outputs_exist(ctx, outputs):
            return outputs
    return None


def _outputs_exist(ctx: Context, outputs: dict[str, Any]) -> bool:
    """A cached result counts only while what it names is still in the catalog."""
    try:
        for key in ("model",):
            if key in outputs:
                registry.resolve(ctx.ws, str(outputs[key]))
        for ref in outputs.get("variants", []):
            registry.resolve(ctx.ws, str(ref))
    except NotFoundError:
        return False
    return True

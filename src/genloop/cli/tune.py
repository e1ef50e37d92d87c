"""``genloop tune``: a hyperparameter study over a config's tune.space (Optuna)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json

if TYPE_CHECKING:
    from genloop.tune.trial import TrialOutcome


def tune(
    config: Annotated[
        Path,
        typer.Argument(help="YAML config with model, train (or data) and tune sections."),
    ],
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials",
            "-n",
            min=1,
            help="Trials in the study, over all workers and machines \\[default: "
            "tune.trials; for an existing study, its budget].",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-j",
            min=1,
            help="Worker processes on this machine \\[default: tune.workers].",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.001,
            help="Start no trial after this many seconds \\[default: tune.timeout_s].",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the study: run its interrupted trials again, then go on to the "
            "budget (with --trials, a new budget).",
        ),
    ] = False,
    study_name: Annotated[
        str | None,
        typer.Option(
            "--study-name",
            help="Study name in the catalog \\[default: tune.study_name, else the config name].",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Model name the best trial is registered as \\[default: config name, "
            "else the study name].",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: a.b=value (repeatable).")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Search hyperparameters: train a trial per sampled config, prune the poor ones early,
    register the best trial's model and store a report.

    The study lives in the catalog database. To add workers on other machines, run the
    same command there against the same PostgreSQL catalog ($GENLOOP_DATABASE_URL); they
    share one budget of --trials. Ctrl-C stops cleanly; --resume continues.
    """
    from genloop.config import load_config
    from genloop.tune.study import tune as run_tune

    cfg = load_config(config, set_ or [])

    def progress(o: TrialOutcome) -> None:
        if not json:
            console.print(_trial_line(o, cfg.tune.metric if cfg.tune else ""), highlight=False)

    with open_workspace() as ws:
        try:
            result = run_tune(
                ws,
                cfg,
                trials=trials,
                workers=workers,
                timeout_s=timeout,
                resume=resume,
                study_name=study_name,
                model_name=name,
                root=config.parent,
                progress=progress,
            )
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: the running trials are marked interrupted; run the same "
                "command with --resume to run them again and continue the study",
                highlight=False,
            )
            raise typer.Exit(130) from None
        report = ws.store.path(result.report) / "report.html" if result.report else None
    out: dict[str, Any] = result.to_dict() | {"report_html": str(report) if report else None}
    if json:
        print_json(out)
        return
    c = result.counts
    console.print(
        f"study {result.study}: {c['complete']} complete, {c['pruned']} pruned, "
        f"{c['failed']} failed"
        + (f", {c['interrupted']} interrupted" if c["interrupted"] else "")
        + (f", {c['running']} still running elsewhere" if c["running"] else "")
        + f" of {result.budget}; {result.steps:,} training steps",
        highlight=False,
        markup=False,
    )
    if result.best_trial is not None:
        console.print(
            f"best: trial {result.best_trial}, {result.metric} {result.best_value:.5g}",
            highlight=False,
            markup=False,
        )
        for key, value in result.best_params.items():
            console.print(f"  {key} = {_fmt(value)}", highlight=False, markup=False)
    if result.model is not None:
        console.print(
            f"registered model {result.model.ref} (run {result.best_run_id})",
            highlight=False,
            markup=False,
        )
    elif result.best_trial is not None and c["running"]:
        console.print("the last worker to finish registers the best model", highlight=False)
    if report is not None:
        console.print(f"report: {report}", highlight=False, markup=False, soft_wrap=True)


def _trial_line(o: TrialOutcome, metric: str) -> str:
    from rich.markup import escape

    colour = {"complete": "green", "pruned": "yellow", "failed": "red"}.get(o.state, "magenta")
    value = f"{metric} {o.value:.4f}" if o.value is not None else ""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in o.params.items())
    line = f"trial {o.number:<3} [{colour}]{o.state:<9}[/] {value:<18} {o.steps:>6} steps  "
    line += escape(params)
    if o.error:
        line += f"  [dim]({escape(o.error.splitlines()[0][:160])})[/]"
    return line


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

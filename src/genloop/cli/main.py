"""``genloop``: the entry point, global options and error handling.

A user mistake (:class:`genloop.errors.GenloopError`) prints one line and exits with its
code (2 for bad config or usage, 1 otherwise); ``--debug`` shows the traceback instead.
Command modules import heavy libraries inside their functions so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

import genloop
from genloop.cli import (
    augment,
    config_cmd,
    container,
    data,
    evaluate,
    export,
    feedback,
    generate,
    keys,
    label,
    models,
    monitor,
    optimize,
    pipeline,
    plan,
    privacy,
    quickstart,
    retrain,
    secrets,
    serve,
    train,
    tune,
)
from genloop.cli.context import console, err_console, state

app = typer.Typer(
    name="genloop",
    help="Run the whole life of a generative model: data → train → evaluate → tune → "
    "optimize → serve → monitor → feedback → retrain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(models.app, name="models")
app.add_typer(config_cmd.app, name="config")
app.add_typer(data.app, name="data")
app.command("train")(train.train)
app.command("plan")(plan.plan)
app.command("run")(pipeline.run)
app.command("quickstart")(quickstart.quickstart)
app.add_typer(evaluate.app, name="eval")
app.command("gate")(evaluate.gate)
app.command("tune")(tune.tune)
app.command("optimize")(optimize.optimize)
app.command("export")(export.export)
app.command("generate")(generate.generate)
app.add_typer(augment.app, name="augment")
app.command("serve")(serve.serve)
app.command("entrypoint")(container.entrypoint)
app.add_typer(keys.app, name="keys")
app.add_typer(secrets.app, name="secrets")
app.add_typer(privacy.app, name="privacy")
app.add_typer(monitor.app, name="monitor")
app.add_typer(feedback.app, name="feedback")
app.add_typer(label.app, name="label")
app.command("retrain")(retrain.retrain)
app.command("loop")(retrain.loop)


def _version(value: bool) -> None:
    if value:
        console.print(f"genloop {genloop.__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace",
            "-w",
            help="Workspace folder \\[default: $GENLOOP_HOME or ./genloop-workspace]. "
            "$GENLOOP_DATABASE_URL puts the catalog in PostgreSQL instead.",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        str, typer.Option("--log-format", help="console or json (one JSON object per line).")
    ] = "console",
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = (
        "info"
    ),
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    from genloop.errors import ConfigError
    from genloop.monitor.logs import setup_logging

    state.workspace = workspace
    state.debug = debug
    if log_format not in ("console", "json"):
        raise ConfigError(f"--log-format must be 'console' or 'json', not {log_format!r}")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    setup_logging("json" if log_format == "json" else "console", log_level)


@app.command()
def init(
    directory: Annotated[
        Path | None,
        typer.Argument(
            # '\\[' keeps rich from reading "[default: ...]" as markup and dropping it.
            help="Where to create it \\[default: --workspace, $GENLOOP_HOME or "
            "./genloop-workspace].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Create a workspace (catalog database + artifact store), or migrate an existing one."""
    from genloop.workspace import init_workspace

    ws = init_workspace(directory or state.workspace)
    try:
        console.print(
            f"workspace ready at {ws.root} (catalog: {ws.catalog.backend}, "
            f"{ws.catalog.redacted_url()})",
            highlight=False,
            markup=False,
        )
    finally:
        ws.close()


def main() -> None:
    """Console-script entry point."""
    from rich.markup import escape

    from genloop.errors import GenloopError

    try:
        app(prog_name="genloop")
    except GenloopError as exc:
        if state.debug:
            raise
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # a bug, not a user mistake: say so briefly
        if state.debug:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(run with --debug for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)

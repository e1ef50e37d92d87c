"""``genloop run``: the whole pipeline, stage by stage, skipping what is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json

if TYPE_CHECKING:
    from genloop.pipeline.runner import StageOutcome

STAGE_HELP = "data, train, eval, optimize, register, gate or deploy"


def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (one section per stage).")],
    start: Annotated[
        str | None, typer.Option("--from", help=f"Start at this stage ({STAGE_HELP}).")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Stop after this stage.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: a.b=value (repeatable).")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the stages as JSON.")] = False,
) -> None:
    """Run data → train (or tune) → eval → optimize → register → gate → deploy.

    Each stage is cached by the hash of its inputs and config: a re-run skips unchanged
    stages and says so. A failing stage is named; --from STAGE resumes there. The run is
    one record in the catalog (genloop models show NAME shows what it produced).
    """
    from genloop.config import load_config
    from genloop.pipeline.runner import run_pipeline

    cfg = load_config(pipeline, set_ or [])

    def report(o: StageOutcome) -> None:
        if json:
            return
        mark = {"ran": "[green]ran[/]", "cached": "[cyan]cached[/]", "skipped": "[dim]skipped[/]"}
        what = ", ".join(f"{k}={v}" for k, v in o.outputs.items() if k != "variants")
        note = f" ({o.note})" if o.note else ""
        console.print(
            f"{o.stage:<9} {mark.get(o.status, o.status):<8} {o.seconds:7.1f}s  {what}{note}",
            highlight=False,
        )

    def progress(message: str) -> None:
        if not json:
            err_console.print(f"[dim]{message}[/]", highlight=False)

    with open_workspace() as ws:
        result = run_pipeline(
            ws,
            cfg,
            root=pipeline.resolve().parent,
            start=start,
            stop=stop,
            report=report,
            progress=progress,
        )
    if json:
        print_json(
            {
                "run_id": result.run_id,
                "name": result.name,
                "model": result.model,
                "stages": [
                    {
                        "stage": o.stage,
                        "status": o.status,
                        "seconds": round(o.seconds, 3),
                        "outputs": o.outputs,
                        "note": o.note,
                    }
                    for o in result.stages
                ],
            }
        )
    else:
        console.print(f"pipeline {result.name}: done (run {result.run_id})", highlight=False)

"""``genloop eval`` (evaluate, compare, list, show) and ``genloop gate``.

``genloop eval MODEL_REF …`` is short for ``genloop eval run MODEL_REF …``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from genloop.cli.context import console, err_console, open_workspace, print_json, print_table


class _RunByDefault(TyperGroup):
    """A group whose first argument, when it names no subcommand, is a model ref to run."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: a click Context
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Evaluate model versions (perplexity, generation, code pass@k, bias, "
    "lm-evaluation-harness task files; FID/KID/IS and augmentation for image models) and "
    "compare them. 'genloop eval MODEL_REF' is short for "
    "'genloop eval run MODEL_REF'.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


@app.command("run")
def run(
    model: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.")],
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset NAME\\[@VERSION] \\[default: the model's training data].",
        ),
    ] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option(
            "--suite",
            "-s",
            help="perplexity, generation, code, bias, lm_eval; image or augment for image "
            "models; mlm, classification or token_classification for masked LMs "
            "(repeatable) \\[default: eval.suites; image for image models; a masked LM's "
            "head's suite].",
        ),
    ] = None,
    lm_eval_tasks: Annotated[
        list[Path] | None,
        typer.Option(
            "--lm-eval-tasks",
            help="An lm-evaluation-harness task YAML (local data only) for the lm_eval suite "
            "(repeatable); without --suite, only lm_eval runs.",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config with an eval section.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: eval.max_samples=50 (repeatable)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    json: JsonOpt = False,
) -> None:
    """Evaluate a model version; the result is stored with a markdown and HTML report."""
    from genloop.config import load_config, parse_config
    from genloop.evaluate.run import evaluate_model

    cfg = load_config(config, set_ or []) if config else parse_config({}, set_ or [])
    if lm_eval_tasks:
        cfg.eval.lm_eval_tasks = [*cfg.eval.lm_eval_tasks, *lm_eval_tasks]
        suite = [*(suite or []), "lm_eval"]
    with open_workspace() as ws, err_console.status("loading the model") as status:

        def progress(name: str, i: int, n: int) -> None:
            status.update(f"suite {i}/{n}: {name}")

        record = evaluate_model(
            ws,
            model,
            dataset=dataset,
            suites=suite,
            cfg=cfg.eval,
            progress=progress,
            device=device,
        )
        report_dir = ws.store.path(record.report) if record.report else None
    if json:
        print_json(record.to_dict() | {"report_dir": str(report_dir) if report_dir else None})
        return
    on = f" on {record.dataset}" if record.dataset else ""
    print_table(
        f"{record.model}{on}: {record.suite}",
        ["metric", "value"],
        [[k, _num(v)] for k, v in record.metrics.items()],
    )
    for suite, settings in (record.settings.get("suites") or {}).items():
        extractor = settings.get("extractor") if isinstance(settings, dict) else None
        if isinstance(extractor, dict):  # image metrics: which network made the features
            console.print(f"{suite}: features from {extractor.get('id')}", highlight=False)
    console.print(f"evaluation {record.id} stored", highlight=False)
    if report_dir is not None:
        console.print(f"report: {report_dir / 'report.html'}", highlight=False, soft_wrap=True)


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="First model ref (the baseline).")],
    b: Annotated[str, typer.Argument(help="Second model ref.")],
    json: JsonOpt = False,
) -> None:
    """Two models' stored evaluations side by side: delta (B − A) and its bootstrap 95% CI."""
    from genloop.evaluate.compare import compare as run_compare

    with open_workspace() as ws:
        d = run_compare(ws, a, b)
    if json:
        print_json(d)
        return
    rows = []
    for name, m in d["metrics"].items():
        delta = "" if m["delta"] is None else f"{m['delta']:+.4g}"
        if m["delta_pct"] is not None:
            delta += f" ({m['delta_pct']:+.1f}%)"
        ci = "" if m["ci"] is None else f"[{m['ci'][0]:+.4g}, {m['ci'][1]:+.4g}]"
        rows.append([name, _num(m["a"]), _num(m["b"]), delta, ci])
    on = f" on {d['dataset']}" if d["dataset"] else ""
    print_table(f"{d['a']} → {d['b']}{on}", ["metric", d["a"], d["b"], "delta", "95% CI"], rows)
    for warning in d["warnings"]:
        err_console.print(f"note: {warning}", highlight=False, markup=False)


@app.command("list")
def list_(
    model: Annotated[str | None, typer.Argument(help="Only this model version's.")] = None,
    json: JsonOpt = False,
) -> None:
    """List stored evaluations, newest first."""
    from genloop.evaluate.store import list_evaluations
    from genloop.workspace import registry

    with open_workspace() as ws:
        version_id = registry.resolve(ws, model).id if model else None
        records = list_evaluations(ws, version_id)
    if json:
        print_json([r.to_dict() for r in records])
        return
    if not records:
        console.print("no evaluations yet")
        return
    rows = [
        [
            r.id,
            r.model,
            r.dataset,
            r.suite,
            " ".join(f"{k}={_num(v)}" for k, v in list(r.metrics.items())[:4]),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for r in records
    ]
    print_table(None, ["id", "model", "dataset", "suites", "metrics", "created (UTC)"], rows)


@app.command()
def show(
    evaluation_id: Annotated[int, typer.Argument(help="Evaluation id.")],
    json: JsonOpt = False,
) -> None:
    """Show one evaluation: metrics, settings and where its report is."""
    from genloop.evaluate.store import get_evaluation

    with open_workspace() as ws:
        record = get_evaluation(ws, evaluation_id)
        report_dir = ws.store.path(record.report) if record.report else None
    data = record.to_dict() | {"report_dir": str(report_dir) if report_dir else None}
    if json:
        print_json(data)
        return
    for key in ("id", "model", "dataset", "suite", "created_at", "report_dir"):
        console.print(f"[bold]{key}:[/] {data[key]}", highlight=False)
    print_table("metrics", ["metric", "value"], [[k, _num(v)] for k, v in record.metrics.items()])


def gate(
    candidate: Annotated[str, typer.Argument(help="The model ref to judge.")],
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            "-a",
            help="The model ref it must not fall behind, e.g. NAME@production.",
        ),
    ] = None,
    rules: Annotated[
        Path | None,
        typer.Option(
            "--rules",
            "-r",
            help="YAML with a 'rules:' list (or a config with a gate section) \\[default: "
            "perplexity may rise at most 2%, pass@1 may not drop].",
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Check a candidate's stored evaluation against rules; exit 0 if all pass, 1 if not.

    Both models need a stored evaluation on the same dataset version ('genloop eval').
    Config errors exit 2.
    """
    from genloop.evaluate.gate import gate as run_gate
    from genloop.evaluate.gate import load_rules

    rule_list = load_rules(rules) if rules is not None else None
    with open_workspace() as ws:
        result = run_gate(ws, candidate, against, rule_list)
    if json:
        print_json(result.to_dict())
    else:
        on = f" on {result.dataset}" if result.dataset else ""
        vs = f" vs {result.against}" if result.against else ""
        console.print(f"gate: {result.candidate}{vs}{on}", highlight=False, markup=False)
        for check in result.checks:
            mark = "[green]PASS[/]" if check.passed else "[bold red]FAIL[/]"
            console.print(
                f"  {mark} {_escape(check.description)}: {_escape(check.message)}",
                highlight=False,
            )
        if result.passed:
            console.print("gate passed", highlight=False)
        else:
            failed = "; ".join(c.description for c in result.failed)
            console.print(f"gate FAILED: {failed}", highlight=False, markup=False)
    if not result.passed:
        raise typer.Exit(1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)

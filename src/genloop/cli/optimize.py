"""``genloop optimize``: quantize, prune, distill and export a model; compare the variants."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json, print_table


def optimize(
    model: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS to optimize.")],
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            "-q",
            help="int8 or int4 (weight-only). With --export onnx the ONNX graph is quantized too.",
            show_default=False,
        ),
    ] = None,
    quantize_mode: Annotated[
        str | None,
        typer.Option(
            "--quantize-mode",
            help="int8 scheme: dynamic (int8 activations too; CPU) or weight_only "
            "\\[default: dynamic].",
            show_default=False,
        ),
    ] = None,
    prune: Annotated[
        float | None,
        typer.Option(
            "--prune",
            "-p",
            help="Share of weights to remove, e.g. 0.3 (with --structured: of attention "
            "heads and MLP channels).",
            show_default=False,
        ),
    ] = None,
    structured: Annotated[
        bool,
        typer.Option(
            "--structured", help="Prune whole heads and MLP channels (a smaller, faster model)."
        ),
    ] = False,
    recovery_steps: Annotated[
        int | None,
        typer.Option(
            "--recovery-steps",
            help="Fine-tuning steps on the dataset after pruning \\[default: 0].",
            show_default=False,
        ),
    ] = None,
    distill: Annotated[
        str | None,
        typer.Option(
            "--distill",
            help="Train a student of this preset (tiny, small, base) from the model's logits.",
            show_default=False,
        ),
    ] = None,
    distill_steps: Annotated[
        int | None,
        typer.Option(
            "--distill-steps", help="Student training steps \\[default: 1000].", show_default=False
        ),
    ] = None,
    export: Annotated[
        str | None,
        typer.Option(
            "--export",
            "-e",
            help="onnx: export with the key/value cache, checked against PyTorch.",
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            "-b",
            help="Quality budget, e.g. 'ppl+3%', 'pass@1-1%': pick the fastest variant "
            "within it (implies --report).",
            show_default=False,
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Promote the variant the budget picks (--alias).")
    ] = False,
    alias: Annotated[
        str, typer.Option("--alias", help="The alias --promote moves.")
    ] = "production",
    report: Annotated[
        bool,
        typer.Option(
            "--report",
            "-r",
            help="Measure the model and its variants side by side (size, memory, latency, "
            "throughput, perplexity). Without a transform: the model's whole lineage.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Also write the report to this file (.md for markdown, else JSON).",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset NAME\\[@VERSION] for distillation, recovery and perplexity "
            "\\[default: the model's training data].",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="CPU threads for the measurements \\[default: torch's setting].",
            show_default=False,
        ),
    ] = None,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed requests per variant (p50/p99 over them).")
    ] = 10,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Measure every variant in this process (faster; peak memory less exact).",
        ),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="Where distillation and recovery train: cpu or cuda.")
    ] = "cpu",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML config with an optimize section (flags override it).",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: optimize.distill_temperature=3 (repeatable)."),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Quantize, prune, distill and/or export a model; each output is a new version.

    Steps chain: distill → prune → quantize / export.
    Each variant's parent is the model it was made from. Examples:

    genloop optimize lm@2 --quantize int8 --export onnx --report

    genloop optimize lm@2 --prune 0.3 --structured --recovery-steps 200

    genloop optimize lm@2 --budget 'ppl+3%' --promote
    """
    from genloop.config import OptimizeConfig, load_config, parse_config
    from genloop.optimize.run import optimize_model
    from genloop.optimize.tradeoff import Workload

    base = load_config(config, set_ or []) if config else parse_config({}, set_ or [])
    values: dict[str, Any] = (base.optimize or OptimizeConfig()).model_dump(exclude_unset=True)
    flags = {
        "quantize": quantize,
        "quantize_mode": quantize_mode,
        "prune": prune,
        "prune_structured": structured or None,
        "recovery_steps": recovery_steps,
        "distill": distill,
        "distill_steps": distill_steps,
        "export": export,
        "budget": budget,
        "promote": promote or None,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = parse_config({"optimize": values}, source="the options").optimize
    assert cfg is not None
    workload = Workload(threads=threads, repeats=repeats)

    with open_workspace() as ws, err_console.status("loading the model") as status:

        def progress(what: str, step: int, total: int) -> None:
            status.update(f"{what} {step}/{total}" if total > 1 else what)

        result = optimize_model(
            ws,
            model,
            cfg,
            dataset=dataset,
            report=report or out is not None,
            workload=workload,
            isolate=not in_process,
            alias=alias,
            device=device,
            progress=progress,
        )
    if out is not None and result.report is not None:
        import json as json_mod

        text = (
            result.report.to_markdown()
            if out.suffix == ".md"
            else json_mod.dumps(result.report.to_dict(), indent=2) + "\n"
        )
        out.write_text(text)
    if json:
        print_json(result.to_dict())
        return
    for v in result.variants:
        console.print(
            f"registered {v.ref} ({v.tags.get('optimize')} of {v.parent})",
            highlight=False,
            markup=False,
        )
    if result.report is not None:
        columns, rows = result.report.rows()
        print_table(f"trade-offs against {result.report.model}", columns, rows)
        for measured in result.report.variants:
            if measured.error:
                err_console.print(
                    f"note: {measured.ref} not measured: {measured.error}", markup=False
                )
        if result.report.budget:
            console.print(
                f"budget {result.report.budget}: fastest within it is {result.picked}",
                highlight=False,
                markup=False,
            )
    if result.promoted:
        console.print(f"promoted {result.promoted}", highlight=False, markup=False)
    if out is not None and result.report is not None:
        console.print(f"report written to {out}", highlight=False, markup=False)

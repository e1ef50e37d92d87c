"""``genloop plan``: recommend a model family and size for a config, data and budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json, print_table


def plan(
    config: Annotated[
        Path, typer.Argument(help="YAML config with model, train (and data) sections.")
    ],
    budget_hours: Annotated[
        float, typer.Option("--budget-hours", help="Wall-clock hours you can train for.")
    ] = 1.0,
    presets: Annotated[
        str | None,
        typer.Option(
            "--presets",
            help="Only these candidates, comma-separated (tiny,small,base; config for the "
            "config's own architecture) [default: all].",
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Training steps measured per candidate.")
    ] = 3,
    max_seconds: Annotated[
        float | None,
        typer.Option(
            "--max-seconds", help="Stop measuring a candidate after this long (≥ 1 step)."
        ),
    ] = 60.0,
    tokens_per_param: Annotated[
        float,
        typer.Option("--tokens-per-param", help="Training tokens per parameter (Chinchilla: 20)."),
    ] = 20.0,
    max_epochs: Annotated[
        float, typer.Option("--max-epochs", help="Most passes over the data a size may need.")
    ] = 4.0,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: a.b=value (repeatable).")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Recommend a model size: tokens ≈ 20 × parameters, this machine's measured speed.

    Each candidate trains for a few real steps on random tokens (nothing is saved) to
    measure tokens/s and peak memory; the pick is the largest whose tokens fit the budget
    and need at most --max-epochs passes over the dataset (prepared first if needed).
    """
    from genloop.config import load_config
    from genloop.train.plan import format_hours
    from genloop.train.plan import plan as make_plan

    cfg = load_config(config, set_ or [])
    keep = [p.strip() for p in presets.split(",") if p.strip()] if presets else None
    with open_workspace() as ws:
        if not json:
            console.print("measuring each candidate for a few training steps…", highlight=False)
        result = make_plan(
            ws,
            cfg,
            budget_hours,
            steps,
            presets=keep,
            tokens_per_param=tokens_per_param,
            max_epochs=max_epochs,
            max_seconds=max_seconds,
            root=config.parent,
        )
    if json:
        print_json(result.to_dict())
        return
    console.print(
        f"dataset {result.dataset}: {result.tokens_available:,} training tokens, vocabulary "
        f"{result.vocab_size:,}, seq_len {result.seq_len}; {result.device} in {result.precision}",
        highlight=False,
        markup=False,
    )
    rows = []
    for c in result.candidates:
        rows.append(
            [
                c.name + (" (configured)" if c.configured else ""),
                f"{c.params / 1e6:.1f}M",
                f"{c.rule_tokens / 1e6:,.1f}M",
                f"{c.epochs:,.2f}" if c.epochs < 10 else f"{c.epochs:,.0f}",
                f"{c.tokens_per_s:,.0f}" if c.tokens_per_s else "",
                format_hours(c.hours),
                f"{c.peak_memory_mb:,.0f}" if c.peak_memory_mb is not None else "",
                "yes" if c.fits else "no",
            ]
        )
    print_table(
        f"candidates (budget {format_hours(result.budget_hours)}, "
        f"{result.tokens_per_param:g} tokens/parameter, ≤ {result.max_epochs:g} epochs)",
        ["candidate", "params", "tokens", "epochs", "tok/s", "time", "MiB", "fits"],
        rows,
    )
    if result.recommended is not None:
        console.print(
            f"recommended: {result.family} {result.recommended}, train.max_steps ≈ "
            f"{result.suggested_max_steps:,} ({result.tokens_per_step:,} tokens a step)",
            highlight=False,
            markup=False,
        )
    for reason in result.reasons:
        console.print(f"  - {reason}", highlight=False, markup=False)

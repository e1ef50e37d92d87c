"""``genloop train``: train or fine-tune a model from a config file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json


def train(
    config: Annotated[
        Path, typer.Argument(help="YAML config with model, train (and data) sections.")
    ],
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the newest unfinished run of this model exactly where it stopped.",
        ),
    ] = False,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            "--run-id",
            help="With --resume: this run id (under torchrun spell it --run-id: torchrun "
            "takes --run for its own --run-path).",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="Model name to register [default: config name or dataset name]."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: a.b=value (repeatable).")
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow a base model whose weights are pickle-based (.bin/.pt): pickles can "
            "run code, so only for sources you trust; read with torch.load(weights_only=True).",
        ),
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train (or fine-tune) a model; checkpoints are atomic and --resume continues exactly.

    Runs alone or under torchrun (DDP, or FSDP2 with train.strategy=fsdp):
    torchrun --nproc-per-node 2 -m genloop train CONFIG.yaml
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from genloop.config import load_config
    from genloop.train.distributed import is_main_process
    from genloop.train.loop import train as run_training

    cfg = load_config(config, set_ or [])
    main = is_main_process()  # under torchrun only rank 0 shows progress and prints
    with (
        open_workspace() as ws,
        Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=json or not main,
        ) as bar,
    ):
        task = bar.add_task("train", total=cfg.train.max_steps, info="")

        def progress(step: int, total: int, m: dict[str, float]) -> None:
            info = f"loss {m['loss']:.4f}  {m['tokens_per_s']:,.0f} tok/s"
            if "val_loss" in m:
                info += f"  val {m['val_loss']:.4f}"
            bar.update(task, completed=step, info=info)

        result = run_training(
            ws,
            cfg,
            resume=run or resume,
            model_name=name,
            progress=progress,
            root=config.parent,
            trust_pickle=trust_pickle,
        )
    if not main:
        return
    out = {
        "run_id": result.run_id,
        "steps": result.steps,
        "metrics": result.metrics,
        "stopped_early": result.stopped_early,
        "model": result.model.ref if result.model else None,
    }
    if json:
        print_json(out)
        return
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    console.print(f"run {result.run_id}: {result.steps} steps, {metrics}", highlight=False)
    if result.model is not None:
        console.print(f"registered model {result.model.ref}", highlight=False)

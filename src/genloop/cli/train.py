"""``genloop train``: train or fine-tune a model from a config file.

With ``--nnodes``/``--nproc-per-node`` it launches torchrun itself (see
:mod:`genloop.train.launch`); with ``--emit`` it prints a launcher instead of training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from genloop.cli.context import console, open_workspace, print_json

LAUNCH = "Launch on several processes or machines"


def train(
    ctx: typer.Context,
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
            "--name", help="Model name to register \\[default: config name or dataset name]."
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
    nnodes: Annotated[
        int | None,
        typer.Option(
            "--nnodes",
            help="Machines in the job: run the same command on each, with --rdzv-endpoint.",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node",
            help="Training processes per machine \\[default: its GPUs; 1 without GPUs or "
            "with train.device cpu]. Alone, starts that many on this machine.",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(
            "--rdzv-endpoint",
            metavar="HOST:PORT",
            help="Where the machines meet (torchrun's c10d rendezvous): a machine of the job "
            "that every other reaches; it hosts the rendezvous on PORT (e.g. 29500).",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
    rdzv_id: Annotated[
        str | None,
        typer.Option(
            "--rdzv-id",
            help="The job's name at the rendezvous, the same on every machine "
            "\\[default: genloop-train-CONFIG_NAME].",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
    rdzv_timeout: Annotated[
        int | None,
        typer.Option(
            "--rdzv-timeout",
            metavar="SECONDS",
            help="How long a machine waits for the others to join before it gives up with "
            "an error naming the endpoint \\[default: torchrun's 600].",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
    emit: Annotated[
        Literal["torchrun", "slurm", "pytorchjob"] | None,
        typer.Option(
            "--emit",
            help="Print a launcher for this training instead of running it: a torchrun "
            "command, a Slurm sbatch script or a Kubeflow PyTorchJob manifest "
            "(takes --nnodes, --nproc-per-node, --rdzv-*, --image).",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="With --emit pytorchjob: the genloop container image "
            "\\[default: genloop:cuda, or genloop:latest with train.device cpu].",
            rich_help_panel=LAUNCH,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train (or fine-tune) a model; checkpoints are atomic and --resume continues exactly.

    Runs alone or on several processes (DDP, or FSDP2 with train.strategy=fsdp):
    `genloop train CONFIG.yaml --nproc-per-node 2` on one machine; on each of 2 machines
    `genloop train CONFIG.yaml --nnodes 2 --rdzv-endpoint HOST:29500` (they share the
    workspace folder and, through GENLOOP_DATABASE_URL, a PostgreSQL catalog). torchrun
    works as well: torchrun --nproc-per-node 2 -m genloop train CONFIG.yaml.
    `--emit slurm|pytorchjob|torchrun` prints the launcher for a cluster instead.
    """
    from genloop.config import load_config

    cfg = load_config(config, set_ or [])
    launching = nnodes is not None or nproc_per_node is not None or emit is not None
    if launching or rdzv_endpoint or rdzv_id or rdzv_timeout is not None or image:
        from genloop.errors import ConfigError
        from genloop.train import launch

        if "TORCHELASTIC_RUN_ID" in os.environ:
            raise ConfigError(
                "--nnodes, --nproc-per-node, --rdzv-* and --emit start torchrun themselves: "
                "under torchrun leave them out"
            )
        if not launching:
            raise ConfigError(
                "--rdzv-endpoint, --rdzv-id, --rdzv-timeout and --image "
                "go with --nnodes, --nproc-per-node or --emit"
            )
        if image and emit != "pytorchjob":
            raise ConfigError("--image goes with --emit pytorchjob")
        if emit is None:
            launch.quiet_store_retries()  # before anything loads torch
        job = launch.Launch(
            nnodes=1 if nnodes is None else nnodes,
            nproc_per_node=(
                launch.default_nproc_per_node(cfg.train.device)
                if nproc_per_node is None
                else nproc_per_node
            ),
            rdzv_endpoint=rdzv_endpoint,
            rdzv_id=rdzv_id or launch.job_name(config.stem),
            rdzv_timeout=rdzv_timeout,
        )
        if job.nnodes > 1 and rdzv_endpoint is None and emit not in ("slurm", "pytorchjob"):
            raise ConfigError(
                "--nnodes above 1 needs --rdzv-endpoint HOST:PORT: a machine of the job that "
                "every other reaches (the same on every machine)"
            )
        program = _program(
            ctx,
            config,
            resume=resume,
            run=run,
            name=name,
            set_=set_ or [],
            trust_pickle=trust_pickle,
            json=json,
        )
        if emit is not None:
            text = launch.render(
                emit,
                job,
                program,
                gpus=cfg.train.device != "cpu",
                job_name=launch.job_name(name or config.stem),
                image=image,
            )
            typer.echo(text, nl=False)
            return
        launch.launch(job, program)
        return
    _train(config, cfg, resume=resume, run=run, name=name, trust_pickle=trust_pickle, json=json)


def _program(
    ctx: typer.Context,
    config: Path,
    *,
    resume: bool,
    run: str | None,
    name: str | None,
    set_: list[str],
    trust_pickle: bool,
    json: bool,
) -> list[str]:
    """The ``genloop ...`` arguments every training process runs: this command's global
    options and training options, without the launch options."""
    top: dict[str, Any] = ctx.find_root().params
    argv: list[str] = []
    if top.get("workspace") is not None:
        argv += ["--workspace", str(top["workspace"])]
    if top.get("log_format", "console") != "console":
        argv += ["--log-format", str(top["log_format"])]
    if top.get("log_level", "info") != "info":
        argv += ["--log-level", str(top["log_level"])]
    if top.get("debug"):
        argv.append("--debug")
    argv += ["train", str(config)]
    if name is not None:
        argv += ["--name", name]
    for override in set_:
        argv += ["--set", override]
    if resume:
        argv.append("--resume")
    if run is not None:
        argv += ["--run-id", run]  # torchrun's parser would take --run for its --run-path
    if trust_pickle:
        argv.append("--trust-pickle")
    if json:
        argv.append("--json")
    return argv


def _train(
    config: Path,
    cfg: Any,
    *,
    resume: bool,
    run: str | None,
    name: str | None,
    trust_pickle: bool,
    json: bool,
) -> None:
    """Train in this process (alone, or as one rank under torchrun)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from genloop.train.distributed import is_main_process
    from genloop.train.loop import train as run_training

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
